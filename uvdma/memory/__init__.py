"""DMA memory: hugepage-backed mappings and the IOVA space they are placed in."""

from uvdma.memory.hugepages import HugeMemory, allocate, hugepage_pools, physical_address
from uvdma.memory.iova import IovaExhaustedError, IovaSpace, Zone

__all__ = [
    "HugeMemory",
    "IovaExhaustedError",
    "IovaSpace",
    "Zone",
    "allocate",
    "hugepage_pools",
    "physical_address",
]
