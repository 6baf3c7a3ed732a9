"""A deliberately naive reference model of lib/genalloc.c and lib/bitmap.c.

One bool per granule, list walks, the kernel's loops written as the kernel writes
them (restart after every set bit), and the kernel's unsigned 64-bit arithmetic
(``unsigned long`` addresses, ``phys_addr_t``, ``size_t``: every sum taken modulo
2**64).  It is slow and obviously right; uvdma's GenPool must return exactly what
this returns for the same calls, except where docs/genalloc.md's table of
differences says otherwise (the tests spell each of those out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

U64 = 1 << 64
MASK = U64 - 1


def u64(x: int) -> int:
    """The value as the kernel's unsigned long holds it: modulo 2**64."""
    return x & MASK


def find_next_zero_bit(m: list[bool], size: int, start: int) -> int:
    for i in range(start, size):
        if not m[i]:
            return i
    return size


def find_next_bit(m: list[bool], size: int, start: int) -> int:
    for i in range(start, size):
        if m[i]:
            return i
    return size


def find_next_zero_area_off(
    m: list[bool], size: int, start: int, nr: int, align_mask: int, align_offset: int
) -> int:
    """bitmap_find_next_zero_area_off, line for line."""
    while True:
        index = find_next_zero_bit(m, size, start)
        index = ((index + align_offset + align_mask) & ~align_mask) - align_offset
        end = index + nr
        if end > size:
            return end
        i = find_next_bit(m, end, index)
        if i < end:
            start = i + 1
            continue
        return index


def best_fit(m: list[bool], size: int, start: int, nr: int) -> int:
    """gen_pool_best_fit, line for line."""
    start_bit, length = size, size + 1
    index = find_next_zero_area_off(m, size, start, nr, 0, 0)
    while index < size:
        next_bit = find_next_bit(m, size, index + nr)
        if next_bit - index < length:
            length = next_bit - index
            start_bit = index
            if length == nr:
                return start_bit
        index = find_next_zero_area_off(m, size, next_bit + 1, nr, 0, 0)
    return start_bit


def free_runs(m: list[bool]) -> dict[int, int]:
    """Every maximal run of free granules, first granule -> end (exclusive)."""
    runs: dict[int, int] = {}
    i = 0
    while i < len(m):
        if m[i]:
            i += 1
            continue
        j = i
        while j < len(m) and not m[j]:
            j += 1
        runs[i] = j
        i = j
    return runs


Algo = Literal["first_fit", "first_fit_align", "fixed", "order_align", "best_fit"]


def run_algo(
    algo: Algo, m: list[bool], size: int, nr: int, order: int, start_addr: int, arg: int
) -> int:
    """The five gen_pool_* algorithms; ``arg`` is the alignment or the fixed offset."""
    if algo == "first_fit":
        return find_next_zero_area_off(m, size, 0, nr, 0, 0)
    if algo == "first_fit_align":
        mask = ((arg + (1 << order) - 1) >> order) - 1
        off = (start_addr & (arg - 1)) >> order
        return find_next_zero_area_off(m, size, 0, nr, mask, off)
    if algo == "fixed":
        if arg & ((1 << order) - 1):
            return size
        offset_bit = arg >> order
        s = find_next_zero_area_off(m, size, offset_bit, nr, 0, 0)
        return s if s == offset_bit else size
    if algo == "order_align":
        mask = (1 << (nr - 1).bit_length()) - 1
        return find_next_zero_area_off(m, size, 0, nr, mask, 0)
    return best_fit(m, size, 0, nr)


@dataclass
class RefChunk:
    start: int
    end: int  # inclusive
    phys: int
    owner: object
    avail: int
    bits: list[bool] = field(default_factory=list)


#: "wraps": addr + size - 1 wrapped past 2**64 and passed the BUG_ON, so the kernel
#: goes on to clear bits past the chunk's bitmap (the model changes nothing).
FreeOutcome = Literal["ok", "not_in_pool", "crosses", "not_allocated", "wraps"]


@dataclass
class RefPool:
    order: int
    chunks: list[RefChunk] = field(default_factory=list)  # newest first

    def add(self, virt: int, phys: int, size: int, owner: object) -> None:
        """gen_pool_add_owner; ``phys`` -1 is gen_pool_add's (phys_addr_t)-1."""
        nbits = size >> self.order
        chunk = RefChunk(virt, u64(virt + size - 1), u64(phys), owner, size, [False] * nbits)
        self.chunks.insert(0, chunk)

    def alloc(self, size: int, algo: Algo, arg: int) -> tuple[int, object]:
        if size == 0:
            return 0, None
        nbits = (size + (1 << self.order) - 1) >> self.order
        for c in self.chunks:
            if size > c.avail:
                continue
            end_bit = len(c.bits)
            s = run_algo(algo, c.bits, end_bit, nbits, self.order, c.start, arg)
            if s >= end_bit:
                continue
            for i in range(s, s + nbits):
                c.bits[i] = True
            c.avail -= nbits << self.order
            return c.start + (s << self.order), c.owner
        return 0, None

    def free(self, addr: int, size: int) -> tuple[FreeOutcome, object]:
        nbits = (size + (1 << self.order) - 1) >> self.order
        for c in self.chunks:
            if c.start <= addr <= c.end:
                if u64(addr + size - 1) > c.end:
                    return "crosses", None
                if addr + size - 1 > c.end:
                    return "wraps", None
                s = (addr - c.start) >> self.order
                if s + nbits > len(c.bits) or not all(c.bits[s : s + nbits]):
                    return "not_allocated", None
                for i in range(s, s + nbits):
                    c.bits[i] = False
                c.avail += nbits << self.order
                return "ok", c.owner
        return "not_in_pool", None

    def avail(self) -> int:
        return sum(c.avail for c in self.chunks)

    def size(self) -> int:
        return sum(c.end - c.start + 1 for c in self.chunks)

    def virt_to_phys(self, addr: int) -> int:
        for c in self.chunks:
            if c.start <= addr <= c.end:
                return u64(c.phys + addr - c.start)
        return u64(-1)

    def has_addr(self, start: int, size: int) -> bool:
        end = u64(start + size - 1)
        return any(c.start <= start <= c.end and end <= c.end for c in self.chunks)
