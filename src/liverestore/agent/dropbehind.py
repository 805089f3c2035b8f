"""Let the host's page cache go of read-cache data once the read it was fetched for has it.

A relocation streams every allocated block through the read-cache file once: fetched, written,
sent to the mirror, and not read from host memory again (the guest keeps its own page cache, and
after the pivot nobody reads the agent). Left to the kernel, relocating 8 GiB grows the host's
page cache by 8 GiB, memory a hypervisor host holds for its VMs. On a host whose free memory goes
back to the hypervisor under it (virtio-balloon free page reporting, as on the cloud machines
this project is tested on), every new page also costs the hypervisor a fault: writes into a fresh
cache file ran at 0.26-0.30 GiB/s there. Written back and dropped, the same pages are used again
at 1.6-1.8 GiB/s. For the same reason ``dd oflag=nocache`` and QEMU's ``cache=none`` exist.

Which pages go: only those of blocks this agent fetched itself, and only once one read has taken
the whole block. Blocks warm at start, prefetched blocks nobody has read yet (set 1's boot
blocks, set 2's copies waiting for the mirror) and blocks read piecemeal by small guest reads stay
where the kernel put them. Each full batch is let go one batch later, in a thread of its own, so a
read still being sent from the page cache is not dropped under it (if it were, ``sendfile``
would read it back from disk: slower, never wrong). Dropping is a hint: it never loses data, since
only written-back pages are dropped, and it never fails a read.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from liverestore.agent.blockfile import BlockFile

log = logging.getLogger("liverestore.dropbehind")

BATCH_BYTES = 32 * 1024 * 1024  # twice what 16 reads of 1 MiB in flight (QEMU's mirror) hold
BACKLOG = 8  # batches queued for the worker at most; beyond, the kernel keeps them (a slow disk)


class DropBehind:
    """Batches of (cache file, offset, length) ranges whose pages may go, shared by one agent's
    exports. ``release`` is called on the event loop; the dropping runs in one worker thread,
    which waits for the write-back of each range before dropping it. When the cache disk writes
    back slower than fetches arrive, batches beyond ``BACKLOG`` are left to the kernel rather
    than queued without end."""

    def __init__(self, batch_bytes: int = BATCH_BYTES) -> None:
        self.batch_bytes = batch_bytes
        self.dropped_bytes = 0  # handed to the worker (the kernel may keep pages it cannot drop)
        self._batch: list[tuple[BlockFile, int, int]] = []
        self._batch_size = 0
        self._held: list[tuple[BlockFile, int, int]] = []  # the previous full batch, let go next
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drop-behind")
        self._closed = False
        self._backlog = threading.BoundedSemaphore(BACKLOG)

    def release(self, file: BlockFile, offset: int, length: int) -> None:
        if self._closed:  # a read that finished while the agent was closing
            return
        self._batch.append((file, offset, length))
        self._batch_size += length
        if self._batch_size < self.batch_bytes:
            return
        ready, self._held = self._held, self._batch
        self._batch, self._batch_size = [], 0
        if ready and self._backlog.acquire(blocking=False):
            self.dropped_bytes += sum(n for _, _, n in ready)
            self._pool.submit(self._drop, ready)

    def _drop(self, ranges: list[tuple[BlockFile, int, int]]) -> None:
        try:
            _drop(ranges)
        finally:
            self._backlog.release()

    def close(self) -> None:
        """Pending ranges stay in the page cache: the kernel frees them when it needs to."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


def _drop(ranges: list[tuple[BlockFile, int, int]]) -> None:
    """In the worker: neighbouring ranges of one file merged, then written back and dropped."""
    per_file: defaultdict[BlockFile, list[tuple[int, int]]] = defaultdict(list)
    for file, offset, length in ranges:
        per_file[file].append((offset, length))
    for file, spans in per_file.items():
        spans.sort()
        merged = [spans[0]]
        for offset, length in spans[1:]:
            last_off, last_len = merged[-1]
            if offset <= last_off + last_len:
                merged[-1] = (last_off, max(last_len, offset + length - last_off))
            else:
                merged.append((offset, length))
        try:
            file.drop_pages(merged)
        except OSError as e:  # a hint only; a failing cache disk shows up at the next persist
            log.debug("%s: cannot drop cached pages: %s", file.data_path, e.strerror)
