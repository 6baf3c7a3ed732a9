"""The iommufd backend: an IOAS in ``/dev/iommu`` and devices opened through their vfio cdev.

Set-up (Documentation/userspace-api/iommufd.rst, vfio.rst "cdev"): open ``/dev/iommu``,
IOMMU_IOAS_ALLOC; open ``/dev/vfio/devices/vfioN``, VFIO_DEVICE_BIND_IOMMUFD, then
VFIO_DEVICE_ATTACH_IOMMUFD_PT to the IOAS.  Used when the kernel has both (``/dev/iommu``
and ``/dev/vfio/devices/``); the Debian kernels of the test VM are built without
CONFIG_IOMMUFD; uvdma's own guest kernel (``uvdma vm kernel``) has it, and the VM tier
proves this backend there (docs/test-vm.md).  Teardown is the reverse of set-up: each
device is detached from the IOAS (VFIO_DEVICE_DETACH_IOMMUFD_PT) and its cdev closed
(which unbinds it from the iommufd); then the IOAS is unmapped and destroyed
(IOMMU_DESTROY) and ``/dev/iommu`` closed.  Several devices may be attached to one IOAS
(:func:`~uvdma.vfio.new_domain` and ``open_device(..., domain=)``): one set of mappings
serves them all.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from uvdma import _sys, pci
from uvdma._uapi import iommufd as I  # noqa: N812
from uvdma._uapi import vfio as V  # noqa: N812
from uvdma.errors import UvdmaError, UvdmaOSError
from uvdma.memory.hugepages import memlock_fix
from uvdma.vfio import _ioctl
from uvdma.vfio.domain import DmaMapping, IommuDomain

IOMMUFD_DEV = "/dev/iommu"
VFIO_CDEV_DIR = "/dev/vfio/devices"


def available() -> bool:
    """Whether this kernel offers iommufd and vfio device cdevs."""
    return os.path.exists(IOMMUFD_DEV) and os.path.isdir(VFIO_CDEV_DIR)


def cdev_path(address: pci.PciAddress, sysfs: Path = pci.SYSFS, devfs: Path = pci.DEVFS) -> str:
    """``<devfs>/vfio/devices/vfioN`` (``/dev/vfio/devices/vfioN``) for a device bound to
    vfio-pci."""
    d = sysfs / "bus/pci/devices" / str(address) / "vfio-dev"
    names = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    if not names:
        raise UvdmaError(
            f"{address} has no vfio cdev: bind it to vfio-pci (`uvdma bind {address}`) "
            "on a kernel with CONFIG_VFIO_DEVICE_CDEV"
        )
    return str(devfs / "vfio/devices" / names[0])


class IommufdDomain(IommuDomain):
    """An iommufd IO address space (IOAS): one IOMMU domain for the devices attached."""

    backend = "iommufd"

    def __init__(self) -> None:
        super().__init__()
        k = _sys.kernel()
        self.fd = _ioctl.open_node(
            IOMMUFD_DEV,
            "opening iommufd",
            {
                errno.ENOENT: f"{IOMMUFD_DEV} does not exist: this kernel has no iommufd; "
                "use the type1 backend",
                errno.EACCES: f"no permission for {IOMMUFD_DEV}; run as root",
            },
        )
        try:
            alloc = I.iommu_ioas_alloc(size=ctypes.sizeof(I.iommu_ioas_alloc))
            _ioctl.call(self.fd, I.IOMMU_IOAS_ALLOC, alloc, "IOMMU_IOAS_ALLOC", {})
            self.ioas_id = int(alloc.out_ioas_id)
        except BaseException:
            k.close(self.fd)
            raise
        self._alignment = 4096

    def attach(self, device_fd: int, address: pci.PciAddress) -> int:
        """Bind a vfio cdev fd to this iommufd and attach it to the IOAS; returns its dev id."""
        bind = V.vfio_device_bind_iommufd(
            argsz=ctypes.sizeof(V.vfio_device_bind_iommufd), iommufd=self.fd
        )
        _ioctl.call(
            device_fd,
            V.VFIO_DEVICE_BIND_IOMMUFD,
            bind,
            f"binding {address} to iommufd",
            {errno.EBUSY: f"{address} is already bound (open elsewhere?)"},
        )
        attach = V.vfio_device_attach_iommufd_pt(
            argsz=ctypes.sizeof(V.vfio_device_attach_iommufd_pt), pt_id=self.ioas_id
        )
        _ioctl.call(
            device_fd, V.VFIO_DEVICE_ATTACH_IOMMUFD_PT, attach, f"attaching {address} to IOAS", {}
        )
        if not self._maps:
            self._iova = None  # ranges narrow as devices attach: ask again
        return int(bind.out_devid)

    def detach(self, device_fd: int, address: pci.PciAddress) -> None:
        """VFIO_DEVICE_DETACH_IOMMUFD_PT: take a device out of the IOAS, before its fd closes
        (closing the fd then unbinds it from this iommufd).  The device can no longer DMA
        through the IOAS; the IOAS and its mappings stay for the other devices."""
        arg = V.vfio_device_detach_iommufd_pt(argsz=ctypes.sizeof(V.vfio_device_detach_iommufd_pt))
        _ioctl.call(
            device_fd, V.VFIO_DEVICE_DETACH_IOMMUFD_PT, arg, f"detaching {address} from IOAS", {}
        )

    def _option(self, option_id: int, object_id: int, op: int, value: int = 0) -> int:
        opt = I.iommu_option(
            size=ctypes.sizeof(I.iommu_option),
            option_id=option_id,
            op=op,
            object_id=object_id,
            val64=value,
        )
        _ioctl.call(self.fd, I.IOMMU_OPTION, opt, f"IOMMU_OPTION {option_id}", {})
        return int(opt.val64)

    def options(self) -> dict[str, int]:
        """IOMMU_OPTION, read: ``huge_pages`` of this IOAS (1: the IOMMU may map large
        pages, the default, kept) and the kernel-wide ``rlimit_mode`` (0: pinned pages count
        against the user's RLIMIT_MEMLOCK, the default; 1: against the process's, as type1
        does).  uvdma changes neither: the rlimit mode is global (CAP_SYS_RESOURCE) and
        huge pages are what DMA through hugepage memory wants."""
        get = I.IOMMU_OPTION_OP_GET
        return {
            "huge_pages": self._option(I.IOMMU_OPTION_HUGE_PAGES, self.ioas_id, get),
            "rlimit_mode": self._option(I.IOMMU_OPTION_RLIMIT_MODE, 0, get),
        }

    def iova_ranges(self) -> list[tuple[int, int]]:
        n = 4
        while True:
            arr = (I.iommu_iova_range * n)()
            q = I.iommu_ioas_iova_ranges(
                size=ctypes.sizeof(I.iommu_ioas_iova_ranges),
                ioas_id=self.ioas_id,
                num_iovas=n,
                allowed_iovas=ctypes.addressof(arr),
            )
            try:
                _sys.kernel().ioctl(self.fd, I.IOMMU_IOAS_IOVA_RANGES, q)
            except OSError as e:
                if e.errno == errno.EMSGSIZE and q.num_iovas > n:
                    n = q.num_iovas  # the kernel says how many there are: grow and retry
                    continue
                raise UvdmaOSError(e.errno or errno.EIO, "IOMMU_IOAS_IOVA_RANGES") from e
            self._alignment = max(int(q.out_iova_alignment), 1)
            return [(arr[i].start, arr[i].last) for i in range(q.num_iovas)]

    def page_sizes(self) -> int:
        self.iova_ranges()
        return ((1 << 64) - 1) & ~(self._alignment - 1)

    def null_ioctl(self) -> None:
        """IOMMU_OPTION get of the IOAS's huge-page option: a cheap round trip."""
        opt = I.iommu_option(
            size=ctypes.sizeof(I.iommu_option),
            option_id=I.IOMMU_OPTION_HUGE_PAGES,
            op=I.IOMMU_OPTION_OP_GET,
            object_id=self.ioas_id,
        )
        _sys.kernel().ioctl(self.fd, I.IOMMU_OPTION, opt)

    def _kernel_map(self, m: DmaMapping) -> None:
        flags = I.IoasMapFlags.IOMMU_IOAS_MAP_FIXED_IOVA
        if m.read:
            flags |= I.IoasMapFlags.IOMMU_IOAS_MAP_READABLE
        if m.write:
            flags |= I.IoasMapFlags.IOMMU_IOAS_MAP_WRITEABLE
        arg = I.iommu_ioas_map(
            size=ctypes.sizeof(I.iommu_ioas_map),
            flags=int(flags),
            ioas_id=self.ioas_id,
            user_va=m.vaddr,
            length=m.size,
            iova=m.iova,
        )
        _ioctl.call(
            self.fd,
            I.IOMMU_IOAS_MAP,
            arg,
            f"IOMMU_IOAS_MAP of {m.size:#x} bytes at IOVA {m.iova:#x}",
            {
                errno.EEXIST: "the IOVA range is already mapped",
                errno.ENOMEM: lambda: memlock_fix(m.size),
                errno.EFAULT: "the virtual address is not mapped in this process",
            },
        )

    def _kernel_unmap(self, m: DmaMapping) -> None:
        arg = I.iommu_ioas_unmap(
            size=ctypes.sizeof(I.iommu_ioas_unmap), ioas_id=self.ioas_id, iova=m.iova, length=m.size
        )
        what = f"IOMMU_IOAS_UNMAP of {m.size:#x} bytes at IOVA {m.iova:#x}"
        _ioctl.call(self.fd, I.IOMMU_IOAS_UNMAP, arg, what, {})
        if arg.length != m.size:
            raise UvdmaError(f"{what}: the kernel unmapped {arg.length:#x} bytes")

    def _kernel_close(self) -> None:
        k = _sys.kernel()
        try:
            d = I.iommu_destroy(size=ctypes.sizeof(I.iommu_destroy), id=self.ioas_id)
            _ioctl.call(self.fd, I.IOMMU_DESTROY, d, "IOMMU_DESTROY of the IOAS", {})
        finally:
            k.close(self.fd)
