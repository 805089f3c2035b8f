"""Value types shared by the commands' options, so a bad value fails at parse time, before a
restore builds, launches or writes anything, with click's one-line "Invalid value" and exit 2."""

from __future__ import annotations

import click

ACCELERATORS = click.Choice(["tcg", "kvm"])
"""QEMU accelerators a restore may use; anything else QEMU would refuse only after launch."""

NOT_NEGATIVE = click.FloatRange(min=0)
"""Emulated latency and bandwidth (0 turns the emulation off) and the shutdown timeout (0 forces
the VM off at once): a negative value means nothing."""

SECONDS = click.FloatRange(min=0, min_open=True)
"""Boot windows and quiet periods: a window of 0 s records an empty boot profile as a run."""

GUEST_MEMORY_MIB = click.IntRange(min=16)
"""Guest memory: QEMU reads ``-m 0`` as its 128 MiB default and below 16 MiB no firmware boots."""
