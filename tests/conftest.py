from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from liverestore.agent.agent import AgentConfig
from liverestore.backup import run_backup
from liverestore.repository import Repository, RestorePoint
from tests.helpers import AgentThread, make_disk

pytest_plugins = ["tests.libvirtfixtures", "tests.vmfixtures", "tests.s3fixtures"]  # vmfixtures imports libvirtfixtures


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-cases", type=int, default=3000, help="NBD fuzz cases (soak: 200000)")
    parser.addoption("--fuzz-seed", type=int, default=20261125, help="seed of the NBD fuzz campaign")


@pytest.fixture(scope="session", autouse=True)
def _data_dir_of_this_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Catalogs of remote and encrypted repositories, run state and caches go to a data dir of
    this run, never the user's: state kept in a home between two runs must not decide a test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
        yield


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    r = Repository.init(tmp_path / "repo")
    yield r
    r.close()


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "src" / "disk0.raw"
    path.parent.mkdir()
    return path, make_disk(path)


@pytest.fixture
def point(repo: Repository, disk: tuple[Path, bytes]) -> RestorePoint:
    return run_backup(repo, "vm1", [disk[0]], [])[0]


AgentFactory = Callable[..., AgentThread]


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[AgentFactory]:
    started: list[AgentThread] = []

    def start(repo: Repository, point: RestorePoint, **kw: object) -> AgentThread:
        kw.setdefault("cache_dir", tmp_path / "cache")
        a = AgentThread(repo, point, AgentConfig(**kw))  # type: ignore[arg-type]
        started.append(a)
        return a

    yield start
    for a in started:
        a.close()
