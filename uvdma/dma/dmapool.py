"""Small coherent blocks: mm/dmapool.c.

A pool hands out blocks of one size, carved from pages of ``dma_alloc_coherent``
memory (``allocation`` bytes each: the block size or a page, whichever is larger).
No block crosses a ``boundary`` (a power of two; by default the allocation itself),
which is what NVMe PRP lists need.  Free blocks sit on one list, last freed first out,
as in the kernel since 6.4.  Unlike the kernel, a free of a block that is not out
(a double free, a foreign address, a wrong dma handle) raises instead of logging, and
destroying a pool with blocks out is refused instead of leaking them.  After
``destroy``, or once its device is closed, ``alloc`` raises
:class:`~uvdma.errors.ClosedError` naming the pool.  Thread-safe (one lock per pool).
"""

from __future__ import annotations

import threading

from uvdma._sys import zero
from uvdma.dma.device import DmaDevice
from uvdma.dma.gfp import GFP_KERNEL, PAGE_SIZE
from uvdma.dma.mapping import dma_alloc_coherent, dma_free_coherent
from uvdma.dma.region import DmaAllocation, DmaRegion
from uvdma.errors import ClosedError, DmaApiError


class DmaPool:
    """``struct dma_pool``. Use :func:`dma_pool_create`."""

    def __init__(self, name: str, dev: DmaDevice, size: int, align: int, boundary: int) -> None:
        if size <= 0:
            raise ValueError(f"dma_pool_create({name!r}): size must be positive, not {size}")
        if align == 0:
            align = 1
        elif align & (align - 1):
            raise ValueError(f"dma_pool_create({name!r}): align {align} is not a power of two")
        size = max((size + align - 1) & ~(align - 1), 8)  # ALIGN(size, align); >= a free-list link
        allocation = max(size, PAGE_SIZE)
        if not boundary:
            boundary = allocation
        elif boundary & (boundary - 1) or boundary < size:
            raise ValueError(
                f"dma_pool_create({name!r}): boundary {boundary} must be a power of two "
                f"and at least the block size {size}"
            )
        vd = dev._vfio
        if dev._dead is not None or (vd is not None and vd.closed) or dev.domain.closed:
            raise dev.closed_error(f"dma_pool_create({name!r})")
        self.name = name
        self.dev = dev
        self.size = size
        self.allocation = allocation
        self.boundary = min(boundary, allocation)
        self._lock = threading.Lock()
        self._free: list[DmaAllocation] = []  # popped from the end
        self._out: dict[int, int] = {}  # dma -> vaddr of blocks handed out
        self._pages: list[DmaRegion] = []
        self._destroyed = False

    def _add_page(self, gfp: int) -> None:
        """``pool_alloc_page`` + ``pool_initialise_page``: carve a fresh page into blocks."""
        vaddr, dma = dma_alloc_coherent(self.dev, self.allocation, gfp)
        self._pages.append(DmaRegion(vaddr, dma, self.allocation))
        offset, next_boundary = 0, self.boundary
        blocks = []
        while offset + self.size <= self.allocation:
            if offset + self.size > next_boundary:
                offset = next_boundary
                next_boundary += self.boundary
                continue
            blocks.append(DmaAllocation(vaddr + offset, dma + offset))
            offset += self.size
        self._free.extend(reversed(blocks))  # the lowest address comes out first

    def alloc(self, gfp: int = GFP_KERNEL) -> DmaAllocation:
        """``dma_pool_alloc``: one block, as ``(cpu_addr, dma_handle)``."""
        dev = self.dev
        vd = dev._vfio
        if (
            self._destroyed
            or dev._dead is not None
            or (vd is not None and vd.closed)
            or dev.domain.closed
        ):
            raise self._closed_error("dma_pool_alloc")
        lock = self._lock
        lock.acquire()
        try:
            if not self._free:
                if self._destroyed:
                    raise self._closed_error("dma_pool_alloc")
                self._add_page(gfp)
            block = self._free.pop()
            self._out[block.dma_handle] = block.cpu_addr
            return block
        finally:
            lock.release()

    def zalloc(self, gfp: int = GFP_KERNEL) -> DmaAllocation:
        """``dma_pool_zalloc``: a zeroed block."""
        block = self.alloc(gfp)
        zero(block.cpu_addr, self.size)
        return block

    def free(self, vaddr: int, dma: int) -> None:
        """``dma_pool_free``: give a block back; a block that is not out raises, pool unchanged."""
        if self._destroyed or self.dev.dma_domain.closed:
            raise self._closed_error("dma_pool_free", memory=True)
        lock = self._lock
        lock.acquire()
        try:
            if self._out.get(dma) != vaddr:
                raise DmaApiError(
                    f"dma_pool_free({self.name!r}, {vaddr:#x}, dma {dma:#x}): not a block this "
                    "pool has out (a double free, a foreign address, or the wrong dma handle)"
                )
            del self._out[dma]
            self._free.append(DmaAllocation(vaddr, dma))
        finally:
            lock.release()

    def _closed_error(self, what: str, memory: bool = False) -> ClosedError:
        """Why ``what`` is refused: the pool destroyed, its device closed, or (``memory``,
        for frees) its memory gone with the IOMMU domain."""
        if self._destroyed:
            return ClosedError(f"{what}: DmaPool {self.name!r} is destroyed")
        if memory and self.dev.dma_domain.closed:
            return ClosedError(
                f"{what}: DmaPool {self.name!r}: its IOMMU domain is closed (its memory went "
                "with it)"
            )
        return self.dev.closed_error(f"{what} on DmaPool {self.name!r}")

    @property
    def destroyed(self) -> bool:
        """Whether :meth:`destroy` has run."""
        return self._destroyed

    def blocks_out(self) -> int:
        """How many blocks are allocated."""
        return len(self._out)

    def destroy(self) -> None:
        """``dma_pool_destroy``: refuses while blocks are out; frees the pages. Idempotent;
        once the IOMMU domain is closed there is nothing left to free."""
        if self._destroyed:
            return
        if self.dev.dma_domain.closed:
            with self._lock:
                self._out.clear()
                self._free.clear()
                self._pages = []
                self._destroyed = True
            return
        with self._lock:
            if self._out:
                raise DmaApiError(
                    f"dma_pool_destroy({self.name!r}): {len(self._out)} block(s) still out, "
                    f"e.g. dma {next(iter(self._out)):#x}; free them first"
                )
            pages, self._pages = self._pages, []
            self._free.clear()
            self._destroyed = True
        for page in pages:
            dma_free_coherent(self.dev, page.size, page.cpu_addr, page.dma_addr)

    def __repr__(self) -> str:
        return (
            f"DmaPool({self.name!r}, size={self.size}, boundary={self.boundary}, "
            f"out={len(self._out)})"
        )


def dma_pool_create(
    name: str, dev: DmaDevice, size: int, align: int = 0, boundary: int = 0
) -> DmaPool:
    """``dma_pool_create``."""
    return DmaPool(name, dev, size, align, boundary)


def dma_pool_alloc(pool: DmaPool, gfp: int = GFP_KERNEL) -> DmaAllocation:
    """``dma_pool_alloc``."""
    return pool.alloc(gfp)


def dma_pool_zalloc(pool: DmaPool, gfp: int = GFP_KERNEL) -> DmaAllocation:
    """``dma_pool_zalloc``."""
    return pool.zalloc(gfp)


def dma_pool_free(pool: DmaPool, vaddr: int, dma: int) -> None:
    """``dma_pool_free``."""
    pool.free(vaddr, dma)


def dma_pool_destroy(pool: DmaPool) -> None:
    """``dma_pool_destroy``."""
    pool.destroy()
