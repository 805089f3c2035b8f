"""Content-addressed chunk store: chunks packed into large objects, found through an index.

Chunks are named by the BLAKE3 hash of their *uncompressed* bytes (the keyed hash in an encrypted
repository), so identical blocks from any disk, VM or restore point are stored once. Every read
re-hashes: a repository on flaky secondary storage must produce an error, never wrong data for a
booting VM.

One object per 64 KiB chunk would make an object store charge a request, and a round trip, per
block; so, as restic does, a backup appends its new chunks (compressed, then sealed when
encrypted) to a *pack* of about 16 MiB (``packs/<hash of the pack>``) and, before its restore
point is committed, writes an *index* object (``index/<hash>``) saying which chunk sits where in
which pack. Readers load every index once and fetch byte ranges of packs; neighbouring chunks of
one pack are read with one ranged request (``load_run``). A pack is written before any index
names it, and an index before any point needs it, so a crash leaves at worst an unindexed pack
that prune removes. A pack ends with a trailer naming its chunks, so the index can be rebuilt
from the packs alone (``repair.py``). Repositories from before packs keep their loose
``chunks/<id>`` objects, which are still read.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import struct
import sys
import threading
import time
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import blake3
import zstandard

from liverestore.errors import IntegrityError, RepositoryError, RepositoryUnavailable
from liverestore.repository.backend import Backend, Handle, ObjectMissing
from liverestore.repository.crypto import MasterKey
from liverestore.repository.manifest import ID_BYTES, DiskManifest

log = logging.getLogger("liverestore.chunks")

_ZSTD_LEVEL = 3
PACK_TARGET = 16 * 1024 * 1024  # restic's default; big enough that requests per GiB stay ~64
INDEX_EVERY_PACKS = 64  # a long backup writes its index in parts, so a crash wastes little
_UPLOADS_IN_FLIGHT = 3
_REFRESH_MIN_S = 1.0  # an unknown chunk re-reads the index at most this often


def chunk_id(data: bytes | memoryview) -> str:
    """Hex BLAKE3 digest: the chunk's name."""
    return str(blake3.blake3(data).hexdigest())


def _check_id(cid: str) -> str:
    if len(cid) != 64 or any(c not in "0123456789abcdef" for c in cid):
        raise RepositoryError(f"malformed chunk id {cid!r}")
    return cid


class Location(NamedTuple):
    """Where one chunk's stored bytes are: ``pack`` is None for a loose chunk object. A named
    tuple, not a frozen dataclass: the agent makes one per block fetched, and a frozen
    dataclass takes 1.1 us to build against 0.44."""

    pack: str | None
    offset: int
    length: int


class Want(NamedTuple):
    """One chunk a reader needs: its id and uncompressed size, and where it is stored (one per
    block fetched, as ``Location``)."""

    cid: str
    size: int
    where: Location


_RECORD = struct.Struct("<32sIII")  # chunk id, pack number, offset, length


class PackIndex:
    """Every index object read so far, merged into chunk id → location.

    Held as flat records, because an agent keeps it while it serves: 48 bytes a chunk (a dict of
    Python objects took about 250). The records stay in the order they were added, in one growing
    bytearray that is never copied; a table of record numbers grouped by the ids' leading bits
    (chunk ids are uniform hashes: about four records a bucket) finds a chunk by scanning one
    bucket. Regrouping the records themselves held three copies of them at once, the agent's peak
    RSS on a large disk; the table costs 4 bytes a chunk. ``seal`` builds the table over every
    record and publishes it in one assignment: lookups from other threads never see half of it,
    and records appended later never move the ones a published table names. The first record of
    a chunk wins (a chunk stored twice is found where it was first indexed). With
    ``keep_entries`` (prune) it also keeps every pack's full list, duplicates included."""

    def __init__(self, keep_entries: bool = False) -> None:
        self._pack_ids: list[str] = []
        self._pack_no: dict[str, int] = {}
        self._records = bytearray()
        # record numbers grouped by bucket, each bucket's start in it, bits of id per bucket number
        self._table: tuple[array[int], array[int], int] = (array("I"), array("I", [0, 0]), 0)
        self.entries: dict[str, list[tuple[str, int, int]]] | None = {} if keep_entries else None
        self.objects: set[str] = set()  # index objects already read
        self.problems: list[str] = []  # unreadable index objects (verify reports them)

    def add(self, pack: str, entries: Iterable[tuple[bytes, int, int]]) -> None:
        no = self._pack_no.get(pack)
        if no is None:
            no = self._pack_no[pack] = len(self._pack_ids)
            self._pack_ids.append(pack)
        listed = self.entries.setdefault(pack, []) if self.entries is not None else None
        for key, offset, length in entries:
            self._records += _RECORD.pack(key, no, offset, length)
            if listed is not None:
                listed.append((key.hex(), offset, length))

    def seal(self) -> None:
        """Publish a table over every record added so far (earlier records first in a bucket)."""
        records, size = self._records, _RECORD.size
        n = len(records) // size
        if n == len(self._table[0]):
            return
        bits = max(0, (n // 4).bit_length())
        starts, order = _group_by_bucket(
            lambda: (int.from_bytes(records[r : r + 4], "big") for r in range(0, n * size, size)), n, 32 - bits
        )
        self._table = (order, starts, bits)

    def find(self, key: bytes) -> tuple[int, int, int] | None:
        """(pack number, offset, length) of the chunk with this 32-byte id."""
        records, (order, starts, bits) = self._records, self._table
        b = int.from_bytes(key[:4], "big") >> (32 - bits)
        size = _RECORD.size
        for k in range(starts[b], starts[b + 1]):
            at = order[k] * size
            if records[at : at + 32] == key:
                _, no, offset, length = _RECORD.unpack_from(records, at)
                return no, offset, length
        return None

    def pack_name(self, number: int) -> str:
        """The pack a ``find`` result's number names."""
        return self._pack_ids[number]

    def get(self, cid: str) -> Location | None:
        found = self.find(bytes.fromhex(cid))
        return None if found is None else Location(self._pack_ids[found[0]], found[1], found[2])

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, str) and self.get(cid) is not None

    def __len__(self) -> int:
        return len(self._table[0])

    def chunk_ids(self) -> Iterator[str]:
        """Each indexed chunk once."""
        records, seen = self._records, set()
        for at in range(0, len(self._table[0]) * _RECORD.size, _RECORD.size):
            key = bytes(records[at : at + 32])
            if key not in seen:
                seen.add(key)
                yield key.hex()

    def has_pack(self, pack: str) -> bool:
        return pack in self._pack_no


def _group_by_bucket(prefixes: Callable[[], Iterator[int]], n: int, shift: int) -> tuple[array[int], array[int]]:
    """A counting sort of items 0..n-1 by bucket (``prefix >> shift``; ``prefixes()`` gives each
    item's prefix in item order, and is called twice): each bucket's start, and the item numbers
    grouped by bucket, ascending within one. 4 bytes an item and 4 a bucket: no item is copied."""
    starts = array("I", [0]) * ((1 << (32 - shift)) + 1)
    for prefix in prefixes():
        starts[(prefix >> shift) + 1] += 1
    for b in range(len(starts) - 1):
        starts[b + 1] += starts[b]
    fill = array("I", starts)
    order = array("I", [0]) * n
    for k, prefix in enumerate(prefixes()):
        b = prefix >> shift
        order[fill[b]] = k
        fill[b] += 1
    return starts, order


class ChunkLocations:
    """Where each allocated block of one manifest is stored: 12 bytes a block (pack number,
    offset, length). An agent keeps these for the disks it serves instead of the repository's
    merged index (48 bytes for each chunk of every backup in it), so its memory follows what it
    serves, not the repository (``ChunkStore.locations`` fills them). A block no index names (a
    loose chunk of an old repository) is looked up the slow way when read; a pack a prune has
    moved since is followed by ``ChunkStore.load_run``."""

    UNKNOWN = 0xFFFFFFFF

    def __init__(self, allocated: int, packs: list[str]) -> None:
        self.packs = packs  # pack names by number (shared by the manifests located together)
        self.rows = array("I", [self.UNKNOWN]) * (3 * allocated)

    def at(self, position: int) -> Location | None:
        """Where the allocated block at ``position`` (``DiskManifest.position``) is; None: ask
        the store."""
        no, offset, length = self.rows[3 * position : 3 * position + 3]
        return None if no == self.UNKNOWN else Location(self.packs[no], offset, length)


class _IdLookup:
    """The chunk ids of several manifests grouped by their leading bits, as ``PackIndex`` does
    (ids are uniform hashes): which blocks hold a given id, at 8 to 12 bytes a block while the
    index objects stream past. Blocks are numbered across the manifests in turn (``bases``)."""

    def __init__(self, manifests: Sequence[DiskManifest]) -> None:
        self.ids = [m.raw_ids for m in manifests]
        self.bases = array("Q", [0])
        for m in manifests:
            self.bases.append(self.bases[-1] + m.allocated_count)
        n = self.bases[-1]
        self.shift = 32 - min(31, n.bit_length())  # one or two blocks a bucket: few ids compared a key
        self.starts, self.order = _group_by_bucket(
            lambda: itertools.chain.from_iterable(_prefixes(ids) for ids in self.ids), n, self.shift
        )

    def holders(self, key: bytes) -> list[tuple[int, int]]:
        """(manifest number, position) of each block whose chunk id is ``key`` (usually one)."""
        b = int.from_bytes(key[:4], sys.byteorder) >> self.shift
        found = []
        for g in self.order[self.starts[b] : self.starts[b + 1]]:
            mi = bisect.bisect_right(self.bases, g) - 1 if len(self.ids) > 1 else 0  # one disk: g is k
            k = g - self.bases[mi]
            if self.ids[mi][k * ID_BYTES : k * ID_BYTES + ID_BYTES] == key:
                found.append((mi, k))
        return found


def _prefixes(ids: bytes | bytearray) -> Iterator[int]:
    """The first four bytes of each 32-byte id, as native integers (any uniform bits will do for
    bucketing, as long as ``holders`` reads keys the same way), one at a time."""
    with memoryview(ids) as view, view.cast("I") as words:
        yield from words[:: ID_BYTES // 4]


_INDEX_MAGIC = b"LRINDEX1"
_COUNT = struct.Struct("<I")
_ENTRY = struct.Struct("<32sII")


def _encode_index(packs: dict[str, list[tuple[str, int, int]]]) -> bytes:
    """Binary, so reading a big index makes no Python object per entry beyond what is kept:
    magic, then per pack its 32-byte id, a count and (32-byte chunk id, offset, length) each."""
    out = bytearray(_INDEX_MAGIC)
    for pack, entries in packs.items():
        out += bytes.fromhex(pack) + _COUNT.pack(len(entries))
        for cid, offset, length in entries:
            out += _ENTRY.pack(bytes.fromhex(cid), offset, length)
    return bytes(zstandard.ZstdCompressor(level=3).compress(bytes(out)))


_IndexPacks = Iterator[tuple[str, Iterator[tuple[bytes, int, int]]]]  # (pack, its (chunk id, offset, length)s)


def _decode_index(blob: bytes) -> _IndexPacks:
    data = memoryview(zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 31))
    if data[: len(_INDEX_MAGIC)] != _INDEX_MAGIC:
        raise ValueError("not an index object")
    pos = len(_INDEX_MAGIC)
    while pos < len(data):
        pack = bytes(data[pos : pos + 32]).hex()
        (count,) = _COUNT.unpack_from(data, pos + 32)
        first, pos = pos + 36, pos + 36 + count * _ENTRY.size
        if pos > len(data) or len(pack) != 64:
            raise ValueError("truncated index object")
        yield pack, _ENTRY.iter_unpack(data[first:pos])


_TRAILER_MAGIC = b"LRPACKT1"
_TRAILER_TAIL = struct.Struct("<I8s")  # a pack's last 12 bytes: its trailer's length, the magic
_TRAILER_AAD = "pack trailer"


def _encode_trailer(entries: Sequence[tuple[str, int, int]]) -> bytes:
    """What a pack holds, (32-byte chunk id, offset, length) each, as its index names it: a pack
    describes itself, so the index can be rebuilt from the packs alone when an index object is
    lost or damaged (restic's packs carry such a header too). Readers of chunks never look at it."""
    return b"".join(_ENTRY.pack(bytes.fromhex(cid), offset, length) for cid, offset, length in entries)


class ChunkStore:
    """zstd-compressed chunks in packs; in an encrypted repository each chunk is sealed after
    compression (its id as associated data), and index objects are sealed too."""

    def __init__(self, backend: Backend, key: MasterKey | None = None) -> None:
        self.backend = backend
        self.key = key
        # zstd contexts are not thread-safe; the agent decompresses in worker threads.
        self._local = threading.local()
        self._index: PackIndex | None = None
        self._index_lock = threading.Lock()
        self._last_refresh = 0.0
        self._last_reload = 0.0
        # the writer side: the open pack, packs written since the last index, uploads under way
        self._write_lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._buffer_entries: list[tuple[str, int, int]] = []
        self._buffer_size = 0
        self._pending_ids: set[str] = set()
        self._unindexed: dict[str, list[tuple[str, int, int]]] = {}
        self._uploads: list[Future[None]] = []
        self._uploader: ThreadPoolExecutor | None = None

    @staticmethod
    def handle(cid: str) -> Handle:
        """A loose chunk's object (repositories from before packs)."""
        return Handle("chunks", _check_id(cid))

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def id_of(self, data: bytes | memoryview) -> str:
        """The name ``data`` is stored under in this repository."""
        return self.key.object_id(data) if self.key else chunk_id(data)

    # -- the index -----------------------------------------------------------------------------
    def index(self) -> PackIndex:
        """The merged index, read on first use."""
        if self._index is None:
            self.refresh()
        assert self._index is not None
        return self._index

    def refresh(self) -> PackIndex:
        """Read the index objects not read yet (another process may have committed a backup)."""
        with self._index_lock:
            index = self._index or PackIndex()
            self._read_index_objects(index)
            self._index = index
            self._last_refresh = time.monotonic()
            return index

    def _read_index_objects(self, index: PackIndex) -> None:
        def take(packs: _IndexPacks) -> None:
            for pack, entries in packs:
                index.add(pack, entries)

        read, problems = self._each_index_object(take, skip=index.objects)
        for problem in problems:
            if problem not in index.problems:
                index.problems.append(problem)
                log.error("%s", problem)
        index.objects.update(read)
        index.seal()

    def _each_index_object(self, take: Callable[[_IndexPacks], None], skip: Collection[str] = ()
                           ) -> tuple[list[str], list[str]]:  # fmt: skip
        """Hand every index object not in ``skip`` to ``take``, decoded as it is consumed (no
        object per entry). The names read, and a line for each that could not be: one a prune
        replaced since the listing is passed over, an outage raises."""
        read: list[str] = []
        problems: list[str] = []
        for name in self.backend.list("index"):
            if name in skip:
                continue
            try:
                take(_decode_index(self._index_object(name)))
            except ObjectMissing:
                continue
            except RepositoryUnavailable:
                raise
            except (RepositoryError, ValueError, KeyError, TypeError) as e:
                problems.append(f"index object {name} is unreadable ({type(e).__name__}: {e})")
                continue
            read.append(name)
        return read, problems

    def _index_object(self, name: str) -> bytes:
        """One index object's bytes, its hash (or seal) checked first: damage never gets as
        far as the decoder."""
        blob = self.backend.load(Handle("index", name))
        if self.key:
            blob = self.key.open(blob, f"index {name}")
        elif chunk_id(blob) != name:
            raise IntegrityError("content does not match its hash")
        return blob

    def locations(self, manifests: Sequence[DiskManifest]) -> list[ChunkLocations]:
        """Where every block of these manifests is stored, read from the index objects one at a
        time and never merged: an agent's peak memory is then its manifests plus at most 32
        bytes a block (the merged index held 48 bytes for each chunk in the repository on top).
        Unreadable index objects are logged and skipped, as when the index is merged; the first
        location given for a block wins, as in the merged index."""
        packs: list[str] = []
        out = [ChunkLocations(m.allocated_count, packs) for m in manifests]
        merged = self._index
        if not any(m.allocated_count for m in manifests):
            return out  # empty disks: nothing to look for
        if merged is not None:  # read already (a restore reads its configs first): no second download
            self._locate_in(merged, manifests, out)
            return out
        lookup = _IdLookup(manifests)
        rows_of = [loc.rows for loc in out]

        def take(index_packs: _IndexPacks) -> None:
            for pack, entries in index_packs:
                no = -1
                for key, offset, length in entries:
                    for mi, k in lookup.holders(key):
                        rows, at = rows_of[mi], 3 * k
                        if rows[at] != ChunkLocations.UNKNOWN:
                            continue
                        if no < 0:
                            no = len(packs)
                            packs.append(pack)
                        rows[at], rows[at + 1], rows[at + 2] = no, offset, length

        for problem in self._each_index_object(take)[1]:
            log.error("%s", problem)
        return out

    @staticmethod
    def _locate_in(index: PackIndex, manifests: Sequence[DiskManifest], out: list[ChunkLocations]) -> None:
        numbers: dict[int, int] = {}  # the index's pack numbers -> those of ``out``
        for m, loc in zip(manifests, out, strict=True):
            for k in range(m.allocated_count):
                found = index.find(m.raw_id(k))
                if found is None:
                    continue
                no = numbers.get(found[0])
                if no is None:
                    no = numbers[found[0]] = len(loc.packs)
                    loc.packs.append(index.pack_name(found[0]))
                loc.rows[3 * k], loc.rows[3 * k + 1], loc.rows[3 * k + 2] = no, found[1], found[2]

    def reload(self, keep_entries: bool = False) -> PackIndex:
        """Read the whole index again from scratch: a prune may have moved chunks to new packs.
        ``keep_entries``: also every pack's list (prune needs it)."""
        with self._index_lock:
            index = PackIndex(keep_entries)
            self._read_index_objects(index)
            self._index = index
            self._last_reload = self._last_refresh = time.monotonic()
            return index

    def drop_index(self) -> None:
        """Let go of the merged index (an agent keeps ``ChunkLocations`` of what it serves
        instead); the next lookup reads it again."""
        with self._index_lock:
            self._index = None

    def locate(self, cid: str) -> Location | None:
        """Where ``cid`` is stored; None when no index names it (a loose chunk, or none at all)."""
        where = self.index().get(cid)
        if where is None and time.monotonic() - self._last_refresh >= _REFRESH_MIN_S:
            where = self.refresh().get(cid)
        return where

    def _where(self, cid: str) -> Location:
        where = self.locate(cid)
        if where is not None:
            return where
        size = self.backend.stat(self.handle(cid))
        if size is None:
            raise IntegrityError(f"chunk {cid} is missing from the repository")
        return Location(None, 0, size)

    # -- writing -------------------------------------------------------------------------------
    def put(self, data: bytes, cid: str | None = None) -> tuple[str, int]:
        """Store ``data`` unless present; return (chunk id, bytes newly written). Stored bytes
        are durable, and readable by others, only after ``flush``."""
        cid, blob = self.pack_ready(data, cid)
        return cid, 0 if blob is None else self.add(cid, blob)

    def pack_ready(self, data: bytes, cid: str | None = None) -> tuple[str, bytes | None]:
        """The costly half of ``put``, safe to run in parallel: the chunk's id and its stored
        bytes (compressed, sealed), or None when the repository has it already."""
        cid = _check_id(cid or self.id_of(data))
        if cid in self._pending_ids or cid in self.index():
            return cid, None
        blob = self._compressor().compress(data)
        if self.key:
            blob = self.key.seal(blob, f"chunk {cid}")
        return cid, blob

    def add(self, cid: str, blob: bytes) -> int:
        """Append a chunk from ``pack_ready`` unless it was stored meanwhile; bytes newly written.
        A backup adds its blocks in disk order, so neighbours on the disk are neighbours in the
        pack and a restore reading in order fetches them in one ranged read. Added as parallel
        workers finished, neighbours swapped places: a restore's batch of neighbouring blocks
        found a gap where a swapped block belonged to the batch before, and split in two (on
        SeaweedFS at 1 MiB blocks, a cold read took 260-280 requests per GiB instead of 167-172)."""
        with self._write_lock:
            if cid in self._pending_ids:
                return 0
            self._append(cid, blob)
        return len(blob)

    def put_blob(self, cid: str, blob: bytes) -> None:
        """Append an already stored chunk's bytes as they are (repacking: no recompression)."""
        with self._write_lock:
            self._append(cid, blob)

    def _append(self, cid: str, blob: bytes) -> None:
        """Add a stored chunk to the open pack (caller holds the write lock)."""
        self._pending_ids.add(cid)
        self._buffer_entries.append((cid, self._buffer_size, len(blob)))
        self._buffer.append(blob)
        self._buffer_size += len(blob)
        if self._buffer_size >= PACK_TARGET:
            self._seal_pack()

    def _seal_pack(self) -> None:
        """Hand the open pack to the uploader (caller holds the write lock)."""
        if not self._buffer:
            return
        entries = self._buffer_entries
        trailer = _encode_trailer(entries)
        if self.key:
            trailer = self.key.seal(trailer, _TRAILER_AAD)
        data = b"".join([*self._buffer, trailer, _TRAILER_TAIL.pack(len(trailer), _TRAILER_MAGIC)])
        self._buffer, self._buffer_entries, self._buffer_size = [], [], 0
        pack = chunk_id(data)
        if self._uploader is None:
            self._uploader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pack-upload")
        self._uploads = [f for f in self._uploads if not f.done() or f.exception() is not None]
        while len(self._uploads) >= _UPLOADS_IN_FLIGHT:  # bounded memory: wait for the oldest
            self._uploads.pop(0).result()
        self._uploads.append(self._uploader.submit(self.backend.save, Handle("packs", pack), data))
        self._unindexed[pack] = entries
        if len(self._unindexed) >= INDEX_EVERY_PACKS:
            self._write_index()

    def _write_index(self) -> None:
        """Wait for the packs' uploads, then name them in one index object (write lock held)."""
        uploads, self._uploads = self._uploads, []
        for f in uploads:
            f.result()  # an upload that failed fails the backup here, before any index names it
        if not self._unindexed:
            return
        name = self.write_index(self._unindexed)
        index = self.index()
        with self._index_lock:
            index.objects.add(name)
            for pack, entries in self._unindexed.items():
                index.add(pack, ((bytes.fromhex(c), o, n) for c, o, n in entries))
            index.seal()
        self._unindexed = {}

    def write_index(self, packs: dict[str, list[tuple[str, int, int]]]) -> str:
        """One index object naming ``packs``; its name."""
        blob = _encode_index(packs)
        name = self.id_of(blob)
        self.backend.save(Handle("index", name), self.key.seal(blob, f"index {name}") if self.key else blob)
        return name

    def flush(self) -> None:
        """Write the open pack and an index naming every pack written: after this, every chunk
        ``put`` so far is readable by any process (call before committing a restore point)."""
        with self._write_lock:
            self._seal_pack()
            self._write_index()
            self._pending_ids.clear()

    def close(self) -> None:
        if self._uploader is not None:
            self._uploader.shutdown(wait=True)
            self._uploader = None

    # -- reading -------------------------------------------------------------------------------
    def stored_size(self, cid: str) -> int:
        return self._where(cid).length

    def get(self, cid: str, expected_size: int) -> bytes:
        """Read, decompress and verify one chunk."""
        return self.fetch(cid, expected_size)[0]

    def fetch(self, cid: str, expected_size: int) -> tuple[bytes, int]:
        """(data, stored bytes) of one chunk, verified: one request, however far the store is."""
        got = self.load_run([self.want(cid, expected_size)])[0]
        if isinstance(got, Exception):
            raise got
        return got

    def want(self, cid: str, size: int) -> Want:
        """What reading ``cid`` takes (may read the index or stat a loose chunk)."""
        return Want(cid, size, self._where(cid))

    def cached_want(self, cid: str, size: int) -> Want | None:
        """``want`` from the index in memory alone, or None: safe on an event loop."""
        where = self._index.get(cid) if self._index is not None else None
        return Want(cid, size, where) if where is not None else None

    def load_run(self, run: Sequence[Want], moved_ok: bool = True) -> list[tuple[bytes, int] | IntegrityError]:
        """Chunks of one pack (or one loose chunk) read with a single ranged request, each
        checked on its own: a damaged chunk fails alone. A transport failure raises for all.
        A pack that is gone may have been repacked by a prune: the index is read again and the
        chunks are looked for where it now says (once)."""
        return list(self.iter_run(run, moved_ok))

    def iter_run(self, run: Sequence[Want], moved_ok: bool = True) -> Iterator[tuple[bytes, int] | IntegrityError]:
        """``load_run`` one chunk at a time: the ranged read is made when the first chunk is
        asked for, and each chunk is decoded only when asked for, so a reader can let go of one
        before the next is decoded."""
        first, last = run[0].where, run[-1].where
        if first.pack is None:
            if len(run) != 1:
                raise ValueError("loose chunks are read one at a time")
            try:
                blob = self.backend.load(self.handle(run[0].cid))
            except ObjectMissing:
                return iter([IntegrityError(f"chunk {run[0].cid} is missing from the repository")])
            return iter([self._decode(run[0], blob, 0, len(blob))])
        return self._iter_span(run, first, last.offset + last.length - first.offset, moved_ok)

    def _iter_span(self, run: Sequence[Want], first: Location, span: int,
                   moved_ok: bool) -> Iterator[tuple[bytes, int] | IntegrityError]:  # fmt: skip
        """The run's chunks from one ranged read the backend may lend rather than copy
        (``load_view``): it is held until the last chunk is decoded, or the reader lets go."""
        assert first.pack is not None
        with contextlib.ExitStack() as stack:
            try:
                data = stack.enter_context(self.backend.load_view(Handle("packs", first.pack), first.offset, span))
            except ObjectMissing:
                if moved_ok and self._moved(first.pack):
                    yield from self._load_moved(run)
                else:
                    yield from (IntegrityError(f"chunk {w.cid} is missing from the repository (object packs/"
                                               f"{first.pack} is gone)") for w in run)  # fmt: skip
                return
            yield from self._decode_span(run, first, data)

    def _decode_span(self, run: Sequence[Want], first: Location,
                     data: bytes | memoryview) -> Iterator[tuple[bytes, int] | IntegrityError]:  # fmt: skip
        for w in run:
            start = w.where.offset - first.offset
            if start + w.where.length > len(data):
                yield IntegrityError(f"chunk {w.cid} is corrupt (object packs/{first.pack} is truncated)")
            else:
                got = self._decode(w, data, start, w.where.length)
                yield IntegrityError(f"{got} (object packs/{first.pack})") if isinstance(got, Exception) else got

    def _moved(self, pack: str) -> bool:
        """Whether a pack that is gone was repacked by a prune: the index no longer names it.
        The index is read again when it still does (at most once a second), or when it was let
        go (``drop_index``); a reader whose locations predate a reload follows the current one."""
        index = self._index
        if index is None or (index.has_pack(pack) and time.monotonic() - self._last_reload >= _REFRESH_MIN_S):
            index = self.reload()
        return not index.has_pack(pack)

    def _load_moved(self, run: Sequence[Want]) -> list[tuple[bytes, int] | IntegrityError]:
        got: dict[str, tuple[bytes, int] | IntegrityError] = {}
        wants = []
        for w in run:
            where = self.locate(w.cid)
            if where is None:
                got[w.cid] = IntegrityError(f"chunk {w.cid} is missing from the repository")
            else:
                wants.append(Want(w.cid, w.size, where))
        for moved in plan_runs(wants):
            got.update((w.cid, r) for w, r in zip(moved, self.load_run(moved, moved_ok=False), strict=True))
        return [got[w.cid] for w in run]

    def _decode(self, w: Want, data: bytes | memoryview, start: int, length: int) -> tuple[bytes, int] | IntegrityError:
        blob = memoryview(data)[start : start + length] if (start or length != len(data)) else data
        try:
            if self.key:
                blob = self.key.open(bytes(blob), f"chunk {w.cid}")
            plain = self._decompressor().decompress(blob, max_output_size=w.size)
        except IntegrityError as e:
            return e
        except zstandard.ZstdError as e:
            return IntegrityError(f"chunk {w.cid} is corrupt (cannot decompress: {e})")
        if len(plain) != w.size or self.id_of(plain) != w.cid:
            return IntegrityError(f"chunk {w.cid} is corrupt (content does not match its hash)")
        return plain, length

    def load_raw(self, where: Location, cid: str) -> bytes:
        """A chunk's stored bytes as they are (repacking copies them without opening them)."""
        h = Handle("packs", where.pack) if where.pack else self.handle(cid)
        data = self.backend.load(h, where.offset, where.length) if where.pack else self.backend.load(h)
        if len(data) != where.length:
            raise IntegrityError(f"chunk {cid} is corrupt (pack {where.pack} is truncated)")
        return data

    def pack_contents(self, pack: str) -> list[tuple[str, int, int]]:
        """(chunk id, offset, length) of every chunk in a stored pack, from the pack alone: its
        trailer, or in a pack written before packs had one, its zstd frames one after another
        (each decoded and hashed, so the id is the chunk's own). An encrypted pack without a
        trailer cannot be split: its sealed chunks carry no length. ValueError when it cannot
        be read so; what a chunk holds is checked again at every read, as always."""
        h = Handle("packs", pack)
        size = self.backend.stat(h)
        if size is None:
            raise ObjectMissing(f"object packs/{pack} is gone")
        tail = self.backend.load(h, size - _TRAILER_TAIL.size, _TRAILER_TAIL.size) if size >= _TRAILER_TAIL.size else b""
        if len(tail) == _TRAILER_TAIL.size:
            length, magic = _TRAILER_TAIL.unpack(tail)
            body_end = size - _TRAILER_TAIL.size
            if magic == _TRAILER_MAGIC and length <= body_end:
                trailer = self.backend.load(h, body_end - length, length)
                if self.key:
                    trailer = self.key.open(trailer, _TRAILER_AAD)
                if len(trailer) % _ENTRY.size:
                    raise ValueError("its trailer is truncated")
                entries = [(c.hex(), o, n) for c, o, n in _ENTRY.iter_unpack(trailer)]
                if any(o + n > body_end - length for _, o, n in entries):
                    raise ValueError("its trailer names bytes past its chunks")
                return entries
        if self.key:
            raise ValueError("it was written before packs named their chunks, and its sealed chunks cannot be told apart")
        return self._split_frames(self.backend.load(h))

    def _split_frames(self, data: bytes) -> list[tuple[str, int, int]]:
        """The chunks of an unencrypted pack without a trailer: one zstd frame each."""
        entries: list[tuple[str, int, int]] = []
        view, pos = memoryview(data), 0
        while pos < len(data):
            frame = zstandard.ZstdDecompressor().decompressobj()
            try:
                plain = frame.decompress(view[pos:])
            except zstandard.ZstdError as e:
                raise ValueError(f"no chunk can be read at offset {pos} ({e})") from None
            if not frame.eof:
                raise ValueError(f"it ends inside the chunk at offset {pos}")
            used = len(data) - pos - len(frame.unused_data)
            entries.append((self.id_of(plain), pos, used))
            pos += used
        return entries

    def iter_ids(self) -> list[str]:
        """Every chunk stored: those the index names, then loose ones."""
        index = self.refresh()
        return list(index.chunk_ids()) + [c for c in self.backend.list("chunks") if c not in index]


def plan_runs(wants: Sequence[Want], max_gap: int = 256 * 1024, max_span: int = 8 * 1024 * 1024) -> list[list[Want]]:
    """Group chunks into ranged reads: same pack, ascending, a gap of at most ``max_gap`` bytes
    between neighbours (reading a little waste beats another round trip) and at most ``max_span``
    bytes per request. Loose chunks are runs of one."""
    runs: list[list[Want]] = []
    ordered = sorted(wants, key=lambda w: (w.where.pack or "", w.where.offset))
    for w in ordered:
        if runs and w.where.pack is not None:
            prev = runs[-1][-1].where
            start = runs[-1][0].where.offset
            if (prev.pack == w.where.pack and 0 <= w.where.offset - (prev.offset + prev.length) <= max_gap
                    and w.where.offset + w.where.length - start <= max_span):  # fmt: skip
                runs[-1].append(w)
                continue
        runs.append([w])
    return runs


@dataclass
class PackPrune:
    packs_deleted: int = 0
    packs_repacked: int = 0
    chunks_deleted: int = 0
    bytes_deleted: int = 0


def prune_packs(store: ChunkStore, live: set[str], apply: bool, repack_below: float = 0.5) -> PackPrune:
    """Drop every chunk not in ``live`` from the packs (the caller holds the maintenance lease,
    so no backup is writing). A pack with no live chunk is deleted; one whose live bytes are under
    ``repack_below`` of it has them copied, as stored, into new packs and is deleted; the rest
    are kept whole. Order makes a prune killed anywhere harmless: new packs, then an index of
    every live chunk, then the old index objects, then the packs nothing names any more."""
    report = PackPrune()
    index = store.reload(keep_entries=True)
    assert index.entries is not None
    if index.problems:  # a pack only that index names would look unindexed, and be deleted
        raise RepositoryError(f"prune stopped, nothing deleted: {index.problems[0]}; "
                              "'liverestore repair-index' rebuilds it from the packs")  # fmt: skip
    old_objects = set(index.objects)  # the repack's own index joins ``index`` below: not to be deleted
    stored = set(store.backend.list("packs"))
    # A live chunk no index names (an index object lost, not damaged) sits in a pack that looks
    # unindexed, and deleting it would lose a backup for good.
    unnamed = [c for c in live if c not in index]
    if unnamed and (lost := set(unnamed) - set(store.backend.list("chunks"))):
        raise RepositoryError(f"prune stopped, nothing deleted: {len(lost)} chunk(s) that restore points use are "
                              f"named by no index object (e.g. {min(lost)}); 'liverestore repair-index' rebuilds the "
                              "index from the packs, 'liverestore verify' names the points concerned")  # fmt: skip
    keep: dict[str, list[tuple[str, int, int]]] = {}
    repack: list[tuple[str, Location]] = []
    drop: set[str] = set(stored - set(index.entries))  # unindexed: left by a backup that died
    report.bytes_deleted += sum(store.backend.stat(Handle("packs", p)) or 0 for p in drop)
    for pack, entries in index.entries.items():
        mine = [e for e in entries if e[0] in live and (w := index.get(e[0])) is not None and w.pack == pack]
        total = sum(n for _, _, n in entries)
        used = sum(n for _, _, n in mine)
        report.chunks_deleted += len(entries) - len(mine)
        if not mine or pack not in stored:
            drop.add(pack)
            report.bytes_deleted += total if pack in stored else 0
        elif used < repack_below * total:
            drop.add(pack)
            report.packs_repacked += 1
            report.bytes_deleted += total - used
            repack.extend((cid, Location(pack, off, n)) for cid, off, n in mine)
        else:
            keep[pack] = mine  # its dead bytes stay until enough of it is dead to repack
    report.packs_deleted = len(drop)
    if not apply:
        return report
    for cid, where in repack:
        store.put_blob(cid, store.load_raw(where, cid))
    store.flush()  # the repacked chunks' new packs and their index
    name = store.write_index(keep) if keep else ""
    for old in old_objects - {name}:
        store.backend.remove(Handle("index", old))
    for pack in drop:
        store.backend.remove(Handle("packs", pack))
    store.reload()
    return report
