"""User-facing errors.

Every failure an operator can cause or meet is raised as a ``LiverestoreError`` so that the CLI
can print exactly one line and exit non-zero; anything else reaching the top is a bug.
"""


class LiverestoreError(Exception):
    """An error whose message is complete enough to be the only line an operator sees."""


class RepositoryError(LiverestoreError):
    """The repository is missing, malformed, or does not hold what was asked for."""


class RepositoryUnavailable(RepositoryError):
    """The repository cannot be reached right now (unmounted, I/O error): worth retrying."""


class IntegrityError(RepositoryError):
    """Stored data does not match its hash: serving it would mean serving wrong bytes."""


class DiskFormatError(LiverestoreError):
    """A source disk is not a raw or qcow2 image we can read."""
