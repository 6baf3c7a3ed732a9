"""dma-direct's allocation (kernel/dma/direct.c): coherent memory from the page allocator,
or from the atomic pools for a caller that cannot block.

``dma_direct_alloc`` takes the zone from the GFP zone modifiers and the device's coherent
mask (``dma_direct_optimal_gfp_mask``, through the one rule in :mod:`uvdma.dma.zones`)
and passes the mask down as the limit, so the page allocator chooses an IOVA within it at
once: the kernel's retry in ZONE_DMA32 and then ZONE_DMA after a ``dma_coherent_ok``
miss is the windows' fallback order, walked in one IOVA choice.  A caller that cannot
block (GFP flags without ``__GFP_DIRECT_RECLAIM``, e.g. ``GFP_ATOMIC``) makes no system
call: ``dma_direct_alloc_from_pool`` serves it from the atomic pools, whose addresses are
checked with ``dma_coherent_ok`` as pool.c's ``phys_addr_ok`` (the pools were filled
before the mask was known, as in the kernel).

A request that cannot be satisfied (larger than the windows the mask allows, than the
free hugepages and the memory the process may lock, than RLIMIT_MEMLOCK) raises
:class:`~uvdma.errors.DmaAllocError` before any memory is touched, naming the limit.
"""

from __future__ import annotations

import errno

from uvdma._sys import zero
from uvdma.dma.device import DmaDevice, min_not_zero
from uvdma.dma.gfp import __GFP_DIRECT_RECLAIM, get_order
from uvdma.dma.region import DmaAllocation, DmaRegion
from uvdma.dma.zones import Zone, gfp_zone, lower
from uvdma.errors import DmaAllocError, MemoryShortError, UvdmaError, UvdmaOSError


def dma_coherent_ok(dev: DmaDevice, dma: int, size: int) -> bool:
    """``dma_coherent_ok``: the whole range within the coherent mask and bus limit."""
    return dma + size - 1 <= min_not_zero(dev.coherent_dma_mask, dev.bus_dma_limit)


def alloc_pages_or_why(
    dev: DmaDevice, zone: Zone, order: int, limit: int, why: list[UvdmaError]
) -> DmaRegion | None:
    """alloc_pages in ``zone`` (or below) within ``limit``, with a shortage of memory (or
    of RLIMIT_MEMLOCK) as the kernel's NULL; the reason goes into ``why`` for the error
    message."""
    try:
        return dev.dma_domain.pages.alloc_pages(zone, order, limit)
    except MemoryShortError as e:
        why.append(e)
    except UvdmaOSError as e:
        if e.errno != errno.ENOMEM:
            raise
        why.append(e)
    return None


def dma_direct_alloc(dev: DmaDevice, size: int, gfp: int) -> DmaAllocation:
    """``dma_direct_alloc`` of ``size`` bytes (already page-aligned), zeroed; records the
    allocation for the free's checks.  Raises DmaAllocError where the kernel returns NULL."""
    if not gfp & __GFP_DIRECT_RECLAIM:
        # dma_direct_alloc_from_pool: the caller cannot block, so no system call here
        limit = dev.coherent_limit
        got = dev.dma_domain.pools.alloc_from_pool(
            size,
            lower(gfp_zone(gfp), dev.coherent_zone),
            lambda dma, n: dma + n - 1 <= limit,  # dma_coherent_ok
        )
        if got is None:
            raise DmaAllocError(
                f"dma_alloc_coherent({dev.name}, {size}, GFP_ATOMIC): the atomic pools have "
                f"no {size} bytes within mask {dev.coherent_dma_mask:#x} (the kernel returns "
                "NULL): allocate with GFP_KERNEL where you may block, or raise coherent_pool "
                "/ UVDMA_COHERENT_POOL"
            )
        cpu, dma, pool = got
        if dev.debug.enabled:
            dev.debug.add("coherent", dma, cpu, size, 0, pool)
        else:
            dev._coherent[dma] = (cpu, size, 0, "", pool)
        return DmaAllocation(cpu, dma)
    # __dma_direct_alloc_pages: the optimal zone or below, within the mask, in one choice
    why: list[UvdmaError] = []
    zone = lower(gfp_zone(gfp), dev.coherent_zone)
    pages = alloc_pages_or_why(dev, zone, get_order(size), dev.coherent_limit, why)
    if pages is None:
        if why:
            raise DmaAllocError(f"dma_alloc_coherent({dev.name}, {size}): {why[-1]}") from why[-1]
        raise DmaAllocError(
            f"dma_alloc_coherent({dev.name}, {size}): no DMA memory within mask "
            f"{dev.coherent_dma_mask:#x} (every zone it can use is full or too small for "
            f"{size} bytes): free some, or widen the mask with dma_set_coherent_mask"
        )
    zero(pages.cpu_addr, size)
    dev.debug.add("coherent", pages.dma_addr, pages.cpu_addr, size)
    return pages.allocation


def dma_direct_free(dev: DmaDevice, size: int, cpu_addr: int, dma_handle: int) -> None:
    """``dma_direct_free`` of ``size`` bytes (already page-aligned): device, size and
    handle must match the allocation (else DmaApiError, nothing freed)."""
    rec = dev._coherent.pop(dma_handle, None)
    if rec is None or rec[1] != size or rec[0] != cpu_addr or dev.debug.enabled:
        if rec is not None:
            dev._coherent[dma_handle] = rec
        rec = dev.debug.take("coherent", dma_handle, size, cpu_addr)
        dev.debug.poison(cpu_addr, size)
    pool = rec[4]
    domain = dev.dma_domain
    if pool is not None:
        pool.free(cpu_addr, size)  # dma_free_from_pool, knowing which pool it was
    elif not domain.pools.free_from_pool(cpu_addr, size):
        domain.pages.free_pages(cpu_addr, get_order(size))
