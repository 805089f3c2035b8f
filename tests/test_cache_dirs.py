"""Read-cache directories: locked while an agent uses them, listed and pruned otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from liverestore.agent.agent import AgentConfig, MediaAgent
from liverestore.errors import LiverestoreError
from liverestore.repository import Repository, RestorePoint
from tests.conftest import AgentFactory


def test_a_second_agent_on_the_same_cache_is_refused(
    repo: Repository, point: RestorePoint, tmp_path: Path, start_agent: AgentFactory
) -> None:
    a = start_agent(repo, point)
    with pytest.raises(LiverestoreError, match="is in use by another agent or restore"):
        MediaAgent(repo, point, AgentConfig(cache_dir=tmp_path / "cache"))
    a.close()
    b = MediaAgent(repo, point, AgentConfig(cache_dir=tmp_path / "cache"))  # the lock went with agent a
    assert b.exports


def test_cache_prune_removes_idle_caches_and_keeps_those_in_use(
    repo: Repository, point: RestorePoint, tmp_path: Path, start_agent: AgentFactory
) -> None:
    root = tmp_path / "cache"
    stale = root / "old-vm-123"
    stale.mkdir(parents=True)
    (stale / "vda.cache").write_bytes(b"x" * 100_000)
    agent = start_agent(repo, point)
    busy = agent.agent.cache_dir

    def lr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "liverestore", *args], capture_output=True, text=True)

    listing = lr("cache", "list", "--cache-dir", str(root))
    assert "old-vm-123" in listing.stdout and "IN USE" in listing.stdout
    young = lr("cache", "prune", "--cache-dir", str(root), "--older-than", "1d")
    assert young.returncode == 0 and "removed 0 read-cache(s)" in young.stdout and stale.exists()
    r = lr("cache", "prune", "--cache-dir", str(root))
    assert r.returncode == 0 and "removed 1 read-cache(s)" in r.stdout and "1 in use and kept" in r.stdout
    assert not stale.exists() and busy.exists()
    bad = lr("cache", "prune", "--cache-dir", str(root), "--older-than", "soon")
    assert bad.returncode == 1 and "invalid age" in bad.stderr
