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
from pathlib import Path

from liverestore.agent.agent import MediaAgent
from liverestore.errors import LiverestoreError
from liverestore.repository import Repository
from liverestore.restore import (
    InstantRestore,
    RestoreOptions,
    RestoreReport,
    Status,
    agent_config,
    needs_agent,
)

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
        for r in self.restores:  # each state file names the others: they are resumed together
            r.agent_shared_with = [q.name for q in self.restores if q is not r]
        self.agent: MediaAgent | None = None
        self.results: list[RestoreReport | BaseException] = []

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
        self.results = list(await asyncio.gather(*(r.run_on(self.agent) for r in self.restores),
                                                 return_exceptions=True))  # fmt: skip
        return self.results

    async def resume(self) -> list[RestoreReport | BaseException]:
        """Resume a mass restore whose orchestrator died: one agent on the port they all share,
        serving every point again, then each VM is adopted and relocated as ``restore --resume``
        does for one. VMs the states do not show as restored together are refused."""
        states = [r.load_resume_state() for r in self.restores]
        ports = {int(st["nbd_port"]) for st in states}
        caches = {st["cache_dir"] for st in states}
        if len(ports) > 1 or len(caches) > 1:
            raise LiverestoreError("these VMs were not restored together (their agents had different ports or "
                                   "caches): resume each with its own restore --resume")  # fmt: skip
        missing = sorted({n for st in states for n in st.get("agent_shared_with", [])}
                         - {r.name for r in self.restores})  # fmt: skip
        unfinished = [n for n in missing if needs_agent(self.options[0].dest.absolute(), n)]
        if unfinished:
            raise LiverestoreError(f"{', '.join(unfinished)} shared the agent too and are not finished: "
                                   "name every unfinished VM of that restore")  # fmt: skip
        served = {r.point.id: {d["name"] for d in st["disks"]} for r, st in zip(self.restores, states, strict=True)}
        try:  # the restores' own options: load_resume_state put back the TLS credentials they used
            self.agent = MediaAgent(self.repo, [r.point for r in self.restores],
                                    agent_config(self.restores[0].opts, Path(caches.pop())), disks=served)  # fmt: skip
            await self.agent.listen("127.0.0.1", ports.pop())
        except BaseException:
            await self._close_agent()  # the VMs keep running from backup, waiting for an agent
            raise
        self.results = list(await asyncio.gather(*(r.resume_on(self.agent) for r in self.restores),
                                                 return_exceptions=True))  # fmt: skip
        return self.results

    async def close(self, stop_vm: bool = True, shutdown_timeout: float = 0) -> None:
        """Release every VM's point and stop the agent; with ``stop_vm``, stop the VMs this
        command restored. A VM whose restore failed is never stopped here: a failed new restore
        stopped its own VM already, and a failed resume leaves the VM it found running."""
        restored = {id(r) for r, res in zip(self.restores, self.results, strict=False) if isinstance(res, RestoreReport)}
        await asyncio.gather(*(r.close(stop_vm=stop_vm and id(r) in restored, shutdown_timeout=shutdown_timeout)
                               for r in self.restores), return_exceptions=True)  # fmt: skip
        await self._close_agent()

    async def _close_agent(self) -> None:
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
