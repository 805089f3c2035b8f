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
that prune removes. Repositories from before packs keep their loose ``chunks/<id>`` objects,
which are still read.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import blake3
import zstandard

from liverestore.errors import IntegrityError, RepositoryError, RepositoryUnavailable
from liverestore.repository.backend import Backend, Handle, ObjectMissing
from liverestore.repository.crypto import MasterKey

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


@dataclass(frozen=True)
class Location:
    """Where one chunk's stored bytes are: ``pack`` is None for a loose chunk object."""

    pack: str | None
    offset: int
    length: int


@dataclass(frozen=True)
class Want:
    """One chunk a reader needs: its id and uncompressed size, and where it is stored."""

    cid: str
    size: int
    where: Location


_RECORD = struct.Struct("<32sIII")  # chunk id, pack number, offset, length


class PackIndex:
    """Every index object read so far, merged into chunk id → location.

    Held as flat records, because an agent keeps it while it serves: 44 bytes a chunk (a dict
    of Python objects took about 250). Chunk ids are uniform hashes, so the records are grouped
    into buckets by their leading bits — about four records a bucket — and a lookup scans one
    bucket. ``add`` collects records; ``seal`` regroups them and publishes the new table in one
    assignment, so lookups from other threads never see half of it. The first record of a chunk
    wins (a chunk stored twice is found where it was first indexed). With ``keep_entries``
    (prune) it also keeps every pack's full list, duplicates included."""

    def __init__(self, keep_entries: bool = False) -> None:
        self._pack_ids: list[str] = []
        self._pack_no: dict[str, int] = {}
        self._pending = bytearray()
        self._table: tuple[bytes, array[int], int] = (b"", array("I", [0, 0]), 0)  # records, bucket starts, bits
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
            self._pending += _RECORD.pack(key, no, offset, length)
            if listed is not None:
                listed.append((key.hex(), offset, length))

    def seal(self) -> None:
        """Regroup every record (old ones first, in their order, then the added ones)."""
        if not self._pending:
            return
        old = self._table[0]
        size = _RECORD.size
        n = (len(old) + len(self._pending)) // size
        bits = max(0, (n // 4).bit_length())
        counts = array("I", bytes(4 * ((1 << bits) + 1)))
        for source in (old, self._pending):
            for r in range(0, len(source), size):
                counts[int.from_bytes(source[r : r + 4], "big") >> (32 - bits) if bits else 0] += 1
        starts = array("I", bytes(4 * ((1 << bits) + 1)))
        for b in range(1 << bits):
            starts[b + 1] = starts[b] + counts[b]
        fill = array("I", starts)
        grouped = bytearray(n * size)
        for source in (old, self._pending):
            for r in range(0, len(source), size):
                b = int.from_bytes(source[r : r + 4], "big") >> (32 - bits) if bits else 0
                at = fill[b] * size
                grouped[at : at + size] = source[r : r + size]
                fill[b] += 1
        self._table = (bytes(grouped), starts, bits)
        self._pending = bytearray()

    def get(self, cid: str) -> Location | None:
        key = bytes.fromhex(cid)
        records, starts, bits = self._table
        b = int.from_bytes(key[:4], "big") >> (32 - bits) if bits else 0
        size = _RECORD.size
        for at in range(starts[b] * size, starts[b + 1] * size, size):
            if records[at : at + 32] == key:
                _, no, offset, length = _RECORD.unpack_from(records, at)
                return Location(self._pack_ids[no], offset, length)
        return None

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, str) and self.get(cid) is not None

    def __len__(self) -> int:
        return len(self._table[0]) // _RECORD.size

    def chunk_ids(self) -> Iterator[str]:
        """Each indexed chunk once."""
        records, seen = self._table[0], set()
        for at in range(0, len(records), _RECORD.size):
            key = records[at : at + 32]
            if key not in seen:
                seen.add(key)
                yield key.hex()

    def has_pack(self, pack: str) -> bool:
        return pack in self._pack_no


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


def _decode_index(blob: bytes) -> Iterator[tuple[str, Iterator[tuple[bytes, int, int]]]]:
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
        yield pack, (_ENTRY.unpack_from(data, first + k * _ENTRY.size) for k in range(count))


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
        for name in self.backend.list("index"):
            if name in index.objects:
                continue
            try:
                self.load_index_object(name, index)
            except ObjectMissing:
                continue  # replaced by a prune since the listing
            except RepositoryUnavailable:
                raise
            except (RepositoryError, ValueError, KeyError, TypeError) as e:
                problem = f"index object {name} is unreadable ({type(e).__name__}: {e})"
                if problem not in index.problems:
                    index.problems.append(problem)
                    log.error("%s", problem)
                continue
            index.objects.add(name)
        index.seal()

    def load_index_object(self, name: str, into: PackIndex) -> None:
        """Read one index object into ``into``, streaming: no object per entry beyond the kept key.
        Its hash (or seal) is checked first, so damage never gets as far as the decoder."""
        blob = self.backend.load(Handle("index", name))
        if self.key:
            blob = self.key.open(blob, f"index {name}")
        elif chunk_id(blob) != name:
            raise IntegrityError("content does not match its hash")
        for pack, entries in _decode_index(blob):
            into.add(pack, entries)

    def reload(self, keep_entries: bool = False) -> PackIndex:
        """Read the whole index again from scratch: a prune may have moved chunks to new packs.
        ``keep_entries``: also every pack's list (prune needs it)."""
        with self._index_lock:
            index = PackIndex(keep_entries)
            self._read_index_objects(index)
            self._index = index
            self._last_reload = self._last_refresh = time.monotonic()
            return index

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
        cid = _check_id(cid or self.id_of(data))
        if cid in self._pending_ids or cid in self.index():
            return cid, 0
        blob = self._compressor().compress(data)
        if self.key:
            blob = self.key.seal(blob, f"chunk {cid}")
        with self._write_lock:
            if cid in self._pending_ids:
                return cid, 0
            self._append(cid, blob)
        return cid, len(blob)

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
        data = b"".join(self._buffer)
        entries = self._buffer_entries
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
        first, last = run[0].where, run[-1].where
        if first.pack is None:
            if len(run) != 1:
                raise ValueError("loose chunks are read one at a time")
            try:
                blob = self.backend.load(self.handle(run[0].cid))
            except ObjectMissing:
                return [IntegrityError(f"chunk {run[0].cid} is missing from the repository")]
            return [self._decode(run[0], blob, 0, len(blob))]
        span = last.offset + last.length - first.offset
        h = Handle("packs", first.pack)
        try:
            data = self.backend.load(h, first.offset, span)
        except ObjectMissing:
            if moved_ok and time.monotonic() - self._last_reload >= _REFRESH_MIN_S and not self.reload().has_pack(first.pack):
                return self._load_moved(run)
            return [IntegrityError(f"chunk {w.cid} is missing from the repository (object packs/{first.pack} "
                                   "is gone)") for w in run]  # fmt: skip
        out: list[tuple[bytes, int] | IntegrityError] = []
        for w in run:
            start = w.where.offset - first.offset
            if start + w.where.length > len(data):
                out.append(IntegrityError(f"chunk {w.cid} is corrupt (object packs/{first.pack} is truncated)"))
            else:
                got = self._decode(w, data, start, w.where.length)
                out.append(IntegrityError(f"{got} (object packs/{first.pack})") if isinstance(got, Exception) else got)
        return out

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

    def _decode(self, w: Want, data: bytes, start: int, length: int) -> tuple[bytes, int] | IntegrityError:
        blob = data[start : start + length] if (start or length != len(data)) else data
        try:
            if self.key:
                blob = self.key.open(blob, f"chunk {w.cid}")
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
        raise RepositoryError(f"prune stopped, nothing deleted: {index.problems[0]}")
    old_objects = set(index.objects)  # the repack's own index joins ``index`` below: not to be deleted
    stored = set(store.backend.list("packs"))
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
