"""A bootable test VM built from Debian packages with no root and no mounts (tests, demo, bench)."""

from liverestore.testvm.builder import BuiltImage, build_test_vm

__all__ = ["BuiltImage", "build_test_vm"]
