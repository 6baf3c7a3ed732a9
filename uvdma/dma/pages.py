"""``alloc_pages`` for one IOMMU domain: pages of DMA memory, already mapped, by zone.

The kernel's page allocator hands out physical pages from zones.  Here a page is 4 KiB
of hugepage-backed memory mapped into the domain's IOMMU at an IOVA in the zone asked
for.  Memory is mapped 2 MiB at a time (one hugepage, one IOMMU mapping) and carved
into power-of-two blocks by a :class:`~uvdma.genalloc.GenPool` per zone using
``first_fit_order_align``, so a block of order n is aligned to 2**n pages in IOVA and
in virtual address alike, as buddy pages are.  Mapping a new 2 MiB is a system call:
that is the "may sleep" part, taken only when ``may_map`` is true.  An allocation
larger than 2 MiB gets memory and a mapping of its own.

A zone that has no room falls back downwards (NORMAL, DMA32, DMA) when its new memory
is mapped, like the kernel's zonelists.

Before any memory is allocated the IOVA space is asked whether the request fits in the
zone at all, and the memory layer refuses memory the machine does not have
(:class:`~uvdma.memory.hugepages.MemoryShortError`) or the process may not lock or pin
(RLIMIT_MEMLOCK: :class:`~uvdma.errors.UvdmaOSError` ENOMEM), so an impossible request
never touches memory.  Where the memory comes back as a 1 GiB page (the only hugepages
free), the whole page is mapped and carved when the zone has room for it.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass

from uvdma.dma.gfp import PAGE_SHIFT, PAGE_SIZE
from uvdma.errors import ClosedError, UvdmaError, UvdmaOSError
from uvdma.genalloc import GenPool, first_fit_order_align
from uvdma.memory import hugepages
from uvdma.memory.hugepages import PAGE_2M, HugeMemory, allocate
from uvdma.memory.iova import IovaExhaustedError, Zone
from uvdma.vfio.domain import DmaMapping, IommuDomain

CHUNK = PAGE_2M


@dataclass
class _Region:
    memory: HugeMemory
    mapping: DmaMapping
    zone: Zone


class PageAllocator:
    """Pages of mapped DMA memory for one domain. Thread-safe."""

    def __init__(self, domain: IommuDomain) -> None:
        self.domain = domain
        self._lock = threading.Lock()
        self._pools = {z: GenPool(PAGE_SHIFT) for z in Zone}
        for pool in self._pools.values():
            pool.set_algo(first_fit_order_align)
        self._regions: list[_Region] = []
        self._big: dict[int, _Region] = {}
        self.closed = False

    def _map(self, size: int, zone: Zone) -> _Region:
        """New memory of at least ``size`` bytes mapped in ``zone`` (or lower).

        Raises IovaExhaustedError before allocating anything when the zone cannot hold
        ``size`` bytes, and UvdmaOSError(ENOMEM) when pinning them would pass
        RLIMIT_MEMLOCK (type1 counts pinned pages against it)."""
        if not self.domain.iova.fits(size, PAGE_SIZE, zone):
            raise IovaExhaustedError(f"no room for {size:#x} bytes in zone {zone.name}")
        if hugepages.lock_limited():  # else no /proc to read on this path
            status = hugepages.memory_status()
            lockable = status.lockable()
            if lockable is not None and size > lockable:
                raise UvdmaOSError(
                    errno.ENOMEM, f"pinning DMA memory: {hugepages.memlock_fix(size, status)}"
                )
        mem = allocate(size)
        try:
            try:
                mapping = self.domain.map_memory(mem, zone=zone)
            except IovaExhaustedError:
                if mem.size == size:
                    raise
                # a 1 GiB page where the zone has no room for it: map what was asked
                mapping = self.domain.map(
                    mem.vaddr, size, zone=zone, align=min(mem.page_size, CHUNK), owner=mem
                )
        except BaseException:
            mem.close()
            raise
        return _Region(mem, mapping, zone)

    def alloc_pages(
        self, zone: Zone, order: int, *, may_map: bool = True
    ) -> tuple[int, int] | None:
        """2**order pages from ``zone`` (or a lower one): (vaddr, iova), or None.

        None means the zone has no free block and either ``may_map`` is false or no new
        memory could be mapped there (the kernel's NULL from alloc_pages).  Memory the
        machine does not have raises MemoryShortError, and memory past RLIMIT_MEMLOCK
        UvdmaOSError (ENOMEM), before anything is touched.
        """
        size = PAGE_SIZE << order
        if self.closed:
            raise ClosedError("the DMA page allocator of this IOMMU domain is closed")
        if size > CHUNK:
            if not may_map:
                return None
            try:
                region = self._map(size, zone)
            except IovaExhaustedError:
                return None
            with self._lock:
                self._big[region.memory.vaddr] = region
            return region.memory.vaddr, region.mapping.iova
        pool = self._pools[zone]
        got = pool.dma_alloc(size)
        if got is not None or not may_map:
            return got
        with self._lock:  # one mapper at a time; others may have grown it meanwhile
            got = pool.dma_alloc(size)
            if got is not None:
                return got
            try:
                region = self._map(CHUNK, zone)
            except IovaExhaustedError:
                return None
            self._regions.append(region)
            pool.add_virt(region.memory.vaddr, region.mapping.iova, region.mapping.size)
        return pool.dma_alloc(size)

    def free_pages(self, vaddr: int, order: int) -> None:
        """Give back what :meth:`alloc_pages` returned."""
        size = PAGE_SIZE << order
        with self._lock:
            region = self._big.pop(vaddr, None)
        if region is not None:
            self.domain.unmap(region.mapping)
            region.memory.close()
            return
        for pool in self._pools.values():
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
        """Unmap and free every region. Idempotent."""
        if self.closed:
            return
        self.closed = True
        with self._lock:
            regions = [*self._big.values(), *reversed(self._regions)]
            self._big.clear()
            self._regions.clear()
        for r in regions:
            if not self.domain.closed:
                self.domain.unmap(r.mapping)
            else:
                r.memory.mapped_by.clear()
            r.memory.close()
