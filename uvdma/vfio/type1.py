"""The type1 IOMMU backend: a VFIO container with groups in it (Documentation/driver-api/vfio.rst).

Order of set-up, as the kernel wants it: open ``/dev/vfio/vfio`` (check the API version
and the TYPE1v2 extension), open each group ``/dev/vfio/<n>`` and check that it is
viable, attach it to the container, and with the first group set the IOMMU type.
Teardown is the reverse: devices, then groups, then the container.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from uvdma import _sys, pci
from uvdma._uapi import vfio as V  # noqa: N812
from uvdma._uapi import walk_caps
from uvdma.errors import GroupNotViableError, UvdmaError, UvdmaOSError
from uvdma.memory.hugepages import memlock_fix
from uvdma.vfio import _ioctl
from uvdma.vfio.domain import DmaMapping, IommuDomain

VFIO_CONTAINER = "/dev/vfio/vfio"
TYPE1_DMA_ENTRY_LIMIT = 65535  # vfio_iommu_type1's dma_entry_limit module parameter default


# The groups this process has open: a group opens once (the kernel answers EBUSY to a
# second open), so a second open from here gets an error that says it is ours.
_open_groups: dict[int, VfioGroup] = {}
_open_groups_lock = threading.Lock()
os.register_at_fork(after_in_child=_open_groups.clear)


@dataclass(frozen=True)
class Type1Info:
    """What VFIO_IOMMU_GET_INFO says, capability chain included."""

    page_sizes: int
    iova_ranges: list[tuple[int, int]]
    dma_avail: int | None
    migration_pgsizes: int | None


class VfioGroup:
    """An IOMMU group opened through ``/dev/vfio/<n>``."""

    def __init__(self, number: int, sysfs: Path = pci.SYSFS, *, path: str | None = None) -> None:
        self.number = number
        self.container: Type1Container | None = None
        self.closed = True  # until it is open
        with _open_groups_lock:
            mine = _open_groups.get(number)
        if mine is not None:
            raise UvdmaOSError(
                errno.EBUSY,
                f"opening VFIO group {number}: it is already open in this process, in another "
                "IOMMU domain; open the devices of one group in one domain "
                "(open_device(..., domain=the_other_device.domain))",
            )
        path = path or f"/dev/vfio/{number}"
        self.fd = _ioctl.open_node(
            path,
            f"opening VFIO group {number}",
            {
                errno.ENOENT: f"{path} does not exist; bind the group's devices to vfio-pci "
                "(`uvdma bind BDF`) and check that an IOMMU is on (`uvdma doctor`)",
                errno.EACCES: f"no permission for {path}; run as root or chown it to your user",
                errno.EPERM: f"no permission for {path}; run as root",
                errno.EBUSY: f"group {number} is already open in another process",
            },
        )
        try:
            status = V.vfio_group_status(argsz=ctypes.sizeof(V.vfio_group_status))
            _ioctl.call(self.fd, V.VFIO_GROUP_GET_STATUS, status, f"group {number} status", {})
            if not status.flags & V.GroupFlags.VFIO_GROUP_FLAGS_VIABLE:
                blockers = pci.group_blockers(number, sysfs)
                names = ", ".join(f"{d.address} ({d.driver})" for d in blockers) or "its devices"
                raise GroupNotViableError(
                    f"group {number} is not viable: bind {names} to vfio-pci too "
                    "(every device in an IOMMU group must be)"
                )
        except BaseException:
            _sys.kernel().close(self.fd)
            raise
        self.closed = False
        with _open_groups_lock:
            _open_groups[number] = self

    def device_fd(self, address: pci.PciAddress) -> int:
        """VFIO_GROUP_GET_DEVICE_FD: the device's fd (the group must be in a container)."""
        name = ctypes.create_string_buffer(str(address).encode())
        return _ioctl.call(
            self.fd,
            V.VFIO_GROUP_GET_DEVICE_FD,
            name,
            f"opening {address} in group {self.number}",
            {
                errno.EINVAL: f"{address} is not in group {self.number}, or the group has no "
                "container yet",
                errno.EBUSY: f"{address} is already open",
            },
        )

    def close(self) -> None:
        """Close the group fd (the kernel detaches it from its container). Idempotent."""
        if not self.closed:
            _sys.kernel().close(self.fd)
            self.closed = True
            with _open_groups_lock:
                if _open_groups.get(self.number) is self:
                    del _open_groups[self.number]
            if self.container is not None:
                self.container._forget(self)


class Type1Container(IommuDomain):
    """A VFIO container using the type1v2 IOMMU: one IOMMU domain for all its groups."""

    backend = "type1"
    iommu_type = V.IommuType.VFIO_TYPE1v2_IOMMU

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[VfioGroup] = []
        self._iommu_set = False
        self._info: Type1Info | None = None
        self.fd = _ioctl.open_node(
            VFIO_CONTAINER,
            "opening the VFIO container",
            {
                errno.ENOENT: f"{VFIO_CONTAINER} does not exist; `modprobe vfio-pci` "
                "(and check `uvdma doctor`)",
                errno.EACCES: f"no permission for {VFIO_CONTAINER}; run as root",
            },
        )
        try:
            version = _ioctl.call(self.fd, V.VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION", {})
            if version != V.VFIO_API_VERSION:
                raise UvdmaError(f"VFIO API version {version}, uvdma speaks {V.VFIO_API_VERSION}")
            self._check_extension()
        except BaseException:
            _sys.kernel().close(self.fd)
            raise

    def _check_extension(self) -> None:
        ok = _ioctl.call(
            self.fd,
            V.VFIO_CHECK_EXTENSION,
            int(V.IommuType.VFIO_TYPE1v2_IOMMU),
            "VFIO_CHECK_EXTENSION",
            {},
        )
        if ok != 1:
            raise UvdmaError("this kernel's VFIO has no type1v2 IOMMU: `modprobe vfio_iommu_type1`")

    def open_group(
        self, number: int, sysfs: Path = pci.SYSFS, devfs: Path = pci.DEVFS
    ) -> VfioGroup:
        """Open IOMMU group ``number`` (``<devfs>/vfio/<number>``, ``/dev/vfio/<number>``),
        not yet in this container."""
        return VfioGroup(number, sysfs, path=str(devfs / "vfio" / str(number)))

    def add_group(self, group: VfioGroup) -> None:
        """Put a group in this container; the first one sets the IOMMU type."""
        self._check(f"adding group {group.number}")
        fd = ctypes.c_int(self.fd)
        _ioctl.call(
            group.fd,
            V.VFIO_GROUP_SET_CONTAINER,
            fd,
            f"adding group {group.number} to the container",
            {errno.EBUSY: f"group {group.number} is already in a container"},
        )
        group.container = self
        self.groups.append(group)
        if not self._iommu_set:
            _ioctl.call(
                self.fd,
                V.VFIO_SET_IOMMU,
                int(self.iommu_type),
                f"VFIO_SET_IOMMU({self.iommu_type.name})",
                {},
            )
            self._iommu_set = True

    def _forget(self, group: VfioGroup) -> None:
        if group in self.groups:
            self.groups.remove(group)
        if self._iommu_set and not self.groups and not self.closed:
            # the last group left: the kernel dropped the IOMMU and every mapping with it
            with self._lock:
                self.unmaps += 1  # what anyone remembered as mapped is not any more
                self.detached = True

    def release_group(self, group: VfioGroup) -> None:
        """Let a group go while the domain stays (the kernel asked for its device back):
        close the group fd, so the group leaves the container and its DMA ownership ends
        (the device's own driver can then probe it).  When it was the last group, the
        kernel drops every mapping: the domain is then :attr:`detached`."""
        group.close()

    def info(self, refresh: bool = False) -> Type1Info:
        """VFIO_IOMMU_GET_INFO with its capability chain (IOVA ranges, DMA_AVAIL, migration)."""
        if self._info is not None and not refresh:
            return self._info
        if not self._iommu_set:
            raise UvdmaError("the container has no group yet: add a group before asking the IOMMU")
        buf, head = _ioctl.info(
            self.fd, V.VFIO_IOMMU_GET_INFO, V.vfio_iommu_type1_info, "IOMMU info"
        )
        ranges: list[tuple[int, int]] = []
        avail: int | None = None
        migration: int | None = None
        if head.flags & V.IommuInfoFlags.VFIO_IOMMU_INFO_CAPS:
            for cap_id, _version, off in walk_caps(buf, head.cap_offset):
                if cap_id == V.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                    cap = V.vfio_iommu_type1_info_cap_iova_range.from_buffer(buf, off)
                    base = off + ctypes.sizeof(cap)
                    for i in range(cap.nr_iovas):
                        r = V.vfio_iova_range.from_buffer(
                            buf, base + i * ctypes.sizeof(V.vfio_iova_range)
                        )
                        ranges.append((r.start, r.end))
                elif cap_id == V.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
                    avail = V.vfio_iommu_type1_info_dma_avail.from_buffer(buf, off).avail
                elif cap_id == V.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION:
                    migration = V.vfio_iommu_type1_info_cap_migration.from_buffer(
                        buf, off
                    ).pgsize_bitmap
        if not ranges:  # an old kernel without the capability: the whole 64-bit space
            ranges = [(0, (1 << 64) - 1)]
        self._info = Type1Info(head.iova_pgsizes, ranges, avail, migration)
        return self._info

    def iova_ranges(self) -> list[tuple[int, int]]:
        return self.info().iova_ranges

    def page_sizes(self) -> int:
        return self.info().page_sizes

    def mappings_left(self) -> int | None:
        return self.info(refresh=True).dma_avail

    def null_ioctl(self) -> None:
        """VFIO_GET_API_VERSION: the cheapest ioctl on the container (the benchmark's anchor)."""
        _sys.kernel().ioctl(self.fd, V.VFIO_GET_API_VERSION, 0)

    def _kernel_map(self, m: DmaMapping) -> None:
        flags = 0
        if m.read:
            flags |= V.DmaMapFlags.VFIO_DMA_MAP_FLAG_READ
        if m.write:
            flags |= V.DmaMapFlags.VFIO_DMA_MAP_FLAG_WRITE
        arg = V.vfio_iommu_type1_dma_map(
            argsz=ctypes.sizeof(V.vfio_iommu_type1_dma_map),
            flags=flags,
            vaddr=m.vaddr,
            iova=m.iova,
            size=m.size,
        )
        _ioctl.call(
            self.fd,
            V.VFIO_IOMMU_MAP_DMA,
            arg,
            f"VFIO_IOMMU_MAP_DMA of {m.size:#x} bytes at IOVA {m.iova:#x}",
            {
                errno.ENOSPC: f"the container has reached its limit of mappings "
                f"({TYPE1_DMA_ENTRY_LIMIT} by default): map larger regions, or raise "
                "vfio_iommu_type1's dma_entry_limit module parameter",
                errno.ENOMEM: lambda: memlock_fix(m.size),
                errno.EEXIST: "the IOVA range is already mapped",
                errno.EINVAL: "the IOVA is outside the ranges the IOMMU allows, or misaligned",
                errno.EFAULT: "the virtual address is not mapped in this process",
            },
        )

    def _kernel_unmap(self, m: DmaMapping) -> None:
        if not self.groups:  # no group, no IOMMU: the kernel dropped the mappings with it
            return
        arg = V.vfio_iommu_type1_dma_unmap(
            argsz=ctypes.sizeof(V.vfio_iommu_type1_dma_unmap), iova=m.iova, size=m.size
        )
        what = f"VFIO_IOMMU_UNMAP_DMA of {m.size:#x} bytes at IOVA {m.iova:#x}"
        _ioctl.call(self.fd, V.VFIO_IOMMU_UNMAP_DMA, arg, what, {})
        if arg.size != m.size:  # type1 reports how much it unmapped
            raise UvdmaError(f"{what}: the kernel unmapped {arg.size:#x} bytes")

    def _kernel_close(self) -> None:
        for group in list(self.groups):
            group.close()
        _sys.kernel().close(self.fd)
