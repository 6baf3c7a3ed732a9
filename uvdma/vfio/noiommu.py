"""VFIO's no-IOMMU mode: a device with no IOMMU between it and memory.

The kernel offers it only when built with CONFIG_VFIO_NOIOMMU and told to
(``vfio.enable_unsafe_noiommu_mode=1``, or ``echo Y`` to that module parameter).  vfio-pci
then gives a device with no IOMMU group a fake one named ``vfio-noiommu``, reached through
``/dev/vfio/noiommu-<n>``; a container takes it with ``VFIO_SET_IOMMU(VFIO_NOIOMMU_IOMMU)``
(drivers/vfio/group.c, container.c).  That "IOMMU" has no map or unmap: the device reaches
every byte of memory by its physical address, and nothing stops a stray DMA.

So here a DMA address is the memory's physical address (``/proc/self/pagemap``, root only),
and a mapping is bookkeeping: the memory is locked (``mlock``) and must be physically
contiguous over the whole mapping (a hugepage is; 4 KiB pages are not, past one page).
Hugetlb pages are never swapped, and reclaim and compaction do not move them; only memory
hot-unplug or a CMA/gigantic-page allocation could migrate one, and :meth:`unmap` checks
the physical address again and logs an error if that happened.  A DMA mask or zone is
honoured by the memory's own physical address: memory above it is refused
(:class:`~uvdma.errors.IovaExhaustedError`), and :meth:`NoIommuContainer.alloc_below`
finds hugepages that lie below a limit (a clear error when none does).

Opening a container warns (:class:`NoIommuWarning`, and the log): nothing protects the
machine from the device.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from uvdma import _sys, pci
from uvdma._uapi import vfio as V  # noqa: N812
from uvdma.errors import (
    DmaMapError,
    IovaExhaustedError,
    NoIommuWarning,
    UvdmaError,
    UvdmaOSError,
)
from uvdma.memory import hugepages
from uvdma.memory.hugepages import HugeMemory, physical_address
from uvdma.vfio import _ioctl
from uvdma.vfio.domain import DmaMapping
from uvdma.vfio.iova import ANYWHERE, Window
from uvdma.vfio.type1 import Type1Container, VfioGroup

log = logging.getLogger(__name__)

NOIOMMU_GROUP_NAME = "vfio-noiommu"  # drivers/vfio/group.c vfio_noiommu_group_alloc
_ALL = (1 << 64) - 1
UNPROTECTED = (
    "VFIO no-IOMMU mode: no IOMMU protects memory from this device; it can read and write "
    "any physical address, and a stray DMA corrupts the machine"
)


def enabled(sysfs: Path = pci.SYSFS) -> bool:
    """Whether VFIO's no-IOMMU mode is on (``enable_unsafe_noiommu_mode`` is Y)."""
    return pci.noiommu_mode(sysfs)


def is_noiommu_group(group: int, sysfs: Path = pci.SYSFS) -> bool:
    """Whether IOMMU group ``group`` is one vfio made up for a device with no IOMMU."""
    try:
        name = (sysfs / "kernel/iommu_groups" / str(group) / "name").read_text().strip()
    except OSError:
        return False
    return name == NOIOMMU_GROUP_NAME


def group_path(group: int, devfs: Path = pci.DEVFS) -> Path:
    """The character device of a no-IOMMU group, ``/dev/vfio/noiommu-<n>``."""
    return devfs / "vfio" / f"noiommu-{group}"


class NoIommuContainer(Type1Container):
    """A VFIO container in no-IOMMU mode: DMA addresses are physical addresses.

    Groups are added as with type1 (:meth:`add_group`); :meth:`map` records and locks
    memory at its physical address instead of asking an IOMMU.
    """

    backend = "noiommu"
    iommu_type = V.IommuType.VFIO_NOIOMMU_IOMMU

    def __init__(self) -> None:
        super().__init__()
        warnings.warn(NoIommuWarning(UNPROTECTED), stacklevel=3)
        log.warning("uvdma: %s", UNPROTECTED)

    def _check_extension(self) -> None:
        ok = _ioctl.call(
            self.fd,
            V.VFIO_CHECK_EXTENSION,
            int(self.iommu_type),
            "VFIO_CHECK_EXTENSION(VFIO_NOIOMMU_IOMMU)",
            {},
        )
        if ok != 1:
            raise UvdmaError(
                "VFIO's no-IOMMU mode is off: it needs a kernel with CONFIG_VFIO_NOIOMMU and "
                "`echo Y > /sys/module/vfio/parameters/enable_unsafe_noiommu_mode` (or "
                "vfio.enable_unsafe_noiommu_mode=1 on the kernel command line); use an IOMMU "
                "where there is one"
            )

    def open_group(self, number: int, sysfs: Path = pci.SYSFS) -> VfioGroup:
        """Open ``/dev/vfio/noiommu-<number>`` (not yet in this container)."""
        return VfioGroup(number, sysfs, path=str(group_path(number)))

    # -- what the base class asks of a backend ---------------------------------------------
    def iova_ranges(self) -> list[tuple[int, int]]:
        """Every physical address: there is no IOMMU to narrow them."""
        return [(0, _ALL)]

    def page_sizes(self) -> int:
        return _ALL & ~(_sys.PAGE_SIZE - 1)

    def mappings_left(self) -> int | None:
        return None

    def map(
        self,
        vaddr: int,
        size: int,
        iova: int | None = None,
        *,
        read: bool = True,
        write: bool = True,
        align: int | None = None,
        windows: Sequence[tuple[int, int]] = ANYWHERE,
    ) -> DmaMapping:
        """Lock ``size`` bytes at ``vaddr`` and record them at their physical address.

        Refuses (nothing changed) memory that is not physically contiguous
        (:class:`~uvdma.errors.DmaMapError`), that lies outside every one of ``windows``
        (:class:`~uvdma.errors.IovaExhaustedError`: no IOMMU can move it below a mask),
        whose physical address is not a multiple of ``align``, or an ``iova`` other than
        the physical address.
        """
        self._check(f"DMA map of {size:#x} bytes at vaddr {vaddr:#x}")
        page = _sys.PAGE_SIZE
        if size <= 0 or size % page or vaddr % page:
            raise DmaMapError(
                f"DMA map of {size:#x} bytes at vaddr {vaddr:#x}: address and size must be "
                f"multiples of the page size {page:#x}"
            )
        phys = self._physical(vaddr, size)
        what = f"no-IOMMU DMA map of {size:#x} bytes at vaddr {vaddr:#x} (physical {phys:#x})"
        if iova is not None and iova != phys:
            raise DmaMapError(
                f"{what}: cannot appear at IOVA {iova:#x}; with no IOMMU a device sees "
                "memory at its physical address only (let uvdma choose the address)"
            )
        if not any(lo <= phys and phys + size - 1 <= hi for lo, hi in windows):
            shown = ", ".join(f"[{lo:#x}, {hi:#x}]" for lo, hi in windows)
            raise IovaExhaustedError(
                f"{what}: the memory lies outside {shown} and no IOMMU can remap it; "
                "allocate memory there with NoIommuContainer.alloc_below, or allow a wider "
                "DMA mask"
            )
        if align and phys % align:
            raise DmaMapError(f"{what}: the physical address is not aligned to {align:#x}")
        return super().map(vaddr, size, phys, read=read, write=write)

    def _physical(self, vaddr: int, size: int) -> int:
        """Lock the range and return its physical start; refuse a discontiguous range."""
        k = _sys.kernel()
        try:
            k.mlock(vaddr, size)  # resident now and never swapped
        except OSError as e:
            raise UvdmaOSError(
                e.errno or errno.EIO,
                f"locking {size:#x} bytes at {vaddr:#x} for no-IOMMU DMA: "
                f"{hugepages.memlock_fix(size)}",
            ) from e
        first = physical_address(vaddr)
        for off in range(_sys.PAGE_SIZE, size, _sys.PAGE_SIZE):
            got = physical_address(vaddr + off)
            if got != first + off:
                raise DmaMapError(
                    f"no-IOMMU DMA map of {size:#x} bytes at vaddr {vaddr:#x}: not physically "
                    f"contiguous (the page at +{off:#x} is at physical {got:#x}, not "
                    f"{first + off:#x}); with no IOMMU a buffer must be one physical range: "
                    "use hugepages (`uvdma hugepages`) and map at most one hugepage at a time"
                )
        return first

    def _kernel_map(self, m: DmaMapping) -> None:
        pass  # no IOMMU to program; _physical locked the memory

    def _kernel_unmap(self, m: DmaMapping) -> None:
        # the caller unmaps before freeing, so the memory is still there to look at
        with contextlib.suppress(UvdmaError, OSError):
            now = physical_address(m.vaddr)
            if now != m.iova:
                log.error(
                    "uvdma: no-IOMMU memory at vaddr %#x moved from physical %#x to %#x "
                    "while mapped: the device may have written to the old place",
                    m.vaddr,
                    m.iova,
                    now,
                )

    # -- placement -------------------------------------------------------------------------
    def memory_for(self, size: int, windows: Sequence[Window]) -> HugeMemory:
        """With no IOMMU the DMA address is the physical address: up to one hugepage is
        placed at or below the highest window's top (:meth:`alloc_below`); larger memory is
        allocated as usual, and :meth:`map` checks where it lies."""
        if size > hugepages.PAGE_2M:
            return super().memory_for(size, windows)
        return self.alloc_below(size, max(hi for _lo, hi in windows))

    def alloc_below(self, size: int, limit: int, *, tries: int | None = None) -> HugeMemory:
        """Hugepage memory of ``size`` bytes (at most one hugepage) whose physical range
        lies at or below ``limit``: the no-IOMMU way of honouring a DMA mask.

        Takes free hugepages one at a time and keeps the first that fits, holding the
        others meanwhile so the kernel hands out a different one next (all are given back
        before returning).  Raises :class:`~uvdma.errors.IovaExhaustedError` naming
        the lowest physical address seen when no free hugepage fits.
        """
        if size <= 0:
            raise UvdmaError(f"no-IOMMU allocation of {size} bytes: the size must be positive")
        held: list[HugeMemory] = []
        lowest: int | None = None
        try:
            while tries is None or len(held) < tries:
                try:
                    mem = hugepages.allocate(size, fallback=False)
                except UvdmaError:
                    break  # no more free hugepages
                if mem.size > mem.page_size:
                    mem.close()
                    raise UvdmaError(
                        f"no-IOMMU allocation of {size:#x} bytes: larger than one hugepage "
                        f"({mem.page_size:#x}), so not physically contiguous; allocate "
                        "pieces of at most one hugepage"
                    )
                held.append(mem)
                self._lock_and_touch(mem)
                phys = physical_address(mem.vaddr)
                if phys + mem.size - 1 <= limit:
                    held.pop()
                    return mem
                lowest = phys if lowest is None else min(lowest, phys)
        finally:
            for m in held:
                m.close()
        seen = (
            "no free hugepage at all"
            if lowest is None
            else f"{len(held)} free hugepage(s), the lowest at physical {lowest:#x}"
        )
        raise IovaExhaustedError(
            f"no-IOMMU allocation of {size:#x} bytes below {limit:#x}: {seen}; with no IOMMU "
            "the mask must be met by the memory itself: reserve more hugepages (the kernel "
            "takes them from the highest memory first, so only pages reserved beyond what "
            "fits above the limit land below it: `uvdma hugepages --count N`), or allow a "
            "wider DMA mask"
        )

    @staticmethod
    def _lock_and_touch(mem: HugeMemory) -> None:
        with contextlib.suppress(OSError):
            _sys.kernel().mlock(mem.vaddr, mem.size)

    def __repr__(self) -> str:
        return f"IommuDomain(noiommu, {len(self._maps)} mappings, UNPROTECTED)"


def available(sysfs: Path = pci.SYSFS) -> bool:
    """Whether this kernel's VFIO is in no-IOMMU mode and ``/dev/vfio/vfio`` exists."""
    return enabled(sysfs) and os.path.exists("/dev/vfio/vfio")
