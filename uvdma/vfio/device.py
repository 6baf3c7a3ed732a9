"""A PCI device opened through VFIO: regions, BARs, config space, interrupts, reset.

Teardown order, enforced by :meth:`VfioDevice.close`: interrupts off and their eventfds
closed, BAR mappings unmapped, the device fd closed; then, if the device made its own
IOMMU domain, the domain (its DMA mappings unmapped, its groups and container closed).
A domain shared between devices is the caller's to close, after the devices.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from uvdma import _sys, pci
from uvdma._uapi import vfio as V  # noqa: N812
from uvdma._uapi import walk_caps
from uvdma.errors import PciError, UvdmaError, UvdmaOSError
from uvdma.vfio import _ioctl, iommufd, type1
from uvdma.vfio.domain import IommuDomain

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_MSIX = 0x11
PCI_CAP_ID_EXP = 0x10


@dataclass(frozen=True)
class RegionInfo:
    """VFIO_DEVICE_GET_REGION_INFO, capabilities decoded."""

    index: int
    flags: int
    size: int
    offset: int
    sparse_areas: tuple[tuple[int, int], ...] = ()
    msix_mappable: bool = False

    @property
    def mappable(self) -> bool:
        """Whether the region can be mmap'd."""
        return bool(self.flags & V.RegionFlags.VFIO_REGION_INFO_FLAG_MMAP)


@dataclass(frozen=True)
class IrqInfo:
    """VFIO_DEVICE_GET_IRQ_INFO."""

    index: int
    flags: int
    count: int


class Bar:
    """An mmap'd BAR.  Each register access is one load or store of its width.

    ``read32``/``write32``/``read64``/``write64`` check the offset is aligned and inside
    the BAR; the access goes through the syscall seam's ``mmio32``/``mmio64`` (on Linux a
    ``ctypes.c_uint32`` at the address: one 32-bit access, no system call; behind a fake
    kernel, the device model sees it as it happens).
    """

    def __init__(self, region: RegionInfo, addr: int) -> None:
        self.region = region
        self.addr = addr
        self.size = region.size
        self._closed = False

    def _at(self, offset: int, width: int) -> int:
        if self._closed:
            raise UvdmaError(f"BAR{self.region.index} is unmapped")
        if offset < 0 or offset + width > self.size or offset % width:
            raise ValueError(
                f"BAR{self.region.index} access of {width} bytes at {offset:#x}: must be "
                f"aligned and inside the BAR ({self.size:#x} bytes)"
            )
        return self.addr + offset

    def reg32(self, offset: int) -> _sys.Register:
        """A 32-bit register as an object, checked once: ``.value`` is one load or store.
        For hot registers (doorbells), where the per-access check would cost."""
        return _sys.kernel().mmio32(self._at(offset, 4))

    def read32(self, offset: int) -> int:
        """One 32-bit load."""
        return _sys.kernel().mmio32(self._at(offset, 4)).value

    def write32(self, offset: int, value: int) -> None:
        """One 32-bit store."""
        _sys.kernel().mmio32(self._at(offset, 4)).value = value

    def read64(self, offset: int) -> int:
        """One 64-bit load."""
        return _sys.kernel().mmio64(self._at(offset, 8)).value

    def write64(self, offset: int, value: int) -> None:
        """One 64-bit store."""
        _sys.kernel().mmio64(self._at(offset, 8)).value = value

    def close(self) -> None:
        """munmap the BAR. Idempotent."""
        if not self._closed:
            _sys.kernel().munmap(self.addr, self.size)
            self._closed = True


class VfioDevice:
    """A device handed to user space by VFIO. Use :func:`open_device` to get one."""

    def __init__(
        self,
        address: pci.PciAddress,
        fd: int,
        domain: IommuDomain,
        *,
        owns_domain: bool,
        group: type1.VfioGroup | None = None,
    ) -> None:
        self.address = address
        self.fd = fd
        self.domain = domain
        self._owns_domain = owns_domain
        self.group = group  # type1: the IOMMU group the device was opened through
        self._bars: dict[int, Bar] = {}
        self._irq_fds: dict[int, list[int]] = {}
        self.closed = False
        _buf, info = _ioctl.info(fd, V.VFIO_DEVICE_GET_INFO, V.vfio_device_info, "device info")
        self.flags = int(info.flags)
        self.num_regions = int(info.num_regions)
        self.num_irqs = int(info.num_irqs)
        if not self.flags & V.DeviceFlags.VFIO_DEVICE_FLAGS_PCI:
            raise UvdmaError(f"{address} is not a PCI device as VFIO sees it")

    @property
    def backend(self) -> str:
        """``type1`` or ``iommufd``."""
        return self.domain.backend

    # -- regions ----------------------------------------------------------------------------
    def region_info(self, index: int) -> RegionInfo:
        """VFIO_DEVICE_GET_REGION_INFO for one region (argsz grows for capabilities)."""

        def setup(r: V.vfio_region_info) -> None:
            r.index = index

        buf, r = _ioctl.info(
            self.fd,
            V.VFIO_DEVICE_GET_REGION_INFO,
            V.vfio_region_info,
            f"{self.address} region {index} info",
            setup,
            {errno.EINVAL: f"the device has {self.num_regions} regions"},
        )
        sparse: list[tuple[int, int]] = []
        msix = False
        if r.flags & V.RegionFlags.VFIO_REGION_INFO_FLAG_CAPS:
            for cap_id, _ver, off in walk_caps(buf, r.cap_offset):
                if cap_id == V.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                    cap = V.vfio_region_info_cap_sparse_mmap.from_buffer(buf, off)
                    base = off + ctypes.sizeof(cap)
                    step = ctypes.sizeof(V.vfio_region_sparse_mmap_area)
                    for i in range(cap.nr_areas):
                        a = V.vfio_region_sparse_mmap_area.from_buffer(buf, base + i * step)
                        sparse.append((a.offset, a.size))
                elif cap_id == V.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
                    msix = True
        return RegionInfo(index, int(r.flags), int(r.size), int(r.offset), tuple(sparse), msix)

    def bar(self, index: int) -> Bar:
        """BAR ``index`` mmap'd (once; later calls return the same mapping)."""
        if index in self._bars:
            return self._bars[index]
        region = self.region_info(index)
        if region.size == 0:
            raise UvdmaError(f"{self.address} has no BAR{index}")
        if not region.mappable:
            raise UvdmaError(
                f"{self.address} BAR{index} cannot be mmap'd: use region_read/region_write"
            )
        try:
            addr = _sys.kernel().mmap(
                region.size,
                _sys.PROT_READ | _sys.PROT_WRITE,
                _sys.MAP_SHARED,
                self.fd,
                region.offset,
            )
        except OSError as e:
            raise UvdmaOSError(e.errno or errno.EIO, f"mmap of {self.address} BAR{index}") from e
        bar = Bar(region, addr)
        self._bars[index] = bar
        return bar

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        """Read through the device fd (for regions that cannot be mmap'd, and config space)."""
        region = self.region_info(index)
        if offset < 0 or offset + size > region.size:
            raise ValueError(
                f"region {index}: {offset:#x}+{size} is outside its {region.size:#x} bytes"
            )
        return _sys.kernel().pread(self.fd, size, region.offset + offset)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Write through the device fd."""
        region = self.region_info(index)
        if offset < 0 or offset + len(data) > region.size:
            raise ValueError(
                f"region {index}: {offset:#x}+{len(data)} is outside its {region.size:#x} bytes"
            )
        _sys.kernel().pwrite(self.fd, data, region.offset + offset)

    # -- config space ----------------------------------------------------------------------
    def config_read(self, offset: int, width: int) -> int:
        """Read 1, 2 or 4 bytes of PCI config space (little-endian)."""
        data = self.region_read(V.PciRegion.VFIO_PCI_CONFIG_REGION_INDEX, offset, width)
        return int.from_bytes(data, "little")

    def config_write(self, offset: int, width: int, value: int) -> None:
        """Write 1, 2 or 4 bytes of PCI config space."""
        self.region_write(
            V.PciRegion.VFIO_PCI_CONFIG_REGION_INDEX, offset, value.to_bytes(width, "little")
        )

    def capabilities(self) -> dict[int, int]:
        """The standard PCI capability list: {capability id: config offset}."""
        caps: dict[int, int] = {}
        if not self.config_read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
            return caps
        ptr = self.config_read(PCI_CAPABILITY_LIST, 1) & ~3
        seen: set[int] = set()
        while ptr and ptr not in seen:
            seen.add(ptr)
            cap_id = self.config_read(ptr, 1)
            caps.setdefault(cap_id, ptr)
            ptr = self.config_read(ptr + 1, 1) & ~3
        return caps

    def enable_bus_master(self) -> None:
        """Let the device master the bus (DMA) and decode its memory BARs."""
        cmd = self.config_read(PCI_COMMAND, 2)
        self.config_write(PCI_COMMAND, 2, cmd | PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY)

    # -- interrupts ------------------------------------------------------------------------
    def irq_info(self, index: int) -> IrqInfo:
        """VFIO_DEVICE_GET_IRQ_INFO: how many vectors an interrupt type offers."""
        info = V.vfio_irq_info(argsz=ctypes.sizeof(V.vfio_irq_info), index=index)
        _ioctl.call(self.fd, V.VFIO_DEVICE_GET_IRQ_INFO, info, f"{self.address} IRQ info", {})
        return IrqInfo(index, int(info.flags), int(info.count))

    def enable_irqs(self, count: int, index: int = V.PciIrq.VFIO_PCI_MSIX_IRQ_INDEX) -> list[int]:
        """Bind ``count`` vectors (MSI-X by default) to new eventfds; returns the eventfds."""
        info = self.irq_info(index)
        if not 0 < count <= info.count:
            kind = V.PciIrq(index).name
            raise ValueError(f"{self.address} offers {info.count} {kind} vectors, not {count}")
        self.disable_irqs(index)
        k = _sys.kernel()
        fds: list[int] = []
        try:
            for _ in range(count):
                fds.append(k.eventfd(0, os.EFD_NONBLOCK))
            self._set_irqs(index, fds)
        except BaseException:
            for fd in fds:
                k.close(fd)
            raise
        self._irq_fds[index] = fds
        return fds

    def _set_irqs(self, index: int, fds: list[int]) -> None:
        head = ctypes.sizeof(V.vfio_irq_set)
        buf = ctypes.create_string_buffer(head + 4 * len(fds))
        s = V.vfio_irq_set.from_buffer(buf)
        s.argsz = ctypes.sizeof(buf)
        s.index = index
        s.start = 0
        s.count = len(fds)
        if fds:
            s.flags = (
                V.IrqSetFlags.VFIO_IRQ_SET_DATA_EVENTFD | V.IrqSetFlags.VFIO_IRQ_SET_ACTION_TRIGGER
            )
            arr = (ctypes.c_int32 * len(fds)).from_buffer(buf, head)
            for i, fd in enumerate(fds):
                arr[i] = fd
        else:
            s.flags = (
                V.IrqSetFlags.VFIO_IRQ_SET_DATA_NONE | V.IrqSetFlags.VFIO_IRQ_SET_ACTION_TRIGGER
            )
        _ioctl.call(self.fd, V.VFIO_DEVICE_SET_IRQS, buf, f"{self.address} SET_IRQS", {})

    def enabled_vectors(self, index: int = V.PciIrq.VFIO_PCI_MSIX_IRQ_INDEX) -> int:
        """How many vectors of an interrupt type :meth:`enable_irqs` bound to eventfds."""
        return len(self._irq_fds.get(index, ()))

    def wait_irq(
        self, vector: int, timeout: float, index: int = V.PciIrq.VFIO_PCI_MSIX_IRQ_INDEX
    ) -> int:
        """Wait for interrupts on ``vector``; returns how many arrived since the last wait.

        Raises ``TimeoutError`` naming the vector when none arrives within ``timeout`` s.
        """
        fds = self._irq_fds.get(index)
        if not fds or not 0 <= vector < len(fds):
            raise ValueError(f"vector {vector} is not enabled: call enable_irqs first")
        k = _sys.kernel()
        if not k.wait_readable(fds[vector], timeout):
            raise TimeoutError(
                f"{self.address}: no interrupt on {V.PciIrq(index).name} vector {vector} "
                f"within {timeout} s"
            )
        return int.from_bytes(k.read(fds[vector], 8), "little")

    def unmask_irq(self, index: int = V.PciIrq.VFIO_PCI_INTX_IRQ_INDEX) -> None:
        """Unmask an interrupt VFIO masked when it fired (INTx is automasked, vfio.h:
        VFIO_IRQ_INFO_AUTOMASKED): call it after handling each INTx."""
        buf = ctypes.create_string_buffer(ctypes.sizeof(V.vfio_irq_set))
        s = V.vfio_irq_set.from_buffer(buf)
        s.argsz = ctypes.sizeof(buf)
        s.flags = V.IrqSetFlags.VFIO_IRQ_SET_DATA_NONE | V.IrqSetFlags.VFIO_IRQ_SET_ACTION_UNMASK
        s.index, s.start, s.count = index, 0, 1
        _ioctl.call(self.fd, V.VFIO_DEVICE_SET_IRQS, buf, f"{self.address} unmask IRQ {index}", {})

    def disable_irqs(self, index: int = V.PciIrq.VFIO_PCI_MSIX_IRQ_INDEX) -> None:
        """Turn an interrupt type off and close its eventfds."""
        fds = self._irq_fds.pop(index, None)
        if fds is None:
            return
        try:
            self._set_irqs(index, [])
        finally:
            for fd in fds:
                _sys.kernel().close(fd)

    def reset(self) -> None:
        """VFIO_DEVICE_RESET (function-level or whatever reset the device supports)."""
        if not self.flags & V.DeviceFlags.VFIO_DEVICE_FLAGS_RESET:
            raise UvdmaError(f"{self.address} does not support reset through VFIO")
        _ioctl.call(self.fd, V.VFIO_DEVICE_RESET, 0, f"resetting {self.address}", {})

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Interrupts, BARs, device fd; then the domain if this device owns it. Idempotent."""
        if self.closed:
            return
        self.closed = True
        with contextlib.ExitStack() as stack:
            # ExitStack runs these in reverse: the domain last. The domain closes the
            # groups itself, after unmapping: a group leaving its container takes the
            # container's IOMMU (and every mapping) with it.
            if self._owns_domain:
                stack.callback(self.domain.close)
            stack.callback(_sys.kernel().close, self.fd)
            for bar in self._bars.values():
                stack.callback(bar.close)
            for index in list(self._irq_fds):
                stack.callback(self.disable_irqs, index)

    def __enter__(self) -> VfioDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VfioDevice({self.address}, backend={self.backend}, regions={self.num_regions})"


def choose_backend(backend: str = "auto") -> str:
    """``iommufd`` when the kernel offers it (``/dev/iommu`` and vfio cdevs), else ``type1``."""
    if backend not in ("auto", "type1", "iommufd"):
        raise ValueError(f"backend must be auto, type1 or iommufd, not {backend!r}")
    if backend == "auto":
        return "iommufd" if iommufd.available() else "type1"
    return backend


def new_domain(backend: str = "auto") -> IommuDomain:
    """A fresh IOMMU domain of the chosen backend (to share between devices)."""
    if choose_backend(backend) == "iommufd":
        return iommufd.IommufdDomain()
    return type1.Type1Container()


def open_device(
    address: str | pci.PciAddress,
    *,
    backend: str = "auto",
    domain: IommuDomain | None = None,
    sysfs: Path = pci.SYSFS,
) -> VfioDevice:
    """Open a device bound to vfio-pci, in ``domain`` or in a new domain of its own.

    Refuses a device that is absent, not bound to vfio-pci, or in a group that is not
    viable, with the fix in the message; nothing is left open on any error.
    """
    dev = pci.device(address, sysfs)
    if dev.driver != pci.VFIO_PCI:
        raise PciError(
            f"{dev.address} is bound to {dev.driver or 'no driver'}, not vfio-pci: "
            f"`uvdma bind {dev.address}` (as root)"
        )
    group_no = dev.iommu_group
    if group_no is None:
        raise PciError(f"{dev.address} has no IOMMU group: turn the IOMMU on (`uvdma doctor`)")
    kind = domain.backend if domain is not None else choose_backend(backend)
    with contextlib.ExitStack() as stack:
        owns = domain is None
        if domain is None:
            domain = new_domain(kind)
            stack.callback(domain.close)
        group: type1.VfioGroup | None = None
        if isinstance(domain, type1.Type1Container):
            group = next((g for g in domain.groups if g.number == group_no), None)
            if group is None:
                group = type1.VfioGroup(group_no, sysfs)
                stack.callback(group.close)
                domain.add_group(group)
            fd = group.device_fd(dev.address)
            stack.callback(_sys.kernel().close, fd)
        elif isinstance(domain, iommufd.IommufdDomain):
            path = iommufd.cdev_path(dev.address, sysfs)
            try:
                fd = _sys.kernel().open(path, os.O_RDWR)
            except OSError as e:
                raise UvdmaOSError(e.errno or errno.EIO, f"opening {path}: run as root") from e
            stack.callback(_sys.kernel().close, fd)
            domain.attach(fd, dev.address)
        else:
            raise TypeError(f"unknown IOMMU domain {domain!r}")
        device = VfioDevice(dev.address, fd, domain, owns_domain=owns, group=group)
        stack.pop_all()
        return device
    raise AssertionError("unreachable")  # pragma: no cover
