"""The IOVA space of one IOMMU domain: free ranges, handed out within windows [lo, hi].

The usable ranges are the ones the kernel reports (type1's IOVA_RANGE capability,
iommufd's IOAS_IOVA_RANGES), with the x86 MSI window (0xFEE00000-0xFEEFFFFF) and page 0
always left out.  An allocation names the windows it may use, in the order to try them
(each [lo, hi], both ends inclusive), and gets the first fit in the first window that
has room: every byte of the range lies inside that window.  What a window means (a zone,
a device's mask) is the caller's business; this allocator knows nothing of zones.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from uvdma.errors import IovaError, IovaExhaustedError

U64_MAX = (1 << 64) - 1


class IovaRange(NamedTuple):
    """A range of IOVAs, both ends inclusive (as the kernel reports them)."""

    start: int
    last: int


#: A window an IOVA may be chosen in: (lo, hi), both ends inclusive.
Window = tuple[int, int]
#: A free run of the allocator: [start, end), end exclusive.
_Run = tuple[int, int]

MSI_WINDOW = IovaRange(0xFEE0_0000, 0xFEEF_FFFF)  # x86: writes here are interrupts, not memory
#: The whole IOVA space as one window.
ANYWHERE: tuple[IovaRange, ...] = (IovaRange(0, U64_MAX),)


class IovaSpace:
    """Free IOVA ranges of one domain; hands out aligned ranges within windows. Thread-safe.

    ``ranges`` are the usable ranges as (start, last) with ``last`` inclusive; the ones left
    after the reserved holes are in :attr:`ranges` as :class:`IovaRange`.
    """

    def __init__(
        self,
        ranges: Iterable[Window],
        *,
        reserved: Iterable[Window] = (MSI_WINDOW,),
        min_iova: int = 4096,
    ) -> None:
        self._lock = threading.Lock()
        # free list: sorted, disjoint, half-open [start, end)
        free: list[_Run] = []
        for start, last in sorted(ranges):
            free = _merge(free, max(start, min_iova), last + 1)
        for start, last in reserved:
            free = _cut(free, start, last + 1)
        self._free = free
        self._starts = [s for s, _ in free]
        self._used: dict[int, int] = {}
        self.ranges = [IovaRange(s, e - 1) for s, e in free]

    def alloc(self, size: int, align: int = 4096, windows: Sequence[Window] = ANYWHERE) -> int:
        """An IOVA for ``size`` bytes aligned to ``align``, wholly inside the first of
        ``windows`` that has room (each window [lo, hi], inclusive)."""
        if size <= 0 or align <= 0 or align & (align - 1):
            raise IovaError(f"bad IOVA request: size {size}, alignment {align} (power of two)")
        with self._lock:
            for lo, hi in windows:
                iova = self._first_fit(size, align, lo, hi + 1)
                if iova is not None:
                    self._take(iova, size)
                    return iova
            free = sum(self._free_in(lo, hi) for lo, hi in windows)
        shown = ", ".join(f"[{lo:#x}, {hi:#x}]" for lo, hi in windows)
        raise IovaExhaustedError(
            f"no free IOVA range of {size:#x} bytes aligned to {align:#x} in {shown} "
            f"({free:#x} bytes free there, fragmented or too small): unmap memory you no "
            "longer need, or allow a wider DMA mask"
        )

    def fits(self, size: int, align: int = 4096, windows: Sequence[Window] = ANYWHERE) -> bool:
        """Whether :meth:`alloc` with these arguments would succeed now (taking nothing):
        the check to make before allocating memory that would have nowhere to go."""
        if size <= 0 or align <= 0 or align & (align - 1):
            return False
        with self._lock:
            return any(self._first_fit(size, align, lo, hi + 1) is not None for lo, hi in windows)

    def reserve(self, iova: int, size: int) -> None:
        """Take exactly [iova, iova + size), which must be free."""
        with self._lock:
            i = bisect.bisect_right(self._starts, iova) - 1
            if i < 0 or iova + size > self._free[i][1] or iova < self._free[i][0]:
                raise IovaError(
                    f"IOVA {iova:#x}+{size:#x} is not free: it overlaps a mapping, a reserved "
                    "hole or lies outside the ranges the IOMMU allows"
                )
            self._take(iova, size)

    def free(self, iova: int, size: int) -> None:
        """Give back a range from :meth:`alloc` or :meth:`reserve`."""
        with self._lock:
            if self._used.get(iova) != size:
                raise IovaError(
                    f"IOVA {iova:#x}+{size:#x} was not given out by this space "
                    "(never mapped, already unmapped, or the wrong size)"
                )
            del self._used[iova]
            self._free = _merge(self._free, iova, iova + size)
            self._starts = [s for s, _ in self._free]

    def free_bytes(self, lo: int = 0, hi: int = U64_MAX) -> int:
        """Free bytes in the window [lo, hi] (by default everywhere)."""
        with self._lock:
            return self._free_in(lo, hi)

    def _free_in(self, lo: int, hi: int) -> int:
        return sum(max(0, min(e, hi + 1) - max(s, lo)) for s, e in self._free)

    def _first_fit(self, size: int, align: int, lo: int, end: int) -> int | None:
        for s, e in self._free:
            if e <= lo:
                continue
            if s >= end:
                break
            start = (max(s, lo) + align - 1) & ~(align - 1)
            if start + size <= min(e, end):
                return start
        return None

    def _take(self, iova: int, size: int) -> None:
        self._free = _cut(self._free, iova, iova + size)
        self._starts = [s for s, _ in self._free]
        self._used[iova] = size


def _merge(free: list[_Run], start: int, end: int) -> list[_Run]:
    if start >= end:
        return free
    out: list[_Run] = []
    for s, e in free:
        if e < start or s > end:
            out.append((s, e))
        else:
            start, end = min(s, start), max(e, end)
    out.append((start, end))
    return sorted(out)


def _cut(free: list[_Run], start: int, end: int) -> list[_Run]:
    out: list[_Run] = []
    for s, e in free:
        if e <= start or s >= end:
            out.append((s, e))
            continue
        if s < start:
            out.append((s, start))
        if e > end:
            out.append((end, e))
    return out
