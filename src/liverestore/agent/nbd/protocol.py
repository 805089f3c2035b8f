"""NBD protocol constants, from the upstream spec (doc/proto.md in the NBD project)."""

from __future__ import annotations

import struct

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0
CLIENT_FLAG_NO_ZEROES = 1 << 1

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6

# NBD_OPT_INFO / GO information types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_CACHE = 1 << 10

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3

# structured reply chunk types
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1

# base:allocation flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# errno values on the wire
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

BASE_ALLOCATION = "base:allocation"
MAX_REQUEST = 32 * 1024 * 1024  # largest read/write we accept; advertised as the maximum block size

REQUEST_HEADER = struct.Struct(">IHHQQI")
OPTION_HEADER = struct.Struct(">QII")


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPT_REPLY_MAGIC, option, reply_type, len(data)) + data


def simple_reply(error: int, handle: int) -> bytes:
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle)


def structured_header(flags: int, reply_type: int, handle: int, length: int) -> bytes:
    return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, reply_type, handle, length)


_OFFSET_DATA_HEAD = struct.Struct(">IHHQIQ")


def offset_data_head(handle: int, offset: int, length: int) -> bytes:
    """The header of a final NBD_REPLY_TYPE_OFFSET_DATA chunk of ``length`` data bytes, with the
    offset that starts its payload: one pack, and the data left to go after it unjoined."""
    return _OFFSET_DATA_HEAD.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, 8 + length,
                                  offset)  # fmt: skip


def structured_error(handle: int, error: int, message: str) -> bytes:
    msg = message.encode()[:4096]
    payload = struct.pack(">IH", error, len(msg)) + msg
    return structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, len(payload)) + payload
