"""The Linux DMA API in user space (Documentation/core-api/dma-api.rst).

>>> from uvdma.dma import DmaDevice, DmaDomain, dma_alloc_coherent, dma_set_mask_and_coherent
>>> with DmaDomain(vfio_device.domain, coherent_pool="512K") as dd:  # doctest: +SKIP
...     dev = DmaDevice(vfio_device, dd)
...     dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64))
...     cpu, dma = dma_alloc_coherent(dev, 4096, GFP_KERNEL)          # a DmaAllocation
...     dev.close()

The modules, one job each: :mod:`~uvdma.dma.zones` (the zones and the mask rule),
:mod:`~uvdma.dma.domain` (DmaDomain: the page allocator and the atomic pools of one IOMMU
domain, and the teardown order), :mod:`~uvdma.dma.pages` (alloc_pages),
:mod:`~uvdma.dma.pool` (pool.c), :mod:`~uvdma.dma.device` (DmaDevice, struct device),
:mod:`~uvdma.dma.mapping` (mapping.c: masks, coherent allocations, DmaBuffer),
:mod:`~uvdma.dma.direct` (direct.c's allocation), :mod:`~uvdma.dma.streaming` (streaming
maps and bounce buffers), :mod:`~uvdma.dma.dmapool` (dmapool.c), :mod:`~uvdma.dma.debug`
(DMA-API debug), :mod:`~uvdma.dma.region` (the typed values).
"""

from uvdma.dma.device import DmaDevice
from uvdma.dma.direct import dma_coherent_ok
from uvdma.dma.dmapool import (
    DmaPool,
    dma_pool_alloc,
    dma_pool_create,
    dma_pool_destroy,
    dma_pool_free,
    dma_pool_zalloc,
)
from uvdma.dma.domain import DmaDomain
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
from uvdma.dma.mapping import (
    DmaBuffer,
    dma_alloc_attrs,
    dma_alloc_coherent,
    dma_free_attrs,
    dma_free_coherent,
    dma_set_coherent_mask,
    dma_set_mask,
    dma_set_mask_and_coherent,
    dma_supported,
)
from uvdma.dma.pool import AtomicPools
from uvdma.dma.region import DmaAllocation, DmaRegion, SgEntry
from uvdma.dma.streaming import (
    dma_map_sg,
    dma_map_single,
    dma_sync_single_for_cpu,
    dma_sync_single_for_device,
    dma_unmap_sg,
    dma_unmap_single,
    dma_unmap_single_attrs,
    is_bounced,
)
from uvdma.dma.zones import Zone
from uvdma.errors import DmaAllocError, DmaApiError, DmaDomainError, DmaMaskError

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
    "DmaAllocation",
    "DmaApiError",
    "DmaBuffer",
    "DmaDevice",
    "DmaDomain",
    "DmaDomainError",
    "DmaMaskError",
    "DmaPool",
    "DmaRegion",
    "SgEntry",
    "Zone",
    "dma_alloc_attrs",
    "dma_alloc_coherent",
    "dma_coherent_ok",
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
]
