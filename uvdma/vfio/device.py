"""A PCI device opened through VFIO: regions, BARs, config space, interrupts, reset.

Teardown order, enforced by :meth:`VfioDevice.close`: interrupts off and their eventfds
closed, BAR mappings unmapped, the device fd closed; then, if the device made its own
IOMMU domain, the domain (its DMA mappings unmapped, its groups and container closed).
A domain shared between devices is the caller's to close, after the devices (it refuses
while they are open).

After close every method raises :class:`~uvdma.errors.ClosedError` naming the device, and
a second close does nothing.  A BAR is never left unmapped under a stale register pointer:
its address range is replaced by inert anonymous memory (reads see zeros, writes go
nowhere), so a ``reg32()`` kept by a driver cannot crash the process.

The device request (vfio.h: VFIO_PCI_REQ_IRQ_INDEX).  When the kernel wants a device back
(``uvdma unbind``, hot-unplug: drivers/vfio/vfio_main.c vfio_unregister_group_dev asks at
once and then every 10 s, and waits until the device is released), vfio-pci signals an
eventfd that every :class:`VfioDevice` registers when it opens and a uvdma thread watches.
The handler set with :meth:`VfioDevice.on_release_request` is then called from that
thread; it must quiesce its user and call :meth:`VfioDevice.close`.  Without a handler (or
when it returns without closing) uvdma releases the device itself: BARs become inert
memory, the device fd is closed (its number pointed at /dev/null), and with type1 the
group leaves its container unless another open device of this process uses it, so the
device's own driver can take the group's DMA ownership back.  Interrupt eventfds and DMA
memory stay until close.  Later calls raise :class:`~uvdma.errors.DeviceReleasedError`.

Threads: every method may be called from several threads (the kernel serialises the
ioctls; BAR maps, interrupt tables and close are under a lock).  A call racing close() or
a release either completes or raises ClosedError/DeviceReleasedError; none crashes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from uvdma import _sys, pci
from uvdma._uapi import vfio as V  # noqa: N812
from uvdma._uapi import walk_caps
from uvdma.errors import (
    ClosedError,
    DeviceReleasedError,
    PciError,
    UvdmaError,
    UvdmaOSError,
)
from uvdma.vfio import _ioctl, iommufd, noiommu, type1
from uvdma.vfio.domain import IommuDomain

log = logging.getLogger(__name__)

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34
REQ_IRQ = V.PciIrq.VFIO_PCI_REQ_IRQ_INDEX
_WATCH_POLL = 3600.0  # the watcher sleeps in poll(); close() wakes it through VFIO's loopback
_RELEASED = (
    "the kernel asked for it back (uvdma unbind, hot-unplug) and uvdma released it; open it "
    "again once it is bound to vfio-pci"
)

#: Called from uvdma's watcher thread when the kernel asks for the device back.
ReleaseHandler = Callable[["VfioDevice"], None]


class _Registry:
    """The devices this process has open, by address (a device opens once)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.devices: dict[pci.PciAddress, VfioDevice] = {}


_registry = _Registry()


def _reset_registry() -> None:
    global _registry  # noqa: PLW0603 - a forked child starts with nothing open of its own
    _registry = _Registry()


os.register_at_fork(after_in_child=_reset_registry)


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

    def __init__(self, region: RegionInfo, addr: int, device: str = "") -> None:
        self.region = region
        self.addr = addr
        self.size = region.size
        self._closed = False
        self._device = device  # the VfioDevice's address, for messages
        self._released = False  # closed because the kernel took the device back

    @property
    def closed(self) -> bool:
        """Whether the BAR is unmapped (closed, or its device released)."""
        return self._closed

    def _closed_error(self, what: str = "") -> ClosedError:
        """The error for a use after close, naming the BAR and its device."""
        name = f"Bar {self.region.index}" + (
            f" of VfioDevice {self._device}" if self._device else ""
        )
        prefix = f"{what}: " if what else ""
        if self._released:
            return DeviceReleasedError(f"{prefix}{name}: {_RELEASED}")
        return ClosedError(f"{prefix}{name} is closed")

    def _at(self, offset: int, width: int) -> int:
        if self._closed:
            raise self._closed_error()
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
        """Unmap the BAR. Idempotent.  The address range is left holding inert anonymous
        memory rather than nothing, so a register object kept from :meth:`reg32` reads
        zeros and writes nowhere instead of crashing the process."""
        if self._closed:
            return
        self._closed = True  # first: a racing access then fails the check, or hits inert memory
        _sys.retire_mapping(self.addr, self.size)

    def _release(self) -> None:
        self._released = True
        self.close()


class VfioDevice:
    """A device handed to user space by VFIO. Use :func:`open_device` to get one.

    ``closed`` is true after :meth:`close` and after the kernel took the device back
    (:attr:`release_requested`); every method then raises :meth:`closed_error`.
    """

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
        #: Why this backend: "asked for", the domain's, or what ``auto`` found (and missed)
        self.backend_reason = "asked for"
        self._bars: dict[int, Bar] = {}
        self._irq_fds: dict[int, list[int]] = {}
        self.closed = False
        self._closing = False
        self._released = False
        self._release_requested = False
        self._fd_open = True  # False once a release has closed the device fd outright
        self._lock = threading.RLock()  # BARs, interrupt tables, close and release
        self._waiters = 0  # threads inside wait_irq
        self._orphans: list[int] = []  # eventfds to close once those threads are out
        self._handler: ReleaseHandler | None = None
        self._watcher: threading.Thread | None = None
        self._stop_watch = False
        _buf, info = _ioctl.info(fd, V.VFIO_DEVICE_GET_INFO, V.vfio_device_info, "device info")
        self.flags = int(info.flags)
        self.num_regions = int(info.num_regions)
        self.num_irqs = int(info.num_irqs)
        if not self.flags & V.DeviceFlags.VFIO_DEVICE_FLAGS_PCI:
            raise UvdmaError(f"{address} is not a PCI device as VFIO sees it")

    @property
    def backend(self) -> str:
        """``type1``, ``iommufd`` or ``noiommu``."""
        return self.domain.backend

    def closed_error(self, what: str) -> ClosedError:
        """The error for ``what`` on this device once it is closed or released."""
        if self._released:
            return DeviceReleasedError(f"{what}: VfioDevice {self.address}: {_RELEASED}")
        return ClosedError(f"{what}: VfioDevice {self.address} is closed")

    def _check(self, what: str) -> None:
        if self.closed:
            raise self.closed_error(what)

    # -- the device request ---------------------------------------------------------------
    def on_release_request(self, handler: ReleaseHandler | None) -> None:
        """Call ``handler(device)`` when the kernel asks for the device back (vfio-pci's
        device request: ``uvdma unbind``, hot-unplug).

        It is called from uvdma's watcher thread, at most once; it must quiesce its user
        (stop I/O, disable the device) and call :meth:`close`.  If it raises or returns
        without closing, uvdma releases the device itself, as with no handler.  ``None``
        restores that default.
        """
        if handler is not None and not callable(handler):
            raise TypeError(f"on_release_request takes a callable or None, not {handler!r}")
        self._handler = handler

    @property
    def release_requested(self) -> bool:
        """Whether the kernel has asked for the device back."""
        return self._release_requested

    def _watch_requests(self) -> None:
        """Register an eventfd for the device request and start the thread that waits on
        it (vfio_pci_core_request signals it).  Devices without the interrupt go without."""
        if self.num_irqs <= REQ_IRQ:
            return
        try:
            info = self.irq_info(REQ_IRQ)
        except UvdmaError:
            return
        if info.count < 1 or not info.flags & V.IrqInfoFlags.VFIO_IRQ_INFO_EVENTFD:
            return
        k = _sys.kernel()
        fd = k.eventfd(0, os.EFD_NONBLOCK)
        try:
            self._set_irqs(REQ_IRQ, [fd])
        except UvdmaError as e:
            k.close(fd)
            log.debug("uvdma: %s: no device request channel (%s)", self.address, e)
            return
        t = threading.Thread(
            target=self._watch, args=(fd, k), name=f"uvdma-req-{self.address}", daemon=True
        )
        self._watcher = t
        t.start()

    def _watch(self, fd: int, k: _sys.Kernel) -> None:
        try:
            while not self._stop_watch:
                if not k.wait_readable(fd, _WATCH_POLL):
                    continue
                with contextlib.suppress(OSError):
                    k.read(fd, 8)
                if self._stop_watch:
                    break  # close() woke us
                self._on_release_request()
                break
        except Exception:
            log.exception("uvdma: the device request watcher of %s failed", self.address)
        finally:
            with contextlib.suppress(OSError):
                k.close(fd)

    def _on_release_request(self) -> None:
        self._release_requested = True
        handler = self._handler
        log.info("uvdma: the kernel asks for %s back", self.address)
        if handler is not None:
            try:
                handler(self)
            except Exception:
                log.exception(
                    "uvdma: the release handler of %s failed; uvdma releases the device",
                    self.address,
                )
        if not self.closed:
            if handler is not None:
                log.warning(
                    "uvdma: the release handler of %s returned without closing it; uvdma "
                    "releases the device",
                    self.address,
                )
            self._release()

    def _release(self) -> None:
        """Give the device up without touching what the user may still hold: BARs become
        inert memory, the device fd is closed, the group (type1) leaves its container."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._released = True
            for bar in self._bars.values():
                bar._release()
            self._retire_fd()
        group, domain = self.group, self.domain
        if group is not None and isinstance(domain, type1.Type1Container):
            sharing = [d for d in domain.users() if isinstance(d, VfioDevice) and d.group is group]
            if not sharing:
                domain.release_group(group)
        _unregister(self)
        log.warning("uvdma: %s released: %s", self.address, _RELEASED)

    def _retire_fd(self) -> None:
        """Close the device fd, leaving /dev/null under its number (dup2), so a racing call
        reaches nothing rather than a file opened meanwhile; close() closes it."""
        k = _sys.kernel()
        try:
            null = k.open("/dev/null", os.O_RDWR)
        except OSError:
            k.close(self.fd)
            self._fd_open = False
            return
        try:
            k.dup2(null, self.fd)
        finally:
            k.close(null)

    def _stop_watcher(self, released: bool) -> None:
        t = self._watcher
        if t is None:
            return
        self._stop_watch = True
        if threading.current_thread() is t:
            return  # close() from the release handler: the watcher ends when it returns
        if not released and t.is_alive():
            # VFIO_IRQ_SET_DATA_NONE with count 1 signals the eventfd (vfio_pci_intrs.c
            # vfio_pci_set_ctx_trigger_single: "DATA_NONE/DATA_BOOL enables loopback testing")
            with contextlib.suppress(UvdmaError):
                self._signal_irq(REQ_IRQ)
        t.join(timeout=10)
        if t.is_alive():
            log.warning("uvdma: the device request watcher of %s did not stop", self.address)

    # -- regions ----------------------------------------------------------------------------
    def region_info(self, index: int) -> RegionInfo:
        """VFIO_DEVICE_GET_REGION_INFO for one region (argsz grows for capabilities)."""
        with self._lock:  # the fd stays open until the call is done
            self._check(f"region_info({index})")

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
        with self._lock:
            self._check(f"bar({index})")
            return self._bar(index)

    def _bar(self, index: int) -> Bar:
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
        bar = Bar(region, addr, str(self.address))
        self._bars[index] = bar
        return bar

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        """Read through the device fd (for regions that cannot be mmap'd, and config space)."""
        with self._lock:  # the fd stays open until the call is done
            self._check(f"region_read({index})")
            region = self.region_info(index)
            if offset < 0 or offset + size > region.size:
                raise ValueError(
                    f"region {index}: {offset:#x}+{size} is outside its {region.size:#x} bytes"
                )
            return _sys.kernel().pread(self.fd, size, region.offset + offset)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Write through the device fd."""
        with self._lock:  # the fd stays open until the call is done
            self._check(f"region_write({index})")
            region = self.region_info(index)
            if offset < 0 or offset + len(data) > region.size:
                raise ValueError(
                    f"region {index}: {offset:#x}+{len(data)} is outside its {region.size:#x} bytes"
                )
            _sys.kernel().pwrite(self.fd, data, region.offset + offset)

    # -- config space ----------------------------------------------------------------------
    def config_read(self, offset: int, width: int) -> int:
        """Read 1, 2 or 4 bytes of PCI config space (little-endian)."""
        self._check(f"config_read({offset:#x})")
        data = self.region_read(V.PciRegion.VFIO_PCI_CONFIG_REGION_INDEX, offset, width)
        return int.from_bytes(data, "little")

    def config_write(self, offset: int, width: int, value: int) -> None:
        """Write 1, 2 or 4 bytes of PCI config space."""
        self._check(f"config_write({offset:#x})")
        self.region_write(
            V.PciRegion.VFIO_PCI_CONFIG_REGION_INDEX, offset, value.to_bytes(width, "little")
        )

    def capabilities(self) -> dict[int, int]:
        """The standard PCI capability list: {capability id: config offset}."""
        self._check("capabilities")
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
        self._check("enable_bus_master")
        cmd = self.config_read(PCI_COMMAND, 2)
        self.config_write(PCI_COMMAND, 2, cmd | PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY)

    # -- interrupts ------------------------------------------------------------------------
    def irq_info(self, index: int) -> IrqInfo:
        """VFIO_DEVICE_GET_IRQ_INFO: how many vectors an interrupt type offers."""
        with self._lock:  # the fd stays open until the call is done
            self._check(f"irq_info({index})")
            info = V.vfio_irq_info(argsz=ctypes.sizeof(V.vfio_irq_info), index=index)
            _ioctl.call(self.fd, V.VFIO_DEVICE_GET_IRQ_INFO, info, f"{self.address} IRQ info", {})
            return IrqInfo(index, int(info.flags), int(info.count))

    def enable_irqs(self, count: int, index: int = V.PciIrq.VFIO_PCI_MSIX_IRQ_INDEX) -> list[int]:
        """Bind ``count`` vectors (MSI-X by default) to new eventfds; returns the eventfds."""
        self._check(f"enable_irqs({count}, index={index})")
        if index == REQ_IRQ:
            raise ValueError(
                f"{self.address}: uvdma watches the device request (index {REQ_IRQ}) itself: "
                "use on_release_request"
            )
        with self._lock:
            return self._enable_irqs(count, index)

    def _enable_irqs(self, count: int, index: int) -> list[int]:
        info = self.irq_info(index)
        if not 0 < count <= info.count:
            kind = V.PciIrq(index).name
            raise ValueError(f"{self.address} offers {info.count} {kind} vectors, not {count}")
        self._disable_irqs(index)
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

    def _signal_irq(self, index: int, count: int = 1) -> None:
        """Signal the eventfds bound to vectors 0..count-1 of ``index`` (VFIO's loopback)."""
        buf = ctypes.create_string_buffer(ctypes.sizeof(V.vfio_irq_set))
        s = V.vfio_irq_set.from_buffer(buf)
        s.argsz = ctypes.sizeof(buf)
        s.flags = V.IrqSetFlags.VFIO_IRQ_SET_DATA_NONE | V.IrqSetFlags.VFIO_IRQ_SET_ACTION_TRIGGER
        s.index, s.start, s.count = index, 0, count
        _ioctl.call(self.fd, V.VFIO_DEVICE_SET_IRQS, buf, f"{self.address} loopback {index}", {})

    def enabled_vectors(self, index: int = V.PciIrq.VFIO_PCI_MSIX_IRQ_INDEX) -> int:
        """How many vectors of an interrupt type :meth:`enable_irqs` bound to eventfds."""
        return len(self._irq_fds.get(index, ()))

    def wait_irq(
        self, vector: int, timeout: float, index: int = V.PciIrq.VFIO_PCI_MSIX_IRQ_INDEX
    ) -> int:
        """Wait for interrupts on ``vector``; returns how many arrived since the last wait.

        Raises ``TimeoutError`` naming the vector when none arrives within ``timeout`` s,
        and ClosedError when the device is closed (also while waiting: close wakes it).
        """
        with self._lock:
            self._check(f"wait_irq({vector})")
            fds = self._irq_fds.get(index)
            if not fds or not 0 <= vector < len(fds):
                raise ValueError(f"vector {vector} is not enabled: call enable_irqs first")
            fd = fds[vector]
            self._waiters += 1  # its eventfd stays open until we are done with it
        k = _sys.kernel()
        got = 0
        try:
            ready = k.wait_readable(fd, timeout)
            if ready:
                with contextlib.suppress(BlockingIOError):  # another thread took the count
                    got = int.from_bytes(k.read(fd, 8), "little")
        finally:
            with self._lock:
                self._waiters -= 1
                if not self._waiters:
                    self._close_orphans()
        if self.closed:
            raise self.closed_error(f"wait_irq({vector})")
        if not ready:
            raise TimeoutError(
                f"{self.address}: no interrupt on {V.PciIrq(index).name} vector {vector} "
                f"within {timeout} s"
            )
        return got

    def unmask_irq(self, index: int = V.PciIrq.VFIO_PCI_INTX_IRQ_INDEX) -> None:
        """Unmask an interrupt VFIO masked when it fired (INTx is automasked, vfio.h:
        VFIO_IRQ_INFO_AUTOMASKED): call it after handling each INTx."""
        with self._lock:  # the fd stays open until the call is done
            self._check(f"unmask_irq({index})")
            buf = ctypes.create_string_buffer(ctypes.sizeof(V.vfio_irq_set))
            s = V.vfio_irq_set.from_buffer(buf)
            s.argsz = ctypes.sizeof(buf)
            s.flags = (
                V.IrqSetFlags.VFIO_IRQ_SET_DATA_NONE | V.IrqSetFlags.VFIO_IRQ_SET_ACTION_UNMASK
            )
            s.index, s.start, s.count = index, 0, 1
            _ioctl.call(
                self.fd, V.VFIO_DEVICE_SET_IRQS, buf, f"{self.address} unmask IRQ {index}", {}
            )

    def disable_irqs(self, index: int = V.PciIrq.VFIO_PCI_MSIX_IRQ_INDEX) -> None:
        """Turn an interrupt type off and close its eventfds."""
        with self._lock:
            self._check(f"disable_irqs({index})")
            self._disable_irqs(index)

    def _disable_irqs(self, index: int, tell_kernel: bool = True) -> None:
        with self._lock:
            fds = self._irq_fds.pop(index, None)
            if fds is None:
                return
            try:
                if tell_kernel:
                    self._set_irqs(index, [])
            finally:
                self._orphans += fds  # closed now, or by the last wait_irq still on them
                if not self._waiters:
                    self._close_orphans()

    def _close_orphans(self) -> None:
        fds, self._orphans = self._orphans, []
        for fd in fds:
            with contextlib.suppress(OSError):
                _sys.kernel().close(fd)

    def reset(self) -> None:
        """VFIO_DEVICE_RESET (function-level or whatever reset the device supports)."""
        with self._lock:  # the fd stays open until the call is done
            self._check("reset")
            if not self.flags & V.DeviceFlags.VFIO_DEVICE_FLAGS_RESET:
                raise UvdmaError(f"{self.address} does not support reset through VFIO")
            _ioctl.call(self.fd, V.VFIO_DEVICE_RESET, 0, f"resetting {self.address}", {})

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Interrupts, BARs, device fd; then the domain if this device owns it. Idempotent
        (and safe to call from a release handler, or while another thread closes it)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            released = self._released
            self.closed = True
        self._stop_watcher(released)
        _unregister(self)
        if not released:
            with self._lock:  # wake the threads in wait_irq: they raise ClosedError
                if self._waiters:
                    for index, fds in self._irq_fds.items():
                        with contextlib.suppress(UvdmaError):
                            self._signal_irq(index, len(fds))
        with contextlib.ExitStack() as stack:
            # ExitStack runs these in reverse: the domain last. The domain closes the
            # groups itself, after unmapping: a group leaving its container takes the
            # container's IOMMU (and every mapping) with it.
            if self._owns_domain:
                stack.callback(self.domain.close)
            stack.callback(self.domain._detach_user, self)
            if self._fd_open:
                stack.callback(_sys.kernel().close, self.fd)
                if isinstance(self.domain, iommufd.IommufdDomain) and not released:
                    # vfio.rst "cdev": detach from the IOAS, then close (which unbinds)
                    stack.callback(self._detach_quietly)
            for bar in self._bars.values():
                stack.callback(bar.close)
            for index in list(self._irq_fds):
                # a released device's fd is gone: only our eventfds are left to close
                stack.callback(self._disable_irqs, index, not released)

    def _detach_quietly(self) -> None:
        if isinstance(self.domain, iommufd.IommufdDomain) and not self.domain.closed:
            try:
                self.domain.detach(self.fd, self.address)
            except UvdmaError as e:  # closing the fd detaches it anyway
                log.warning("uvdma: %s", e)

    def __enter__(self) -> VfioDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VfioDevice({self.address}, backend={self.backend}, regions={self.num_regions})"


BACKENDS = ("auto", "type1", "iommufd", "noiommu")


@dataclass(frozen=True)
class BackendChoice:
    """Which backend ``auto`` (or the caller) chose for a device, and why."""

    backend: str  # type1, iommufd or noiommu
    reason: str


def backend_choice(
    backend: str = "auto",
    address: str | pci.PciAddress | None = None,
    *,
    sysfs: Path = pci.SYSFS,
    devfs: Path = pci.DEVFS,
) -> BackendChoice:
    """The backend for a device (or for this kernel when ``address`` is None), with why.

    ``auto``: ``noiommu`` for a device in a group VFIO made up in no-IOMMU mode (no
    IOMMU exists for it); else ``iommufd`` when ``/dev/iommu`` exists and the device has a
    vfio cdev (``/dev/vfio/devices/vfioN``, CONFIG_VFIO_DEVICE_CDEV); else ``type1``,
    the reason naming what was missing.  Anything else is taken as asked.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend != "auto":
        return BackendChoice(backend, "asked for")
    dev = None if address is None else pci.device(address, sysfs)
    if dev is not None and dev.iommu_group is not None:
        if noiommu.is_noiommu_group(dev.iommu_group, sysfs):
            return BackendChoice("noiommu", f"{dev.address}: {noiommu.UNPROTECTED}")
    elif noiommu.available(sysfs):
        return BackendChoice("noiommu", noiommu.UNPROTECTED)
    node = devfs / "iommu"
    if not node.exists():
        return BackendChoice(
            "type1", f"no {node}: this kernel has no iommufd (CONFIG_IOMMUFD), so type1"
        )
    cdevs = devfs / "vfio/devices"
    if dev is None:
        if cdevs.is_dir():
            return BackendChoice("iommufd", f"{node} and vfio cdevs ({cdevs}) exist")
        return BackendChoice(
            "type1", f"{node} exists but not {cdevs} (no CONFIG_VFIO_DEVICE_CDEV), so type1"
        )
    names = sorted(p.name for p in (dev.path / "vfio-dev").glob("vfio*"))
    if not names or not (cdevs / names[0]).exists():
        return BackendChoice(
            "type1",
            f"{node} exists but {dev.address} has no vfio cdev in {cdevs} (not bound to "
            "vfio-pci, or no CONFIG_VFIO_DEVICE_CDEV), so type1",
        )
    return BackendChoice("iommufd", f"{node} and {cdevs / names[0]} exist")


def choose_backend(backend: str = "auto", address: str | pci.PciAddress | None = None) -> str:
    """The backend :func:`backend_choice` picks: ``type1``, ``iommufd`` or ``noiommu``."""
    return backend_choice(backend, address).backend


def new_domain(backend: str = "auto", *, sysfs: Path = pci.SYSFS) -> IommuDomain:
    """A fresh IOMMU domain of the chosen backend (to share between devices).

    ``sysfs`` is where the backend is chosen and where a no-IOMMU domain reads and grows the
    hugepage pool (:meth:`~uvdma.vfio.noiommu.NoIommuContainer.alloc_below`)."""
    kind = backend_choice(backend, sysfs=sysfs).backend
    if kind == "iommufd":
        return iommufd.IommufdDomain()
    if kind == "noiommu":
        return noiommu.NoIommuContainer(sysfs=sysfs)
    return type1.Type1Container()


def open_device(
    address: str | pci.PciAddress,
    *,
    backend: str = "auto",
    domain: IommuDomain | None = None,
    sysfs: Path = pci.SYSFS,
    devfs: Path = pci.DEVFS,
) -> VfioDevice:
    """Open a device bound to vfio-pci, in ``domain`` or in a new domain of its own.

    ``sysfs`` and ``devfs`` are where the device is looked up and its nodes opened
    (``/sys`` and ``/dev``; a test gives stand-ins).

    Refuses a device that is absent, not bound to vfio-pci, or in a group that is not
    viable, or that this process has open already (EBUSY, saying so), with the fix in the
    message; nothing is left open on any error.  The device's request interrupt is
    registered and watched (see :meth:`VfioDevice.on_release_request`).
    """
    dev = pci.device(address, sysfs)
    with _registry.lock:
        mine = _registry.devices.get(dev.address)
        if mine is not None:
            raise UvdmaOSError(
                errno.EBUSY,
                f"opening {dev.address}: it is already open in this process ({mine!r}): use "
                "that VfioDevice, or close it first",
            )
        device = _open(dev, backend, domain, sysfs, devfs)
        _registry.devices[dev.address] = device
    return device


def _unregister(device: VfioDevice) -> None:
    with _registry.lock:
        if _registry.devices.get(device.address) is device:
            del _registry.devices[device.address]


def _open(
    dev: pci.PciDevice, backend: str, domain: IommuDomain | None, sysfs: Path, devfs: Path
) -> VfioDevice:
    if dev.driver != pci.VFIO_PCI:
        raise PciError(
            f"{dev.address} is bound to {dev.driver or 'no driver'}, not vfio-pci: "
            f"`uvdma bind {dev.address}` (as root)"
        )
    group_no = dev.iommu_group
    if group_no is None:
        raise PciError(f"{dev.address} has no IOMMU group: turn the IOMMU on (`uvdma doctor`)")
    if domain is not None:
        domain._check(f"opening {dev.address} in {domain!r}")
    if domain is not None:
        kind = domain.backend
        reason = "the domain it was opened in"
    else:
        choice = backend_choice(backend, dev.address, sysfs=sysfs, devfs=devfs)
        kind, reason = choice.backend, choice.reason
        if backend == "auto" and kind != "iommufd":
            log.info("uvdma: %s: backend %s: %s", dev.address, kind, choice.reason)
    in_noiommu_group = noiommu.is_noiommu_group(group_no, sysfs)
    if in_noiommu_group != (kind == "noiommu"):
        raise PciError(
            f"opening {dev.address} with the {kind} backend: "
            + (
                "it is in a no-IOMMU group (VFIO's unsafe no-IOMMU mode): use backend "
                "noiommu, or 'auto'"
                if in_noiommu_group
                else "it has an IOMMU: the noiommu backend is for devices without one"
            )
        )
    with contextlib.ExitStack() as stack:
        owns = domain is None
        if domain is None:
            domain = new_domain(kind, sysfs=sysfs)
            stack.callback(domain.close)
        group: type1.VfioGroup | None = None
        if isinstance(domain, type1.Type1Container):
            group = next((g for g in domain.groups if g.number == group_no), None)
            if group is None:
                group = domain.open_group(group_no, sysfs, devfs)
                stack.callback(group.close)
                domain.add_group(group)
            fd = group.device_fd(dev.address)
            stack.callback(_sys.kernel().close, fd)
        elif isinstance(domain, iommufd.IommufdDomain):
            path = iommufd.cdev_path(dev.address, sysfs, devfs)
            fd = _ioctl.open_node(
                path, f"opening {path}", {errno.EACCES: "run as root", errno.EPERM: "run as root"}
            )
            stack.callback(_sys.kernel().close, fd)
            domain.attach(fd, dev.address)
        else:
            raise TypeError(f"unknown IOMMU domain {domain!r}")
        device = VfioDevice(dev.address, fd, domain, owns_domain=owns, group=group)
        device.backend_reason = reason
        device._watch_requests()
        domain._attach_user(device)
        stack.pop_all()
        return device
    raise AssertionError("unreachable")  # pragma: no cover
