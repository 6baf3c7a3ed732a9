"""The DMA domain: what the DMA API keeps per IOMMU domain, made and closed by its caller.

A :class:`DmaDomain` is created over an :class:`~uvdma.vfio.IommuDomain` and owns the
DMA state of that IOVA space: the page allocator (:mod:`uvdma.dma.pages`, the kernel's
``alloc_pages``) and the atomic pools (:mod:`uvdma.dma.pool`, pool.c's, sized once here by
``coherent_pool``).  Devices use it through :class:`~uvdma.dma.device.DmaDevice`
(``DmaDevice(vfio_device, dma_domain)``).  The IOMMU domain below knows nothing of it.

Teardown order (the one place it is written):

1. every :class:`DmaDevice` of the domain refuses further use (``ClosedError``);
2. the atomic pools' refill worker stops (no new memory is mapped after this);
3. the page allocator gives back every region: unmapped from the IOMMU first, then
   unmapped from the process (its pools' memory included: the atomic pools and
   dma_pool pages are carved from these regions);
4. the caller closes the IOMMU domain (or the VFIO device that owns it) afterwards.

If the IOMMU domain is closed first (a VFIO device given back to the kernel), it has
unmapped everything already; closing the DMA domain then only frees the host memory.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

from uvdma.dma.pages import PageAllocator
from uvdma.dma.pool import AtomicPools, resolve_pool_size
from uvdma.errors import ClosedError, DmaDomainError
from uvdma.vfio.domain import IommuDomain

if TYPE_CHECKING:
    from uvdma.dma.device import DmaDevice


class DmaDomain:
    """The page allocator and the atomic pools of one IOMMU domain. Closeable, a context
    manager; thread-safe as its parts are.

    ``coherent_pool`` sizes the atomic pools (bytes, or text as the kernel's
    ``coherent_pool=``: ``512K``; None: ``UVDMA_COHERENT_POOL`` or pool.c's default).  It
    is given here, once.
    """

    def __init__(self, iommu: IommuDomain, *, coherent_pool: int | str | None = None) -> None:
        if iommu.closed:
            raise ClosedError(f"DmaDomain({iommu!r}): the IOMMU domain is closed")
        self.iommu = iommu
        self._closed = False
        self.devices: weakref.WeakSet[DmaDevice] = weakref.WeakSet()
        self.pages = PageAllocator(iommu)
        try:
            self.pools = AtomicPools(self.pages, coherent_pool)
        except BaseException:
            self.pages.close()
            raise
        # DmaDevices made by the default path (DmaDevice(vfio) with no domain) that share
        # this domain; the last of them to close closes it (see domain_for).
        self._default_users = 0

    @property
    def closed(self) -> bool:
        """Whether the DMA memory is gone: this domain closed, or its IOMMU domain."""
        return self._closed or self.iommu.closed

    @property
    def atomic_pool_size(self) -> int:
        """The ``coherent_pool`` size the atomic pools were made with."""
        return self.pools.atomic_pool_size

    def close(self) -> None:
        """Tear down in the order the module docstring gives. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for dev in list(self.devices):
            if dev._dead is None:
                dev._dead = (
                    f"DmaDevice {dev.name}: its DMA domain is closed (its DMA memory went with it)"
                )
        try:
            self.pools.close()
        finally:
            self.pages.close()
        with _default_lock:
            if _default.get(self.iommu) is self:
                del _default[self.iommu]

    def __enter__(self) -> DmaDomain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"coherent_pool={self.atomic_pool_size}"
        return f"DmaDomain({self.iommu!r}, {state})"


# The default path: DmaDevice(vfio_device) with no DmaDomain uses the one made for that
# IOMMU domain by an earlier DmaDevice, or makes it.  Kept here, in the DMA layer, keyed
# weakly by the IOMMU domain (which holds nothing of ours).
_default: weakref.WeakKeyDictionary[IommuDomain, DmaDomain] = weakref.WeakKeyDictionary()
_default_lock = threading.Lock()


def domain_for(iommu: IommuDomain, coherent_pool: int | str | None, who: str) -> DmaDomain:
    """The default DMA domain of ``iommu``: the open one made by an earlier default-path
    DmaDevice, or a new one.  A ``coherent_pool`` that differs from the size the domain
    was made with raises :class:`~uvdma.errors.DmaDomainError` (nothing changes): there
    is one pool size per domain.  The caller must pair it with :func:`release_default`."""
    with _default_lock:
        dom = _default.get(iommu)
        if dom is not None and dom.closed:
            dom = None
        if dom is None:
            dom = DmaDomain(iommu, coherent_pool=coherent_pool)
            _default[iommu] = dom
        elif coherent_pool is not None:
            asked = resolve_pool_size(coherent_pool)
            if asked != dom.atomic_pool_size:
                raise DmaDomainError(
                    f"{who}: coherent_pool={coherent_pool!r} ({asked} bytes), but the DMA "
                    f"domain of {iommu!r} was made with {dom.atomic_pool_size} bytes: the "
                    "pool size is set once, where the domain is made. Pass no coherent_pool "
                    "here, or make one DmaDomain(iommu_domain, coherent_pool=...) yourself "
                    "and give it to every DmaDevice"
                )
        dom._default_users += 1
        return dom


def release_default(dom: DmaDomain) -> None:
    """A default-path DmaDevice is done with ``dom``: the last one closes it."""
    with _default_lock:
        dom._default_users -= 1
        last = dom._default_users == 0
    if last:
        dom.close()
