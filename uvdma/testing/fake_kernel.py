"""A fake kernel behind uvdma's syscall seam, answering as Linux's VFIO and iommufd do.

It keeps only what the real code paths look at: which fds are open and what they are,
the container's and IOAS's mappings (overlap -> EEXIST, type1's entry limit ->
ENOSPC, pinned bytes past RLIMIT_MEMLOCK -> ENOMEM, unmapping nothing -> size 0 /
ENOENT), the argsz protocol (a too-small buffer gets argsz grown, capabilities after
the struct), iommufd's EMSGSIZE for a short range array, and hugetlb reservations.
BAR and config space are real memory so register reads work; a device model attached with
:meth:`FakeKernel.attach_model` (uvdma_nvme.sim) sees each BAR0 access instead, and DMAs
through :meth:`FakeKernel.dma_windows` (the IOMMU's view: what each IOVA maps to, with which
permissions), reporting what the IOMMU blocks with :meth:`FakeKernel.record_fault`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from uvdma import _sys
from uvdma._uapi import iommufd as I  # noqa: N812
from uvdma._uapi import vfio as V  # noqa: N812
from uvdma.vfio.faults import IommuFault

GROUP_RANGES = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]


def err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class DeviceModel(Protocol):
    """A device emulated behind BAR0: each register access reaches it as it happens."""

    def register(self, offset: int, width: int) -> _sys.Register:
        """The register of ``width`` bytes at ``offset`` in BAR0."""
        ...

    def function_reset(self) -> None:
        """A function-level reset (VFIO_DEVICE_RESET, or the last device fd closed)."""
        ...


class DmaWindow(NamedTuple):
    """One IOMMU mapping as the device sees it: ``size`` bytes at ``iova`` are at ``vaddr``."""

    iova: int
    size: int
    vaddr: int
    read: bool  # the device may read (DMA to the device)
    write: bool  # the device may write


@dataclass
class FakeDevice:
    bdf: str
    group: int
    cdev: int
    bar0: ctypes.Array[ctypes.c_char] = field(
        default_factory=lambda: ctypes.create_string_buffer(16384)
    )
    config: bytearray = field(default_factory=lambda: bytearray(256))
    msix_vectors: int = 4


@dataclass
class Fd:
    kind: str  # container, group, device, iommufd, cdev, memfd, eventfd, file
    obj: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class FakeKernel:
    """Configure the attributes, then ``with use_kernel(fake): ...``."""

    def __init__(self) -> None:
        self.devices: dict[str, FakeDevice] = {}
        self.viable: dict[int, bool] = {}
        self.iommufd = True
        self.noiommu = False  # VFIO in no-IOMMU mode: groups are /dev/vfio/noiommu-<n>
        self.detached: list[str] = []  # cdevs detached from their IOAS (in order)
        self.physical: Callable[[int], int] | None = None  # vaddr -> physical, for pagemap
        self.dma_entry_limit = 65535
        self.memlock = 64 << 20
        self.privileged = True  # pagemap PFNs visible; CAP_IPC_LOCK
        self.free_hugepages = {2 << 20: 16, 1 << 30: 0}
        self.grow_info_once = True  # the first info ioctl asks for a bigger buffer
        self.fds: dict[int, Fd] = {}
        self.next_fd = 100
        self.next_addr = 0x7F00_0000_0000
        self.calls: list[str] = []
        self._cv = threading.Condition()  # eventfd waits (wait_readable blocks, as poll does)
        self.retired: list[int] = []  # BAR addresses replaced by inert memory (mmap_fixed)
        self.containers: dict[int, dict[str, Any]] = {}
        self.ioas: dict[int, dict[int, int]] = {}
        self.pinned = 0
        self.mlocked = 0
        self.irqs: dict[tuple[str, int], list[int]] = {}
        self.unmasked: list[tuple[str, int]] = []
        self.hugetlbfs: dict[str, int] = {}  # path prefix of a hugetlbfs mount -> page size
        self._real = _sys.LinuxKernel()
        self._real_maps: dict[int, tuple[int, int]] = {}
        self.models: dict[str, DeviceModel] = {}  # bdf -> the model behind its BAR0
        self._model_bars: dict[int, tuple[int, DeviceModel]] = {}  # mmap'd BAR0 -> size, model
        self.ioas_vaddrs: dict[int, dict[int, tuple[int, bool, bool]]] = {}
        self.iommu_faults: dict[str, list[IommuFault]] = {}  # bdf -> what the IOMMU blocked
        # Changes whenever the IOMMU's view may have: every ioctl and close.  A device model
        # caches its translations until it changes.
        self.iommu_gen = 0

    def add_device(self, bdf: str, group: int, cdev: int) -> FakeDevice:
        d = FakeDevice(bdf, group, cdev)
        # NVMe-like BAR0: CAP (MQES 2047, TO 15, CSS NVM), VS 1.4
        ctypes.c_uint64.from_buffer(d.bar0, 0).value = 2047 | (1 << 16) | (15 << 24) | (1 << 37)
        ctypes.c_uint32.from_buffer(d.bar0, 8).value = 0x00010400
        d.config[0:2] = (0x1B36).to_bytes(2, "little")
        d.config[0x06] = 0x10  # capability list
        d.config[0x34] = 0x40
        d.config[0x40:0x44] = bytes([0x11, 0x00, d.msix_vectors - 1, 0])  # MSI-X, table size
        self.devices[bdf] = d
        self.viable.setdefault(group, True)
        return d

    # -- helpers ---------------------------------------------------------------------------
    def _new(self, kind: str, obj: Any = None) -> int:
        fd = self.next_fd
        self.next_fd += 1
        self.fds[fd] = Fd(kind, obj)
        return fd

    def open_kinds(self) -> list[str]:
        return sorted(f.kind for f in self.fds.values())

    # -- device models: MMIO and DMA -------------------------------------------------------------
    def attach_model(self, bdf: str, model: DeviceModel) -> None:
        """Put ``model`` behind BAR0 of device ``bdf`` (before the BAR is mmap'd)."""
        if bdf not in self.devices:
            raise KeyError(f"no fake device {bdf}: add_device first")
        self.models[bdf] = model

    def _model_at(self, addr: int) -> tuple[int, DeviceModel] | None:
        for base, (size, model) in self._model_bars.items():
            if base <= addr < base + size:
                return addr - base, model
        return None

    def mmio32(self, addr: int) -> _sys.Register:
        hit = self._model_at(addr)
        if hit is None:
            return ctypes.c_uint32.from_address(addr)
        return hit[1].register(hit[0], 4)

    def mmio64(self, addr: int) -> _sys.Register:
        hit = self._model_at(addr)
        if hit is None:
            return ctypes.c_uint64.from_address(addr)
        return hit[1].register(hit[0], 8)

    def dma_windows(self, bdf: str) -> list[DmaWindow]:
        """The mappings device ``bdf`` can reach now, by IOVA: its group's container
        (type1) or the IOAS its cdev is attached to (iommufd).  Empty when it has none."""
        d = self.devices[bdf]
        out: list[DmaWindow] = []
        for f in self.fds.values():
            if f.kind == "group" and f.obj["number"] == d.group and f.obj["container"]:
                c = f.obj["container"]
                if c["iommu"]:
                    vaddrs = c.get("vaddrs", {})
                    for iova, size in c["maps"].items():
                        out.append(DmaWindow(iova, size, *vaddrs[iova]))
                break
            if f.kind == "cdev" and f.obj is d and f.extra.get("ioas") in self.ioas:
                ioas_id = f.extra["ioas"]
                vaddrs = self.ioas_vaddrs.get(ioas_id, {})
                for iova, size in self.ioas[ioas_id].items():
                    out.append(DmaWindow(iova, size, *vaddrs[iova]))
                break
        return sorted(out)

    def record_fault(self, bdf: str, iova: int, write: bool) -> None:
        """The IOMMU blocked a DMA of device ``bdf`` at ``iova`` (a real kernel logs it)."""
        kind = "Write" if write else "Read"
        self.iommu_faults.setdefault(bdf, []).append(IommuFault(iova, kind, "blocked"))

    # -- the Kernel protocol -------------------------------------------------------------------
    def request(self, bdf: str) -> bool:
        """vfio_pci_core_request: the kernel asking for device ``bdf`` back (an unbind);
        signals the eventfd registered at VFIO_PCI_REQ_IRQ_INDEX, if any."""
        fds = self.irqs.get((bdf, V.PciIrq.VFIO_PCI_REQ_IRQ_INDEX), [])
        for fd in fds:
            self.signal(fd)
        return bool(fds)

    def device_open(self, bdf: str) -> bool:
        """Whether any fd still holds device ``bdf`` (what vfio_unregister_group_dev waits
        for)."""
        return any(f.kind in ("device", "cdev") and f.obj.bdf == bdf for f in self.fds.values())

    def _last_device_fd_gone(self, f: Fd) -> None:
        if f.kind in ("device", "cdev") and not self.device_open(f.obj.bdf):
            for key in [k for k in self.irqs if k[0] == f.obj.bdf]:
                del self.irqs[key]  # vfio_pci_core_close_device turns every interrupt off

    def open(self, path: str, flags: int) -> int:
        self.calls.append(f"open {path}")
        if path == "/dev/null":
            return self._new("null")
        for prefix, page in self.hugetlbfs.items():
            if path.startswith(prefix):
                fd = self._new("memfd")
                self.fds[fd].extra["page"] = page
                return fd
        if path == "/dev/vfio/vfio":
            return self._new("container", {"groups": [], "iommu": False, "maps": {}})
        if path == "/dev/iommu":
            if not self.iommufd:
                raise err(errno.ENOENT)
            return self._new("iommufd")
        if path.startswith("/dev/vfio/devices/vfio"):
            n = int(path.rsplit("vfio", 1)[1])
            for d in self.devices.values():
                if d.cdev == n:
                    return self._new("cdev", d)
            raise err(errno.ENOENT)
        if path.startswith("/dev/vfio/noiommu-"):
            group = int(path.rsplit("-", 1)[1])
            if not self.noiommu or group not in self.viable:
                raise err(errno.ENOENT)
            return self._new("group", {"number": group, "container": None})
        if path.startswith("/dev/vfio/"):
            if self.noiommu:
                raise err(errno.ENOENT)
            group = int(path.rsplit("/", 1)[1])
            if group not in self.viable:
                raise err(errno.ENOENT)
            return self._new("group", {"number": group, "container": None})
        raise err(errno.ENOENT)

    def close(self, fd: int) -> None:
        f = self.fds.pop(fd, None)
        if f is None:
            raise err(errno.EBADF)
        self._dropped(f)

    def dup2(self, fd: int, fd2: int) -> None:
        self.calls.append("dup2")
        src = self.fds.get(fd)
        if src is None:
            raise err(errno.EBADF)
        if fd2 in self.fds:
            self.close(fd2)  # what the kernel does to the file fd2 held
        self.fds[fd2] = Fd(src.kind, src.obj, dict(src.extra))

    def mmap_fixed(
        self, addr: int, length: int, prot: int, flags: int, fd: int, offset: int
    ) -> int:
        self.calls.append("mmap_fixed")
        if fd == -1 and any(ctypes.addressof(d.bar0) == addr for d in self.devices.values()):
            self._model_bars.pop(addr, None)  # the device model no longer sees that range
            self.retired.append(addr)
            return addr
        real = self._real_maps.pop(addr, None)
        if fd == -1 and real is not None:  # memory retired in place: real inert memory there
            self._real.mmap_fixed(addr, length, prot, flags, -1, 0)
            self.retired.append(addr)
            return addr
        raise err(errno.EINVAL)  # only BARs and memory this kernel mapped are retired here

    def _null_ioctl(self, f: Fd, request: int, arg: Any) -> int:
        raise err(errno.ENOTTY)

    def _dropped(self, f: Fd) -> None:
        with self._cv:
            self._cv.notify_all()  # a wait on a closed eventfd ends
        self._last_device_fd_gone(f)
        self.iommu_gen += 1
        if (
            f.kind in ("device", "cdev")
            and f.obj.bdf in self.models
            and not any(g.kind in ("device", "cdev") and g.obj is f.obj for g in self.fds.values())
        ):
            self.models[f.obj.bdf].function_reset()  # vfio-pci resets on the last release
        if f.kind == "group" and f.obj["container"] is not None:
            c = f.obj["container"]
            c["groups"].remove(f.obj["number"])
            if not c["groups"]:  # the last group takes the IOMMU and its mappings with it
                for size in c["maps"].values():
                    self.pinned -= size
                c["maps"].clear()
                c["iommu"] = False
        if f.kind == "container":
            for size in f.obj["maps"].values():
                self.pinned -= size
        if f.kind == "memfd" and f.extra.get("reserved"):
            self.free_hugepages[f.extra["page"]] += f.extra["reserved"]

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        f = self.fds.get(fd)
        if f is None:
            raise err(errno.EBADF)
        name = {
            v: k for k, v in vars(V).items() if k.startswith("VFIO_") and isinstance(v, int)
        } | {v: k for k, v in vars(I).items() if k.startswith("IOMMU_") and isinstance(v, int)}
        self.calls.append(f"ioctl {name.get(request, hex(request))}")
        self.iommu_gen += 1
        handler = getattr(self, f"_{f.kind}_ioctl")
        return int(handler(f, request, arg))

    def _container_ioctl(self, f: Fd, request: int, arg: Any) -> int:
        c = f.obj
        if request == V.VFIO_GET_API_VERSION:
            return V.VFIO_API_VERSION
        if request == V.VFIO_CHECK_EXTENSION:
            if self.noiommu:
                return 1 if arg == V.IommuType.VFIO_NOIOMMU_IOMMU else 0
            return 1 if arg in (V.IommuType.VFIO_TYPE1v2_IOMMU, V.IommuType.VFIO_TYPE1_IOMMU) else 0
        if request == V.VFIO_SET_IOMMU:
            wanted = V.IommuType.VFIO_NOIOMMU_IOMMU if self.noiommu else None
            if not c["groups"] or (wanted is not None and arg != wanted):
                raise err(errno.EINVAL)
            c["iommu"] = True
            c["noiommu"] = self.noiommu
            return 0
        if c.get("noiommu"):
            raise err(errno.ENOTTY)  # the no-IOMMU driver has no map, unmap or info
        if not c["iommu"]:
            raise err(errno.EINVAL)
        if request == V.VFIO_IOMMU_GET_INFO:
            return self._type1_info(c, arg)
        if request == V.VFIO_IOMMU_MAP_DMA:
            m = V.vfio_iommu_type1_dma_map.from_buffer(arg)
            if m.iova % 4096 or m.size % 4096 or m.vaddr % 4096 or not m.size:
                raise err(errno.EINVAL)
            if not any(s <= m.iova and m.iova + m.size - 1 <= e for s, e in GROUP_RANGES):
                raise err(errno.EINVAL)
            for iova, size in c["maps"].items():
                if iova < m.iova + m.size and m.iova < iova + size:
                    raise err(errno.EEXIST)
            if len(c["maps"]) >= self.dma_entry_limit:
                raise err(errno.ENOSPC)
            if not self.privileged and self.pinned + m.size > self.memlock:
                raise err(errno.ENOMEM)
            c["maps"][m.iova] = m.size
            c.setdefault("vaddrs", {})[m.iova] = (
                m.vaddr,
                bool(m.flags & V.DmaMapFlags.VFIO_DMA_MAP_FLAG_READ),
                bool(m.flags & V.DmaMapFlags.VFIO_DMA_MAP_FLAG_WRITE),
            )
            self.pinned += m.size
            return 0
        if request == V.VFIO_IOMMU_UNMAP_DMA:
            u = V.vfio_iommu_type1_dma_unmap.from_buffer(arg)
            done = 0
            for iova in [
                i for i in c["maps"] if u.iova <= i and i + c["maps"][i] <= u.iova + u.size
            ]:
                done += c["maps"].pop(iova)
            self.pinned -= done
            u.size = done  # type1 reports what it unmapped; nothing is not an error
            return 0
        raise err(errno.ENOTTY)

    def _type1_info(self, c: dict[str, Any], buf: Any) -> int:
        head = V.vfio_iommu_type1_info.from_buffer(buf)
        hdr = ctypes.sizeof(V.vfio_iommu_type1_info)
        ranges_cap = ctypes.sizeof(V.vfio_iommu_type1_info_cap_iova_range) + 16 * len(GROUP_RANGES)
        avail_cap = ctypes.sizeof(V.vfio_iommu_type1_info_dma_avail)
        need = hdr + ranges_cap + avail_cap + 4  # the kernel pads caps to 8 bytes
        head.flags = (
            V.IommuInfoFlags.VFIO_IOMMU_INFO_PGSIZES | V.IommuInfoFlags.VFIO_IOMMU_INFO_CAPS
        )
        head.iova_pgsizes = 0x40201000  # 4K, 2M, 1G
        if head.argsz < need or (self.grow_info_once and not c.get("grown")):
            c["grown"] = True
            head.argsz = max(need, head.argsz + 8)
            head.cap_offset = 0
            return 0
        head.cap_offset = hdr
        r = V.vfio_iommu_type1_info_cap_iova_range.from_buffer(buf, hdr)
        r.header.id = V.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE
        r.header.version = 1
        r.header.next = hdr + ranges_cap
        r.nr_iovas = len(GROUP_RANGES)
        for i, (s, e) in enumerate(GROUP_RANGES):
            rr = V.vfio_iova_range.from_buffer(buf, hdr + ctypes.sizeof(r) + 16 * i)
            rr.start, rr.end = s, e
        a = V.vfio_iommu_type1_info_dma_avail.from_buffer(buf, hdr + ranges_cap)
        a.header.id = V.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL
        a.header.version = 1
        a.header.next = 0
        a.avail = self.dma_entry_limit - len(c["maps"])
        return 0

    def _group_ioctl(self, f: Fd, request: int, arg: Any) -> int:
        g = f.obj
        if request == V.VFIO_GROUP_GET_STATUS:
            arg.flags = V.GroupFlags.VFIO_GROUP_FLAGS_VIABLE if self.viable[g["number"]] else 0
            if g["container"] is not None:
                arg.flags |= V.GroupFlags.VFIO_GROUP_FLAGS_CONTAINER_SET
            return 0
        if request == V.VFIO_GROUP_SET_CONTAINER:
            if not self.viable[g["number"]]:
                raise err(errno.EPERM)
            c = self.fds[arg.value].obj
            c["groups"].append(g["number"])
            g["container"] = c
            return 0
        if request == V.VFIO_GROUP_GET_DEVICE_FD:
            bdf = arg.value.decode()
            d = self.devices.get(bdf)
            if (
                d is None
                or d.group != g["number"]
                or g["container"] is None
                or not g["container"]["iommu"]
            ):
                raise err(errno.EINVAL)
            return self._new("device", d)
        raise err(errno.ENOTTY)

    def _device_ioctl(self, f: Fd, request: int, arg: Any) -> int:
        d: FakeDevice = f.obj
        if request == V.VFIO_DEVICE_GET_INFO:
            info = V.vfio_device_info.from_buffer(arg)
            info.flags = V.DeviceFlags.VFIO_DEVICE_FLAGS_PCI | V.DeviceFlags.VFIO_DEVICE_FLAGS_RESET
            info.num_regions = V.PciRegion.VFIO_PCI_NUM_REGIONS
            info.num_irqs = V.PciIrq.VFIO_PCI_NUM_IRQS
            return 0
        if request == V.VFIO_DEVICE_GET_REGION_INFO:
            r = V.vfio_region_info.from_buffer(arg)
            if r.index >= V.PciRegion.VFIO_PCI_NUM_REGIONS:
                raise err(errno.EINVAL)
            r.offset = r.index << 40  # vfio-pci's VFIO_PCI_INDEX_TO_OFFSET
            r.flags = (
                V.RegionFlags.VFIO_REGION_INFO_FLAG_READ | V.RegionFlags.VFIO_REGION_INFO_FLAG_WRITE
            )
            if r.index == 0:
                r.size = ctypes.sizeof(d.bar0)
                r.flags |= V.RegionFlags.VFIO_REGION_INFO_FLAG_MMAP
            elif r.index == V.PciRegion.VFIO_PCI_CONFIG_REGION_INDEX:
                r.size = len(d.config)
            else:
                r.size = 0
            return 0
        if request == V.VFIO_DEVICE_GET_IRQ_INFO:
            arg.flags = V.IrqInfoFlags.VFIO_IRQ_INFO_EVENTFD
            arg.count = d.msix_vectors if arg.index == V.PciIrq.VFIO_PCI_MSIX_IRQ_INDEX else 1
            return 0
        if request == V.VFIO_DEVICE_SET_IRQS:
            s = V.vfio_irq_set.from_buffer(arg)
            if s.flags & V.IrqSetFlags.VFIO_IRQ_SET_ACTION_UNMASK:
                self.unmasked.append((d.bdf, s.index))
                return 0
            if s.flags & V.IrqSetFlags.VFIO_IRQ_SET_DATA_EVENTFD:
                fds = (ctypes.c_int32 * s.count).from_buffer(arg, ctypes.sizeof(s))
                self.irqs[(d.bdf, s.index)] = list(fds)
            elif s.count and (d.bdf, s.index) in self.irqs:
                # DATA_NONE with a count: loopback, the eventfd is signalled
                for efd in self.irqs[(d.bdf, s.index)][s.start : s.start + s.count]:
                    self.signal(efd)
            else:
                self.irqs.pop((d.bdf, s.index), None)
            return 0
        if request == V.VFIO_DEVICE_RESET:
            if d.bdf in self.models:
                self.models[d.bdf].function_reset()
            return 0
        raise err(errno.ENOTTY)

    def _iommufd_ioctl(self, f: Fd, request: int, arg: Any) -> int:
        if request == I.IOMMU_IOAS_ALLOC:
            ioas_id = len(self.ioas) + 1
            self.ioas[ioas_id] = {}
            arg.out_ioas_id = ioas_id
            return 0
        if request == I.IOMMU_IOAS_IOVA_RANGES:
            if arg.ioas_id not in self.ioas:
                raise err(errno.ENOENT)
            if arg.num_iovas < len(GROUP_RANGES):
                arg.num_iovas = len(GROUP_RANGES)
                raise err(errno.EMSGSIZE)
            out = (I.iommu_iova_range * len(GROUP_RANGES)).from_address(arg.allowed_iovas)
            for i, (s, e) in enumerate(GROUP_RANGES):
                out[i].start, out[i].last = s, e
            arg.num_iovas = len(GROUP_RANGES)
            arg.out_iova_alignment = 4096
            return 0
        if request == I.IOMMU_IOAS_MAP:
            maps = self.ioas[arg.ioas_id]
            if not arg.flags & I.IoasMapFlags.IOMMU_IOAS_MAP_FIXED_IOVA:
                raise err(errno.EINVAL)
            for iova, size in maps.items():
                if iova < arg.iova + arg.length and arg.iova < iova + size:
                    raise err(errno.EEXIST)
            if not self.privileged and self.pinned + arg.length > self.memlock:
                raise err(errno.ENOMEM)
            maps[arg.iova] = arg.length
            self.ioas_vaddrs.setdefault(arg.ioas_id, {})[arg.iova] = (
                arg.user_va,
                bool(arg.flags & I.IoasMapFlags.IOMMU_IOAS_MAP_READABLE),
                bool(arg.flags & I.IoasMapFlags.IOMMU_IOAS_MAP_WRITEABLE),
            )
            self.pinned += arg.length
            return 0
        if request == I.IOMMU_IOAS_UNMAP:
            maps = self.ioas[arg.ioas_id]
            if arg.iova not in maps:
                raise err(errno.ENOENT)
            arg.length = maps.pop(arg.iova)
            self.pinned -= arg.length
            return 0
        if request == I.IOMMU_OPTION:
            if arg.op != I.IOMMU_OPTION_OP_GET:
                raise err(errno.EPERM)  # setting needs CAP_SYS_RESOURCE (rlimit mode)
            if arg.option_id == I.IOMMU_OPTION_HUGE_PAGES:
                if arg.object_id not in self.ioas:
                    raise err(errno.ENOENT)
                arg.val64 = 1
            elif arg.option_id == I.IOMMU_OPTION_RLIMIT_MODE:
                if arg.object_id:
                    raise err(errno.EOPNOTSUPP)
                arg.val64 = 0
            else:
                raise err(errno.EOPNOTSUPP)
            return 0
        if request == I.IOMMU_DESTROY:
            maps = self.ioas.pop(arg.id)
            self.pinned -= sum(maps.values())
            return 0
        raise err(errno.ENOTTY)

    def _cdev_ioctl(self, f: Fd, request: int, arg: Any) -> int:
        if request == V.VFIO_DEVICE_BIND_IOMMUFD:
            if self.fds[arg.iommufd].kind != "iommufd" or f.extra.get("bound"):
                raise err(errno.EBUSY if f.extra.get("bound") else errno.EINVAL)
            f.extra["bound"] = True
            arg.out_devid = 7
            return 0
        if request == V.VFIO_DEVICE_ATTACH_IOMMUFD_PT:
            if not f.extra.get("bound") or arg.pt_id not in self.ioas:
                raise err(errno.EINVAL)
            f.extra["ioas"] = arg.pt_id
            return 0
        if request == V.VFIO_DEVICE_DETACH_IOMMUFD_PT:
            if not f.extra.get("ioas"):
                raise err(errno.EINVAL)
            f.extra["ioas"] = None
            self.detached.append(f.obj.bdf)
            return 0
        if not f.extra.get("ioas"):
            raise err(errno.EINVAL)  # a cdev is usable only once bound and attached
        return self._device_ioctl(f, request, arg)

    def mmap(self, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
        f = self.fds[fd]
        if f.kind in ("device", "cdev"):
            d: FakeDevice = f.obj
            if d.bdf in self.models:
                self._model_bars[ctypes.addressof(d.bar0)] = (length, self.models[d.bdf])
            return ctypes.addressof(d.bar0)
        if f.kind == "memfd" and f.extra["page"] > 4096 and f.extra.get("reserved") is None:
            page = f.extra["page"]
            pages = length // page
            if self.free_hugepages.get(page, 0) < pages:
                raise err(errno.ENOMEM)
            self.free_hugepages[page] -= pages
            f.extra["reserved"] = pages
        # Real memory (the DMA layer zeroes and copies through it), aligned as hugetlb is.
        align = f.extra["page"] if f.kind == "memfd" else 4096
        total = length + align
        base = self._real.mmap(total, prot, _sys.MAP_PRIVATE | _sys.MAP_ANONYMOUS, -1, 0)
        addr = (base + align - 1) & ~(align - 1)
        self._real_maps[addr] = (base, total)
        return addr

    def munmap(self, addr: int, length: int) -> None:
        self.calls.append("munmap")
        self._model_bars.pop(addr, None)
        real = self._real_maps.pop(addr, None)
        if real is not None:
            self._real.munmap(*real)

    def memfd_create(self, name: str, flags: int) -> int:
        page = 4096
        if flags & os.MFD_HUGETLB and self.hugetlbfs:
            raise err(errno.EINVAL)  # a kernel without MFD_HUGETLB: hugetlbfs it is
        if flags & os.MFD_HUGETLB:
            page = 1 << ((flags >> os.MFD_HUGE_SHIFT) & os.MFD_HUGE_MASK)
        fd = self._new("memfd")
        self.fds[fd].extra["page"] = page
        return fd

    def ftruncate(self, fd: int, length: int) -> None:
        self.fds[fd].extra["size"] = length

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        if self.fds[fd].kind == "null":
            return b""
        d: FakeDevice = self.fds[fd].obj
        index, off = offset >> 40, offset & ((1 << 40) - 1)
        if index != V.PciRegion.VFIO_PCI_CONFIG_REGION_INDEX:
            raise err(errno.EINVAL)
        return bytes(d.config[off : off + size])

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        if self.fds[fd].kind == "null":
            return len(data)
        d: FakeDevice = self.fds[fd].obj
        off = offset & ((1 << 40) - 1)
        d.config[off : off + len(data)] = data
        return len(data)

    def eventfd(self, initval: int, flags: int) -> int:
        fd = self._new("eventfd")
        self.fds[fd].extra["count"] = initval
        return fd

    def signal(self, fd: int) -> None:
        """The device raising the interrupt wired to eventfd ``fd``."""
        with self._cv:
            self.fds[fd].extra["count"] += 1
            self._cv.notify_all()

    def read(self, fd: int, size: int) -> bytes:
        f = self.fds[fd]
        count: int = f.extra["count"]
        f.extra["count"] = 0
        return count.to_bytes(8, "little")

    def wait_readable(self, fd: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                f = self.fds.get(fd)
                if f is None:
                    raise err(errno.EBADF)
                if f.extra.get("count"):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)

    def mlock(self, addr: int, length: int) -> None:
        if not self.privileged and self.mlocked + length > self.memlock:
            raise err(errno.ENOMEM)
        self.mlocked += length

    def munlock(self, addr: int, length: int) -> None:
        self.calls.append(f"munlock {addr:#x}+{length:#x}")
        self.mlocked = max(0, self.mlocked - length)

    def memlock_limit(self) -> int:
        return self.memlock

    def pagemap_entry(self, vaddr: int) -> int:
        if self.physical is not None:
            return (1 << 63) | (self.physical(vaddr) >> 12 if self.privileged else 0)
        pfn = (vaddr >> 12) & 0xFFFFF if self.privileged else 0
        return (1 << 63) | pfn
