"""``alloc_pages`` for one IOMMU domain: pages of DMA memory, already mapped, by zone.

The kernel's page allocator hands out physical pages from zones.  Here a page is 4 KiB
of hugepage-backed memory mapped into the domain's IOMMU at an IOVA in the zone asked
for.  Memory is mapped 2 MiB at a time (one hugepage, one IOMMU mapping) and carved
into power-of-two blocks by a :class:`~uvdma.genalloc.GenPool` per zone using
``first_fit_order_align``, so a block of order n is aligned to 2**n pages in IOVA and
in virtual address alike, as buddy pages are.  Mapping a new 2 MiB is a system call:
that is the "may sleep" part.  An allocation larger than 2 MiB gets memory and a mapping
of its own.

A request names a zone and a limit (the device's mask).  New memory is mapped at an IOVA
chosen inside the zone's windows cut at the limit (:func:`~uvdma.dma.zones.zone_windows`:
the zone, then the lower ones, as the kernel's zonelists fall back), so the address fits
the mask the first time.  Blocks are carved from a pool per (zone, limit): a limit below
the zone's top (a 36-bit mask in ZONE_NORMAL, say) has its own pool, whose every block
fits it, so no block is handed out, checked against the mask and given back.

Before any memory is allocated the IOVA space is asked whether the request fits in the
windows at all, and the memory layer refuses memory the machine does not have
(:class:`~uvdma.memory.hugepages.MemoryShortError`) or the process may not lock or pin
(RLIMIT_MEMLOCK: :class:`~uvdma.errors.UvdmaOSError` ENOMEM), so an impossible request
never touches memory.  Where the memory comes back as a 1 GiB page (the only hugepages
free), the whole page is mapped and carved when the zone has room for it.

Teardown (:meth:`PageAllocator.close`, called by :class:`~uvdma.dma.domain.DmaDomain`):
each region is unmapped from the IOMMU, then its memory is unmapped from the process; if
the IOMMU domain was closed first (it unmapped everything), only the memory is freed.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass

from uvdma.dma.gfp import PAGE_SHIFT, PAGE_SIZE
from uvdma.dma.region import DmaRegion
from uvdma.dma.zones import U64_MAX, Zone, zone_windows
from uvdma.errors import ClosedError, IovaExhaustedError, UvdmaError, UvdmaOSError
from uvdma.genalloc import GenPool, first_fit_order_align
from uvdma.memory import hugepages
from uvdma.memory.hugepages import PAGE_2M, HugeMemory
from uvdma.vfio.domain import DmaMapping, IommuDomain
from uvdma.vfio.iova import Window

CHUNK = PAGE_2M


@dataclass
class _Region:
    """Memory this allocator mapped: unmapped from the IOMMU before it is freed."""

    memory: HugeMemory
    mapping: DmaMapping
    zone: Zone

    def release(self, domain: IommuDomain) -> None:
        """Unmap from the IOMMU (unless the domain already dropped everything), then munmap."""
        if not domain.closed:
            domain.unmap(self.mapping)
        self.memory.close()


class PageAllocator:
    """Pages of mapped DMA memory for one domain. Thread-safe."""

    def __init__(self, domain: IommuDomain) -> None:
        self.domain = domain
        self._lock = threading.Lock()
        self._pools: dict[tuple[Zone, int], GenPool] = {}  # (zone, limit) -> its pages
        self._regions: list[_Region] = []
        self._big: dict[int, _Region] = {}
        self.closed = False

    def _pool(self, zone: Zone, limit: int) -> GenPool:
        key = (zone, min(limit, zone.last))
        pool = self._pools.get(key)
        if pool is None:
            with self._lock:
                pool = self._pools.get(key)
                if pool is None:
                    pool = GenPool(PAGE_SHIFT)
                    pool.set_algo(first_fit_order_align)
                    self._pools[key] = pool
        return pool

    def _map(self, size: int, zone: Zone, windows: tuple[Window, ...]) -> _Region:
        """New memory of at least ``size`` bytes mapped at an IOVA inside ``windows``.

        Raises IovaExhaustedError before allocating anything when the windows cannot hold
        ``size`` bytes, and UvdmaOSError(ENOMEM) when pinning them would pass
        RLIMIT_MEMLOCK (type1 counts pinned pages against it)."""
        if not self.domain.iova.fits(size, PAGE_SIZE, windows):
            raise IovaExhaustedError(f"no room for {size:#x} bytes in zone {zone.name}")
        if hugepages.lock_limited():  # else no /proc to read on this path
            status = hugepages.memory_status()
            lockable = status.lockable()
            if lockable is not None and size > lockable:
                raise UvdmaOSError(
                    errno.ENOMEM, f"pinning DMA memory: {hugepages.memlock_fix(size, status)}"
                )
        mem = self.domain.memory_for(size, windows)  # no-IOMMU: placed within the windows
        try:
            try:
                mapping = self.domain.map_memory(mem, windows=windows)
            except IovaExhaustedError:
                if mem.size == size:
                    raise
                # a 1 GiB page where the zone has no room for it: map what was asked
                mapping = self.domain.map(
                    mem.vaddr, size, align=min(mem.page_size, CHUNK), windows=windows
                )
        except BaseException:
            mem.close()
            raise
        return _Region(mem, mapping, zone)

    def alloc_pages(self, zone: Zone, order: int, limit: int = U64_MAX) -> DmaRegion | None:
        """2**order pages from ``zone`` (or a lower one) whose every byte is at most
        ``limit``, or None (the kernel's NULL from alloc_pages: no room in the windows).

        Memory the machine does not have raises MemoryShortError, and memory past
        RLIMIT_MEMLOCK UvdmaOSError (ENOMEM), before anything is touched.
        """
        size = PAGE_SIZE << order
        if self.closed:
            raise ClosedError("the DMA page allocator of this IOMMU domain is closed")
        windows = zone_windows(zone, limit)
        if size > CHUNK:
            try:
                region = self._map(size, zone, windows)
            except IovaExhaustedError:
                return None
            with self._lock:
                self._big[region.memory.vaddr] = region
            return DmaRegion(region.memory.vaddr, region.mapping.iova, size)
        pool = self._pool(zone, limit)
        got = pool.dma_alloc(size)
        if got is not None:
            return DmaRegion(got[0], got[1], size)
        with self._lock:  # one mapper at a time; others may have grown it meanwhile
            got = pool.dma_alloc(size)
            if got is None:
                try:
                    region = self._map(CHUNK, zone, windows)
                except IovaExhaustedError:
                    return None
                self._regions.append(region)
                pool.add_virt(region.memory.vaddr, region.mapping.iova, region.mapping.size)
        if got is None:
            got = pool.dma_alloc(size)
        return None if got is None else DmaRegion(got[0], got[1], size)

    def free_pages(self, vaddr: int, order: int) -> None:
        """Give back what :meth:`alloc_pages` returned."""
        size = PAGE_SIZE << order
        with self._lock:
            region = self._big.pop(vaddr, None)
        if region is not None:
            region.release(self.domain)
            return
        for pool in list(self._pools.values()):
            if pool.has_addr(vaddr, size):
                pool.free(vaddr, size)
                return
        raise UvdmaError(f"free_pages: {vaddr:#x} (order {order}) did not come from alloc_pages")

    def mapped_bytes(self) -> dict[str, int]:
        """Bytes of memory mapped for pages, by zone name (big allocations included)."""
        out = {z.name: 0 for z in Zone}
        with self._lock:
            for r in [*self._regions, *self._big.values()]:
                out[r.zone.name] += r.mapping.size
        return out

    def close(self) -> None:
        """Unmap every region from the IOMMU, then free its memory. Idempotent."""
        if self.closed:
            return
        self.closed = True
        with self._lock:
            regions = [*self._big.values(), *reversed(self._regions)]
            self._big.clear()
            self._regions.clear()
        for r in regions:
            r.release(self.domain)
