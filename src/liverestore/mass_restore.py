"""Several VMs restored at once from one media agent (the morning after a site is lost).

Each VM is an ``InstantRestore`` of its own — its own phases, report, state file and abort — but
all of them read through one agent: one NBD port, one fetch scheduler whose tenants are the
restore points (so one VM's relocation or background copy cannot hold up another VM's boot
reads), one pool of repository connections and one emulated link. A refusal of any VM refuses
the whole command before anything starts; a VM that fails later is aborted alone (only the VM
its own restore started is stopped) while the others go on; the command then exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

from liverestore.agent.agent import MediaAgent
from liverestore.errors import LiverestoreError
from liverestore.repository import Repository
from liverestore.restore import InstantRestore, RestoreOptions, RestoreReport, Status, agent_config

log = logging.getLogger("liverestore.mass_restore")


class MassRestore:
    def __init__(
        self, repo: Repository, options: list[RestoreOptions], on_status: Callable[[Status], None] | None = None
    ) -> None:
        if not options:
            raise LiverestoreError("no VM to restore")
        names = Counter(o.name or o.vm for o in options)
        twice = [n for n, k in names.items() if k > 1]
        if twice:
            raise LiverestoreError(f"VM {twice[0]} is named twice: one restore per VM name (--name renames one)")
        self.repo = repo
        self.options = options
        self.restores = [InstantRestore(repo, o, on_status) for o in options]
        self.agent: MediaAgent | None = None

    async def run(self) -> list[RestoreReport | BaseException]:
        """Every VM's report, or the error that ended its restore, in the order given."""
        planned: list[InstantRestore] = []
        served: dict[str, set[str]] = {}
        try:  # refusals first, for every VM: nothing has started yet
            for r in self.restores:
                served[r.point.id] = await r.plan()
                planned.append(r)
            for r in self.restores:
                await r.copy_side_files()
            first = self.options[0]
            self.agent = MediaAgent(self.repo, [r.point for r in self.restores],
                                    agent_config(first, first.cache_dir.absolute()), disks=served)  # fmt: skip
            await self.agent.listen("127.0.0.1", 0)
        except BaseException:
            for r in planned:
                await r.abort()
            await self._close_agent()
            raise
        log.info("restoring %d VMs from one agent on port %d", len(self.restores), self.agent.port)
        return list(await asyncio.gather(*(r.run_on(self.agent) for r in self.restores), return_exceptions=True))

    async def close(self, stop_vm: bool = True, shutdown_timeout: float = 0) -> None:
        """Release every VM's point and stop the agent; stop the VMs too when asked."""
        await asyncio.gather(*(r.close(stop_vm=stop_vm, shutdown_timeout=shutdown_timeout) for r in self.restores),
                             return_exceptions=True)  # fmt: skip
        await self._close_agent()

    async def _close_agent(self) -> None:
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
