"""Validation of VM and disk names: they become NBD export names (``vm/disk``) and file names."""

import re

from liverestore.errors import LiverestoreError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise LiverestoreError(
            f"{kind} name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def vm_at_point(spec: str, point: str | None = None) -> tuple[str, str | None]:
    """``VM`` or ``VM@POINT`` (a point id or a unique prefix of one), as ``--vm`` takes it where
    several VMs may be named; a bare ``VM`` gets ``point``."""
    vm, at, pid = spec.partition("@")
    if at and (not vm or not pid):
        raise LiverestoreError(f"--vm {spec!r}: write VM or VM@POINT")
    return vm, (pid if at else point)
