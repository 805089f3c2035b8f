"""liverestore: instant VM recovery from a deduplicated backup repository."""

__version__ = "0.1.0"
