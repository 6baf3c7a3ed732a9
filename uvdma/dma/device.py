"""``struct device`` as the DMA API sees it: masks, and the DMA domain its DMA goes through.

After :meth:`DmaDevice.close`, once its :class:`~uvdma.vfio.VfioDevice` is closed (or
given back to the kernel), or once its DMA domain is closed, allocations, mappings and
mask changes raise :class:`~uvdma.errors.ClosedError`
(:class:`~uvdma.errors.DeviceReleasedError`) naming the device; frees and unmaps of what
it handed out stay allowed while the DMA domain (where the memory lives) is open, and
raise ``ClosedError`` after.  These are flag checks, not locks: every DMA API function
may be called from several threads at once, but closing while another thread is inside
an allocation is the caller's race (quiesce, then close).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from uvdma.dma.debug import DmaDebug, enabled_by_env
from uvdma.dma.domain import DmaDomain, domain_for, release_default
from uvdma.dma.zones import Zone, zone_for_mask
from uvdma.errors import ClosedError
from uvdma.vfio.device import VfioDevice
from uvdma.vfio.domain import IommuDomain

if TYPE_CHECKING:
    from uvdma.dma.streaming import Streaming

U64_MAX = (1 << 64) - 1


def min_not_zero(a: int, b: int) -> int:
    """The kernel's ``min_not_zero``."""
    if a == 0:
        return b
    if b == 0:
        return a
    return min(a, b)


class DmaDevice:
    """``struct device`` for the DMA API: ``dma_mask``, ``coherent_dma_mask``,
    ``bus_dma_limit``, and the :class:`~uvdma.dma.domain.DmaDomain` it allocates from.

    ``DmaDevice(vfio_device, dma_domain)`` uses a domain the caller made over
    ``vfio_device.domain`` and closes.  ``DmaDevice(vfio_device)`` is the default path: it
    uses the DMA domain made for that IOMMU domain by an earlier default-path DmaDevice
    that is still open, or makes one (with ``coherent_pool``, which counts only then: a
    different size later is :class:`~uvdma.errors.DmaDomainError`); the last of those
    DmaDevices to close closes it, so close them before the VFIO device.  ``target`` may
    also be an IOMMU domain (a device with no VFIO device behind it, for tests and tools).

    The masks start at 32 bits, the kernel's default for PCI devices; a driver widens them
    with :func:`~uvdma.dma.dma_set_mask_and_coherent`.
    """

    def __init__(
        self,
        target: VfioDevice | IommuDomain,
        domain: DmaDomain | None = None,
        *,
        name: str | None = None,
        coherent_pool: int | str | None = None,
        debug: bool | None = None,
    ) -> None:
        self._vfio: VfioDevice | None = None
        if isinstance(target, VfioDevice):
            if target.closed:
                raise target.closed_error(f"DmaDevice({name or target.address})")
            self._vfio = target
            iommu = target.domain
            self.name = name or str(target.address)
        else:
            iommu = target
            self.name = name or "dma-device"
        if iommu.closed:
            raise ClosedError(f"DmaDevice({self.name}): {iommu!r} is closed")
        self.domain = iommu  # the IOMMU domain (map, unmap, translate, the IOVA space)
        if domain is None:
            self.dma_domain = domain_for(iommu, coherent_pool, f"DmaDevice({self.name})")
            self._owns_default = True
        else:
            if domain.iommu is not iommu:
                raise ValueError(
                    f"DmaDevice({self.name}): {domain!r} is over another IOMMU domain than "
                    f"the device's {iommu!r}: make the DmaDomain over the device's domain"
                )
            if domain.closed:
                raise ClosedError(f"DmaDevice({self.name}): {domain!r} is closed")
            if coherent_pool is not None:
                raise ValueError(
                    f"DmaDevice({self.name}, coherent_pool={coherent_pool!r}): the pool size "
                    "belongs to the DmaDomain; give it where the domain is made"
                )
            self.dma_domain = domain
            self._owns_default = False
        # None while usable; else why not (the check on every call is this one attribute)
        self._dead: str | None = None
        self.dma_domain.devices.add(self)
        self.dma_mask = (1 << 32) - 1
        self.coherent_dma_mask = (1 << 32) - 1
        self.bus_dma_limit = 0
        self.debug = DmaDebug(self.name, enabled_by_env() if debug is None else debug)
        self._coherent = self.debug.live["coherent"]
        self.coherent_zone: Zone = Zone.DMA32
        self.coherent_limit = self.coherent_dma_mask
        update_coherent_limit(self)
        self._lock = threading.Lock()
        self._streaming: dict[int, Streaming] = {}
        self.closed = False

    def close(self) -> list[str]:
        """Report leaks (DMA-API debug); returns the leak lines. Idempotent.

        From now on allocations, mappings and mask changes raise ClosedError.  With a
        DmaDomain of the caller's, frees and unmaps of what is still out remain allowed
        until that domain closes; on the default path the last DmaDevice to close closes
        the default domain, and its memory goes with it."""
        if self.closed:
            return []
        self.closed = True
        if self._dead is None:
            self._dead = f"DmaDevice {self.name} is closed"
        leaks = self.debug.report_leaks()
        if self._owns_default:
            release_default(self.dma_domain)
        return leaks

    def closed_error(self, what: str) -> ClosedError:
        """The error for ``what`` on this device now that it cannot be used."""
        vd = self._vfio
        if not self.closed and vd is not None and vd.closed:  # the cause, when it is that
            return vd.closed_error(f"{what} on DmaDevice {self.name}")
        if self._dead is None and self.domain.closed:
            return ClosedError(f"{what} on DmaDevice {self.name}: {self.domain!r} is closed")
        return ClosedError(f"{what}: {self._dead or f'DmaDevice {self.name} is closed'}")

    def __enter__(self) -> DmaDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DmaDevice({self.name}, dma_mask={self.dma_mask:#x}, "
            f"coherent={self.coherent_dma_mask:#x})"
        )


def update_coherent_limit(dev: DmaDevice) -> None:
    """Work out once per mask change what every coherent allocation needs: the limit
    (``min_not_zero(coherent_dma_mask, bus_dma_limit)``, dma-direct's ``phys_limit``) and
    its zone by the one rule, :func:`~uvdma.dma.zones.zone_for_mask`."""
    dev.coherent_limit = min_not_zero(dev.coherent_dma_mask, dev.bus_dma_limit)
    dev.coherent_zone = zone_for_mask(dev.coherent_limit)


def check_usable(dev: DmaDevice, what: str) -> None:
    """Allocations, mappings, masks: refused once the device, its VfioDevice or its
    domains are closed."""
    vd = dev._vfio
    if dev._dead is not None or (vd is not None and vd.closed) or dev.domain.closed:
        raise dev.closed_error(what)


def check_memory(dev: DmaDevice, what: str) -> None:
    """Frees and unmaps: refused once the memory is gone with the DMA domain."""
    if dev.dma_domain.closed:
        which = "IOMMU" if dev.domain.closed else "DMA"
        raise ClosedError(
            f"{what} on DmaDevice {dev.name}: its {which} domain is closed, and the DMA "
            "memory went with it"
        )
