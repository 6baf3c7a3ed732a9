"""The IOVA space of one IOMMU domain, and its zones.

The kernel gives each page a physical address and sorts memory into zones by it:
ZONE_DMA below 16 MiB, ZONE_DMA32 below 4 GiB, the rest above.  With an IOMMU the
address a device sees is the IOVA we choose, so the zones become windows of the IOVA
space, each cut to the ranges the kernel reports as usable (type1's IOVA_RANGE
capability, iommufd's IOAS_IOVA_RANGES) and with the x86 MSI window
(0xFEE00000-0xFEEFFFFF) and page 0 always left out.

An allocation asks for a zone and falls back to lower zones as the kernel's zonelists
do (NORMAL, then DMA32, then DMA); it never falls back upwards, so an address from
zone DMA32 always fits a 32-bit mask.
"""

from __future__ import annotations

import bisect
import enum
import threading
from collections.abc import Iterable

from uvdma.errors import UvdmaError

MSI_WINDOW = (0xFEE0_0000, 0xFEEF_FFFF)  # x86: writes here are interrupts, not memory


class Zone(enum.Enum):
    """IOVA zones, named after the kernel's memory zones; the value is the window's end."""

    DMA = 1 << 24
    DMA32 = 1 << 32
    NORMAL = 1 << 64

    @property
    def start(self) -> int:
        """Where the zone's window starts."""
        return {Zone.DMA: 0, Zone.DMA32: 1 << 24, Zone.NORMAL: 1 << 32}[self]

    @classmethod
    def for_mask(cls, mask: int) -> Zone:
        """The zone dma-direct picks for a mask (``dma_direct_optimal_gfp_mask``)."""
        if mask < (1 << 24) - 1:
            raise IovaError(
                f"DMA mask {mask:#x} is narrower than 24 bits: no zone can satisfy it; "
                "the narrowest the kernel supports is DMA_BIT_MASK(24)"
            )
        if mask <= (1 << 24) - 1:
            return cls.DMA
        if mask <= (1 << 32) - 1:
            return cls.DMA32
        return cls.NORMAL


_FALLBACK = {
    Zone.NORMAL: (Zone.NORMAL, Zone.DMA32, Zone.DMA),
    Zone.DMA32: (Zone.DMA32, Zone.DMA),
    Zone.DMA: (Zone.DMA,),
}


class IovaError(UvdmaError):
    """An IOVA could not be given out or taken back."""


class IovaExhaustedError(IovaError):
    """No free, suitably aligned IOVA range of the size asked for in the zone."""


class IovaSpace:
    """Free IOVA ranges of one domain; hands out aligned ranges by zone. Thread-safe.

    ``ranges`` are the usable ranges as (start, last) with ``last`` inclusive.
    """

    def __init__(
        self,
        ranges: Iterable[tuple[int, int]],
        *,
        reserved: Iterable[tuple[int, int]] = (MSI_WINDOW,),
        min_iova: int = 4096,
    ) -> None:
        self._lock = threading.Lock()
        # free list: sorted, disjoint, half-open [start, end)
        free: list[tuple[int, int]] = []
        for start, last in sorted(ranges):
            free = _merge(free, max(start, min_iova), last + 1)
        for start, last in reserved:
            free = _cut(free, start, last + 1)
        self._free = free
        self._starts = [s for s, _ in free]
        self._used: dict[int, int] = {}
        self.ranges = [(s, e - 1) for s, e in free]

    def alloc(
        self, size: int, align: int = 4096, zone: Zone = Zone.NORMAL, limit: int = (1 << 64) - 1
    ) -> int:
        """An IOVA for ``size`` bytes aligned to ``align``, in ``zone`` or a lower one.

        Every byte of the range is at most ``limit`` (a DMA mask): ``iova + size - 1 <= limit``.
        """
        if size <= 0 or align <= 0 or align & (align - 1):
            raise IovaError(f"bad IOVA request: size {size}, alignment {align} (power of two)")
        with self._lock:
            for z in _FALLBACK[zone]:
                iova = self._first_fit(size, align, z.start, min(z.value, limit + 1))
                if iova is not None:
                    self._take(iova, size)
                    return iova
        raise IovaExhaustedError(
            f"no free IOVA range of {size:#x} bytes aligned to {align:#x} at or below "
            f"{limit:#x} in zone {zone.name} or below ({self.free_bytes(zone):#x} bytes free "
            "there, fragmented or too small): unmap memory you no longer need, or allow a "
            "wider DMA mask"
        )

    def fits(
        self, size: int, align: int = 4096, zone: Zone = Zone.NORMAL, limit: int = (1 << 64) - 1
    ) -> bool:
        """Whether :meth:`alloc` with these arguments would succeed now (taking nothing):
        the check to make before allocating memory that would have nowhere to go."""
        if size <= 0 or align <= 0 or align & (align - 1):
            return False
        with self._lock:
            return any(
                self._first_fit(size, align, z.start, min(z.value, limit + 1)) is not None
                for z in _FALLBACK[zone]
            )

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

    def free_bytes(self, zone: Zone | None = None) -> int:
        """Free bytes in the zone's window (or everywhere)."""
        lo, hi = (0, 1 << 64) if zone is None else (zone.start, zone.value)
        return sum(max(0, min(e, hi) - max(s, lo)) for s, e in self._free)

    def _first_fit(self, size: int, align: int, lo: int, hi: int) -> int | None:
        for s, e in self._free:
            if e <= lo:
                continue
            if s >= hi:
                break
            start = (max(s, lo) + align - 1) & ~(align - 1)
            if start + size <= min(e, hi):
                return start
        return None

    def _take(self, iova: int, size: int) -> None:
        self._free = _cut(self._free, iova, iova + size)
        self._starts = [s for s, _ in self._free]
        self._used[iova] = size


def _merge(free: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    if start >= end:
        return free
    out: list[tuple[int, int]] = []
    for s, e in free:
        if e < start or s > end:
            out.append((s, e))
        else:
            start, end = min(s, start), max(e, end)
    out.append((start, end))
    return sorted(out)


def _cut(free: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in free:
        if e <= start or s >= end:
            out.append((s, e))
            continue
        if s < start:
            out.append((s, start))
        if e > end:
            out.append((end, e))
    return out
