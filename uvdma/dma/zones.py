"""Zones: the one place uvdma says what ZONE_DMA, ZONE_DMA32 and ZONE_NORMAL are.

The kernel sorts memory into zones by physical address: ZONE_DMA below 16 MiB (x86),
ZONE_DMA32 below 4 GiB, ZONE_NORMAL above.  With an IOMMU the address a device sees is
the IOVA uvdma chooses, so a zone is a window of the IOVA space, and allocating "in a
zone" is choosing an IOVA in its window.

Everything in :mod:`uvdma.dma` speaks :class:`Zone`.  GFP zone modifiers are how a caller
asks (``GFP_DMA``, ``GFP_DMA32``, the kernel's names, kept for the API); they become a
zone once, in :func:`gfp_zone`, as the kernel's ``gfp_zone()`` does.  A device's mask
becomes a zone by the one rule of :func:`zone_for_mask` (``dma_direct_optimal_gfp_mask``),
and the mask itself is passed down as the upper bound of every window
(:func:`zone_windows`), so an IOVA is chosen within the mask at once.

The lower layer (:mod:`uvdma.vfio`) knows nothing of zones: it gets windows [lo, hi].
"""

from __future__ import annotations

import enum

from uvdma.dma.gfp import __GFP_DMA, __GFP_DMA32
from uvdma.vfio.iova import Window

U64_MAX = (1 << 64) - 1


class Zone(enum.Enum):
    """The kernel's memory zones as IOVA windows; ``value`` is the pool.c pool name."""

    DMA = "dma"
    DMA32 = "dma32"
    NORMAL = "kernel"

    @property
    def start(self) -> int:
        """The zone's first address."""
        return _START[self]

    @property
    def last(self) -> int:
        """The zone's last address (inclusive)."""
        return _LAST[self]

    @property
    def fallback(self) -> tuple[Zone, ...]:
        """The zonelist: this zone, then the lower ones (never upwards), as the kernel's
        zonelists fall back, so an address from DMA32 always fits a 32-bit mask."""
        return _FALLBACK[self]


_START = {Zone.DMA: 0, Zone.DMA32: 1 << 24, Zone.NORMAL: 1 << 32}
_LAST = {Zone.DMA: (1 << 24) - 1, Zone.DMA32: (1 << 32) - 1, Zone.NORMAL: U64_MAX}
_FALLBACK = {
    Zone.NORMAL: (Zone.NORMAL, Zone.DMA32, Zone.DMA),
    Zone.DMA32: (Zone.DMA32, Zone.DMA),
    Zone.DMA: (Zone.DMA,),
}


def gfp_zone(gfp: int) -> Zone:
    """``gfp_zone``: the zone GFP zone modifiers ask for (``__GFP_DMA`` wins)."""
    if gfp & __GFP_DMA:
        return Zone.DMA
    if gfp & __GFP_DMA32:
        return Zone.DMA32
    return Zone.NORMAL


def zone_for_mask(mask: int) -> Zone:
    """The one rule from a DMA mask to a zone (``dma_direct_optimal_gfp_mask``): a mask of
    24 bits or fewer is ZONE_DMA, of 32 bits or fewer ZONE_DMA32, else ZONE_NORMAL."""
    if mask <= Zone.DMA.last:
        return Zone.DMA
    if mask <= Zone.DMA32.last:
        return Zone.DMA32
    return Zone.NORMAL


def lower(a: Zone, b: Zone) -> Zone:
    """The lower of two zones (a GFP_DMA request on a 64-bit device is still ZONE_DMA)."""
    order = (Zone.DMA, Zone.DMA32, Zone.NORMAL)
    return a if order.index(a) <= order.index(b) else b


def zone_windows(zone: Zone, limit: int = U64_MAX) -> tuple[Window, ...]:
    """The IOVA windows an allocation in ``zone`` may use, in the order to try them: the
    zone, then its fallbacks, each cut at ``limit`` (the device's mask), so whatever is
    chosen satisfies ``dma + size - 1 <= limit``.  Windows wholly above ``limit`` are left
    out."""
    return tuple((z.start, min(z.last, limit)) for z in zone.fallback if z.start <= limit)
