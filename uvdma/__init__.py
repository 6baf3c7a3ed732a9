"""uvdma: a userspace VFIO driver framework in Python.

A PCIe device bound to vfio-pci gets hugepage-backed memory mapped into its IOMMU,
carved up by Python ports of the kernel's allocators (:mod:`uvdma.genalloc`, the DMA
atomic pools) behind ``dma_alloc_coherent``-style calls.
"""

from uvdma.errors import UvdmaError
from uvdma.genalloc import GenPool

__version__ = "0.1.0"

__all__ = ["GenPool", "UvdmaError", "__version__"]
