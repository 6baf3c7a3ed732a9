"""Typed DMA values: what the DMA API hands out, with names instead of positions.

:class:`DmaAllocation` is what ``dma_alloc_coherent`` and ``dma_pool_alloc`` return: it
still unpacks as the kernel's pair, ``cpu, dma = dma_alloc_coherent(dev, size)``, and
names them (``.cpu_addr``, ``.dma_handle``).  :class:`DmaRegion` is memory the DMA layer
hands around with its size (a page allocation, a pool's page).  :class:`SgEntry` is one
``dma_map_sg`` entry (``sg_dma_address``, ``sg_dma_len``).
"""

from __future__ import annotations

from typing import NamedTuple


class DmaAllocation(NamedTuple):
    """Coherent memory: the CPU's address of it and the device's (``dma_addr_t``)."""

    cpu_addr: int
    dma_handle: int


class DmaRegion(NamedTuple):
    """``size`` bytes of DMA memory at ``cpu_addr`` for the CPU and ``dma_addr`` for devices."""

    cpu_addr: int
    dma_addr: int
    size: int

    @property
    def allocation(self) -> DmaAllocation:
        """The region as the (cpu_addr, dma_handle) pair the DMA API returns."""
        return DmaAllocation(self.cpu_addr, self.dma_addr)


class SgEntry(NamedTuple):
    """One mapped scatterlist entry: ``sg_dma_address`` and ``sg_dma_len``."""

    dma_address: int
    dma_length: int
