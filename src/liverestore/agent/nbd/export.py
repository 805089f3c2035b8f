"""What the NBD server needs from an export: the seam between wire protocol and storage logic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Protocol


@dataclass(frozen=True)
class FileSlice:
    """A read answered straight from a file: the server ``sendfile``s it, with no copy in Python."""

    file: BinaryIO
    offset: int
    length: int


class ExportError(Exception):
    """A request failed; ``errno`` goes on the wire, the message into the log and structured reply."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class InlineReads(Protocol):
    """One connection's reads answered without waiting: the server asks before it starts a task
    for a read, and the answer may come from what an earlier read of the connection fetched."""

    def read(self, offset: int, length: int) -> bytes | memoryview | None:
        """The bytes if they can be had without waiting (small, cached); else None → ``read``."""
        ...


class NbdExport(Protocol):
    name: str
    size: int
    writable: bool
    description: str

    async def read(self, offset: int, length: int) -> bytes | FileSlice: ...

    def inline_reads(self) -> InlineReads:
        """A connection's own way to answer reads at once (see ``InlineReads``)."""
        ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def write_zeroes(self, offset: int, length: int) -> None: ...

    async def trim(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None: ...

    async def cache(self, offset: int, length: int) -> None: ...

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents covering [offset, offset+length): (length, NBD_STATE flags)."""
        ...
