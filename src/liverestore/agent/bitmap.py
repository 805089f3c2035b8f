"""A bit per block: which blocks of a disk a file holds, or which the agent fetched and nobody read.

A ``bytearray`` and shifts, not a set of block numbers: 1 TiB of 64 KiB blocks is 2 MiB of bits,
where a set of ints would take gigabytes.
"""

from __future__ import annotations


class Bitmap:
    __slots__ = ("bits",)

    def __init__(self, count: int) -> None:
        self.bits = bytearray(-(-count // 8))

    def has(self, idx: int) -> bool:
        return bool(self.bits[idx >> 3] & (1 << (idx & 7)))

    def set(self, idx: int) -> bool:
        """Set bit ``idx``; True if it was clear."""
        byte, bit = idx >> 3, 1 << (idx & 7)
        if self.bits[byte] & bit:
            return False
        self.bits[byte] |= bit
        return True

    def clear(self, idx: int) -> bool:
        """Clear bit ``idx``; True if it was set."""
        byte, bit = idx >> 3, 1 << (idx & 7)
        if not self.bits[byte] & bit:
            return False
        self.bits[byte] &= ~bit & 0xFF
        return True

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self.bits)
