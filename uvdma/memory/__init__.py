"""Host memory for DMA: hugepage-backed mappings and their physical addresses.

This layer knows nothing of IOMMUs or zones: the IOVA space is :mod:`uvdma.vfio.iova`,
the zones are :mod:`uvdma.dma.zones`.
"""

from uvdma.memory.hugepages import HugeMemory, allocate, hugepage_pools, physical_address

__all__ = [
    "HugeMemory",
    "allocate",
    "hugepage_pools",
    "physical_address",
]
