"""The Linux DMA API in user space (Documentation/core-api/dma-api.rst).

>>> from uvdma.dma import DmaDevice, dma_alloc_coherent, dma_set_mask_and_coherent
>>> dev = DmaDevice(vfio_device)                                   # doctest: +SKIP
>>> dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64))               # doctest: +SKIP
>>> cpu, dma = dma_alloc_coherent(dev, 4096, GFP_KERNEL)            # doctest: +SKIP
"""

from uvdma.dma.debug import DmaApiError
from uvdma.dma.direct import (
    DmaAllocError,
    DmaBuffer,
    DmaDevice,
    DmaMaskError,
    dma_alloc_attrs,
    dma_alloc_coherent,
    dma_coherent_ok,
    dma_context,
    dma_free_attrs,
    dma_free_coherent,
    dma_map_sg,
    dma_map_single,
    dma_set_coherent_mask,
    dma_set_mask,
    dma_set_mask_and_coherent,
    dma_supported,
    dma_sync_single_for_cpu,
    dma_sync_single_for_device,
    dma_unmap_sg,
    dma_unmap_single,
    dma_unmap_single_attrs,
    is_bounced,
)
from uvdma.dma.dmapool import (
    DmaPool,
    dma_pool_alloc,
    dma_pool_create,
    dma_pool_destroy,
    dma_pool_free,
    dma_pool_zalloc,
)
from uvdma.dma.gfp import (
    DMA_ATTR_SKIP_CPU_SYNC,
    DMA_BIDIRECTIONAL,
    DMA_BIT_MASK,
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    GFP_ATOMIC,
    GFP_DMA,
    GFP_DMA32,
    GFP_KERNEL,
    GFP_NOWAIT,
)
from uvdma.dma.pool import AtomicPools, memparse

__all__ = [
    "DMA_ATTR_SKIP_CPU_SYNC",
    "DMA_BIDIRECTIONAL",
    "DMA_BIT_MASK",
    "DMA_FROM_DEVICE",
    "DMA_TO_DEVICE",
    "GFP_ATOMIC",
    "GFP_DMA",
    "GFP_DMA32",
    "GFP_KERNEL",
    "GFP_NOWAIT",
    "AtomicPools",
    "DmaAllocError",
    "DmaApiError",
    "DmaBuffer",
    "DmaDevice",
    "DmaMaskError",
    "DmaPool",
    "dma_alloc_attrs",
    "dma_alloc_coherent",
    "dma_coherent_ok",
    "dma_context",
    "dma_free_attrs",
    "dma_free_coherent",
    "dma_map_sg",
    "dma_map_single",
    "dma_pool_alloc",
    "dma_pool_create",
    "dma_pool_destroy",
    "dma_pool_free",
    "dma_pool_zalloc",
    "dma_set_coherent_mask",
    "dma_set_mask",
    "dma_set_mask_and_coherent",
    "dma_supported",
    "dma_sync_single_for_cpu",
    "dma_sync_single_for_device",
    "dma_unmap_sg",
    "dma_unmap_single",
    "dma_unmap_single_attrs",
    "is_bounced",
    "memparse",
]
