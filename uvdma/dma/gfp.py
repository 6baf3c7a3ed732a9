"""The DMA API's vocabulary: GFP flags, DMA_BIT_MASK, directions, attributes.

Values follow include/linux/gfp_types.h and include/linux/dma-mapping.h.  Only the bits
uvdma looks at matter: the zone modifiers (__GFP_DMA, __GFP_DMA32: how a caller asks
for a zone; :func:`uvdma.dma.zones.gfp_zone` turns them into :class:`~uvdma.dma.zones.Zone`,
the one zone vocabulary inside uvdma), whether the caller may block
(__GFP_DIRECT_RECLAIM, which GFP_KERNEL has and GFP_ATOMIC lacks), and __GFP_NOWARN.
In user space "may block" means "may make a system call": mapping new memory into the
IOMMU is an ioctl, so a caller that cannot block is served from memory already mapped
(the atomic pools).
"""

from __future__ import annotations

import enum


class Gfp(enum.IntFlag):
    """GFP bits (include/linux/gfp_types.h: ``__GFP_DMA`` is ``Gfp.DMA``)."""

    DMA = 0x01
    HIGHMEM = 0x02
    DMA32 = 0x04
    HIGH = 0x20
    IO = 0x40
    FS = 0x80
    ZERO = 0x100
    DIRECT_RECLAIM = 0x400
    KSWAPD_RECLAIM = 0x800
    NOWARN = 0x2000


# Plain ints, not enum members: flag arithmetic on IntFlag builds enum objects, which
# costs microseconds on the allocation paths.  Gfp(x) prints them by name.
__GFP_DMA = int(Gfp.DMA)
__GFP_DMA32 = int(Gfp.DMA32)
__GFP_ZERO = int(Gfp.ZERO)
__GFP_DIRECT_RECLAIM = int(Gfp.DIRECT_RECLAIM)
__GFP_NOWARN = int(Gfp.NOWARN)
GFP_ATOMIC = int(Gfp.HIGH | Gfp.KSWAPD_RECLAIM)
GFP_NOWAIT = int(Gfp.KSWAPD_RECLAIM)
GFP_KERNEL = int(Gfp.DIRECT_RECLAIM | Gfp.KSWAPD_RECLAIM | Gfp.IO | Gfp.FS)
GFP_DMA = __GFP_DMA
GFP_DMA32 = __GFP_DMA32


def DMA_BIT_MASK(n: int) -> int:  # noqa: N802 - the kernel's macro name
    """``DMA_BIT_MASK(n)``: the mask of an ``n``-bit DMA address."""
    if not 0 < n <= 64:
        raise ValueError(f"DMA_BIT_MASK takes 1..64 bits, not {n}")
    return (1 << n) - 1


class DmaDataDirection(enum.IntEnum):
    """``enum dma_data_direction``: who reads and who writes a streaming buffer."""

    DMA_BIDIRECTIONAL = 0
    DMA_TO_DEVICE = 1  # the device reads
    DMA_FROM_DEVICE = 2  # the device writes
    DMA_NONE = 3


DMA_BIDIRECTIONAL = DmaDataDirection.DMA_BIDIRECTIONAL
DMA_TO_DEVICE = DmaDataDirection.DMA_TO_DEVICE
DMA_FROM_DEVICE = DmaDataDirection.DMA_FROM_DEVICE

DMA_ATTR_SKIP_CPU_SYNC = 1 << 5  # unmap without copying back (a failed transfer)
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MAX_PAGE_ORDER = 10  # x86: the largest buddy allocation is 4 MiB


def get_order(size: int) -> int:
    """``get_order``: the page order that holds ``size`` bytes."""
    return max(0, (size - 1) >> PAGE_SHIFT).bit_length()
