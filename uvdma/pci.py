"""PCI devices through sysfs: addresses, discovery, IOMMU groups, driver binding.

Binding follows Documentation/driver-api/vfio.rst: set ``driver_override`` to
``vfio-pci``, unbind from the current driver, and ask the PCI core to probe again
(``/sys/bus/pci/drivers_probe``); the group's character device
``/dev/vfio/<group>`` then appears.  A group is usable by VFIO only when every
device in it is bound to vfio-pci, to pci-stub, to no driver, or is a bridge
(pcieport); :func:`bind` refuses up front, naming the devices, when it is not.

:func:`bind` never takes a device in use: when one of its block devices is mounted,
used as swap, held by device-mapper/md/LVM, or open in a process, it refuses and names
each use (unless ``force``).  :func:`unbind` gives back only devices bound to vfio-pci.
The kernel's unbind waits for the device's holder and cannot be interrupted, so it runs
in a detached child process (``python -m uvdma.pci give-back``) that then re-probes the
previous driver; :func:`unbind` waits a bounded time and names the holding processes
if they do not let go.  A device is never left without a driver: the child finishes
the job as soon as the holders release the device, whatever happens to the caller.

Every function takes a ``sysfs`` root (default ``/sys``), and those that look at
processes a ``procfs`` root (default ``/proc``), so tests can point them at stand-in
trees.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from uvdma.errors import DeviceInUseError, PciError, UnbindPendingError

SYSFS = Path("/sys")
DEVFS = Path("/dev")
PROCFS = Path("/proc")
#: Where bind() remembers each device's previous driver, for unbind() to restore.
STATE_DIR = Path(os.environ.get("UVDMA_STATE_DIR", "/run/uvdma/bound"))
NVME_CLASS = 0x010802  # PCI class 01h (mass storage), 08h (NVM), 02h (NVM Express)
VFIO_PCI = "vfio-pci"
#: Drivers that leave an IOMMU group viable for VFIO (drivers/vfio/group.c and vfio-pci).
VIABLE_DRIVERS = frozenset({VFIO_PCI, "pci-stub", "pcieport"})
#: How long unbind() waits for the holders of a device by default (the kernel asks them
#: to let go at once and then every 10 s: drivers/vfio/vfio_main.c).
UNBIND_WAIT = 30.0
#: How long bind() lets processes that hold a block device open close it (udev's probes).
BIND_SETTLE = 5.0

_BDF = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):"
    r"(?P<dev>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])$"
)


@dataclass(frozen=True, order=True)
class PciAddress:
    """A PCI function address, ``DDDD:BB:DD.F``."""

    domain: int
    bus: int
    device: int
    function: int

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """Parse ``0000:01:00.0`` or ``01:00.0`` (domain 0)."""
        m = _BDF.match(text.strip())
        if not m or int(m["dev"], 16) > 0x1F:
            raise PciError(
                f"{text!r} is not a PCI address: write DDDD:BB:DD.F or BB:DD.F, "
                "e.g. 0000:01:00.0 (see `uvdma list` or `lspci -D`)"
            )
        return cls(int(m["domain"] or "0", 16), int(m["bus"], 16), int(m["dev"], 16), int(m["fn"]))

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function}"


@dataclass(frozen=True)
class PciDevice:
    """One PCI function as sysfs shows it."""

    address: PciAddress
    sysfs: Path = SYSFS

    @property
    def path(self) -> Path:
        """``/sys/bus/pci/devices/<address>``."""
        return self.sysfs / "bus/pci/devices" / str(self.address)

    def _read_hex(self, name: str) -> int:
        return int((self.path / name).read_text().strip(), 16)

    @property
    def vendor(self) -> int:
        """PCI vendor ID."""
        return self._read_hex("vendor")

    @property
    def device(self) -> int:
        """PCI device ID."""
        return self._read_hex("device")

    @property
    def class_code(self) -> int:
        """24-bit class code (base class, subclass, programming interface)."""
        return self._read_hex("class")

    @property
    def driver(self) -> str | None:
        """Name of the bound driver, or None.

        One readlink, no is_symlink check first: a driver binding or unbinding in between
        (udev, a give-back child) would make the pair race.
        """
        try:
            return Path(os.readlink(self.path / "driver")).name
        except (FileNotFoundError, NotADirectoryError):
            return None

    @property
    def iommu_group(self) -> int | None:
        """The IOMMU group number, or None when no IOMMU translates for the device."""
        try:
            return int(Path(os.readlink(self.path / "iommu_group")).name)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def __str__(self) -> str:
        return str(self.address)


def device(address: str | PciAddress, sysfs: Path = SYSFS) -> PciDevice:
    """The device at ``address``; a clear error when it is malformed or absent."""
    addr = address if isinstance(address, PciAddress) else PciAddress.parse(address)
    dev = PciDevice(addr, sysfs)
    if not dev.path.exists():
        raise PciError(f"no PCI device at {addr}: see `uvdma list` or `lspci -D` for what exists")
    return dev


def list_devices(sysfs: Path = SYSFS) -> list[PciDevice]:
    """Every PCI function, in address order."""
    root = sysfs / "bus/pci/devices"
    if not root.is_dir():
        return []
    return sorted(
        (PciDevice(PciAddress.parse(p.name), sysfs) for p in root.iterdir()),
        key=lambda d: d.address,
    )


def group_devices(group: int, sysfs: Path = SYSFS) -> list[PciDevice]:
    """The devices in IOMMU group ``group``."""
    root = sysfs / "kernel/iommu_groups" / str(group) / "devices"
    return sorted(
        (PciDevice(PciAddress.parse(p.name), sysfs) for p in root.iterdir()),
        key=lambda d: d.address,
    )


def group_blockers(
    group: int, sysfs: Path = SYSFS, *, besides: PciAddress | None = None
) -> list[PciDevice]:
    """Devices that make ``group`` not viable for VFIO (bound to another driver)."""
    return [
        d
        for d in group_devices(group, sysfs)
        if d.address != besides and d.driver is not None and d.driver not in VIABLE_DRIVERS
    ]


def _write(path: Path, value: str, what: str) -> None:
    try:
        path.write_text(value)
    except PermissionError as e:
        raise PciError(f"{what}: permission denied writing {path}; run as root") from e
    except OSError as e:
        if e.errno == errno.ENODEV and path.name == "drivers_probe":
            return  # no driver wanted the device: that is an answer, not a failure
        raise PciError(f"{what}: writing {value.strip()!r} to {path} failed: {e}") from e


# -- what uses a device's block devices -----------------------------------------------------

_MPATH = re.compile(r"^nvme(\d+)c\d+n(\d+)$")  # a hidden path of a native-multipath namespace


@dataclass(frozen=True)
class BlockDevice:
    """A block device (disk or partition) that belongs to a PCI device."""

    name: str  # nvme0n1, nvme0n1p1
    major: int
    minor: int
    path: Path  # its sysfs directory

    @property
    def devno(self) -> tuple[int, int]:
        """(major, minor)."""
        return self.major, self.minor


def _is_block(d: Path) -> bool:
    sub = d / "subsystem"
    return (d / "dev").is_file() and sub.is_symlink() and Path(os.readlink(sub)).name == "block"


def _block_device(d: Path) -> BlockDevice | None:
    try:
        major, minor = (int(x) for x in (d / "dev").read_text().strip().split(":"))
    except (OSError, ValueError):
        return None
    return BlockDevice(d.name, major, minor, d)


def block_devices(address: str | PciAddress, sysfs: Path = SYSFS) -> list[BlockDevice]:
    """Every block device below the PCI device in sysfs (disks and their partitions,
    NVMe namespaces ``nvme*/nvme*n*``), and the heads of native-multipath namespaces whose
    paths go through it."""
    dev = device(address, sysfs)
    found: dict[str, BlockDevice] = {}
    heads: set[str] = set()
    for root, dirs, _files in os.walk(dev.path.resolve()):  # never follows symlinks
        here = Path(root)
        for name in dirs:
            d = here / name
            if d.is_symlink() or not _is_block(d):
                continue
            m = _MPATH.match(name)
            if m:
                heads.add(f"nvme{m[1]}n{m[2]}")
            bd = _block_device(d)
            if bd is not None:
                found.setdefault(bd.name, bd)
    for head in sorted(heads):
        top = sysfs / "class/block" / head
        if not top.exists():
            continue
        for d in [top, *(p for p in top.iterdir() if (p / "partition").exists())]:
            bd = _block_device(d)
            if bd is not None:
                found.setdefault(bd.name, bd)
    return sorted(found.values(), key=lambda b: b.name)


def _unescape(field: str) -> str:
    """Undo the octal escapes of /proc/*/mountinfo and /proc/swaps (``\\040`` is a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _dev_matches(path: str, devnos: set[tuple[int, int]], names: dict[str, str]) -> str | None:
    """The block device name a ``/dev/...`` path stands for, if it is one of ours."""
    if not path.startswith("/dev/"):
        return None
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            key = (os.major(st.st_rdev), os.minor(st.st_rdev))
            return next((n for n, d in names.items() if _devno(d) == key), None)
    base = Path(path).name  # no such node here (a stand-in tree): go by name
    return base if base in names else None


def _devno(text: str) -> tuple[int, int]:
    major, minor = text.split(":")
    return int(major), int(minor)


def _pids(procfs: Path) -> Iterator[Path]:
    with contextlib.suppress(OSError):
        for p in procfs.iterdir():
            if p.name.isdigit():
                yield p


def _comm(pid_dir: Path) -> str:
    try:
        return (pid_dir / "comm").read_text().strip()
    except OSError:
        return "?"


def _mount_tables(procfs: Path) -> Iterator[tuple[str, str]]:
    """(where, mountinfo text) for our mount namespace and every other one a process is in."""
    seen: set[str] = set()
    with contextlib.suppress(OSError):
        seen.add(os.readlink(procfs / "self/ns/mnt"))
    with contextlib.suppress(OSError):
        yield "", (procfs / "self/mountinfo").read_text()
    for p in _pids(procfs):
        try:
            ns = os.readlink(p / "ns/mnt")
        except OSError:
            continue
        if ns in seen:
            continue
        seen.add(ns)
        with contextlib.suppress(OSError):
            yield (
                f" (in the mount namespace of pid {p.name} ({_comm(p)}))",
                (p / "mountinfo").read_text(),
            )


def block_device_users(
    devices: list[BlockDevice],
    *,
    sysfs: Path = SYSFS,
    procfs: Path = PROCFS,
    devfs: Path = DEVFS,
) -> list[str]:
    """Each use of ``devices``, one line each: mounted (where), swap, held by
    device-mapper/md/LVM (``holders/``), open in a process (pid, comm), or held open
    exclusively by the kernel."""
    names = {b.name: f"{b.major}:{b.minor}" for b in devices}
    devnos = {b.devno for b in devices}
    uses: list[str] = []
    named: set[str] = set()

    def use(name: str, text: str) -> None:
        line = f"{name} {text}"
        if line not in uses:
            uses.append(line)
            named.add(name)

    for where, table in _mount_tables(procfs):
        for line in table.splitlines():
            left, sep, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if not sep or len(fields) < 5:
                continue
            name = next((n for n, d in names.items() if d == fields[2]), None)
            if name is None and len(tail) >= 2:
                name = _dev_matches(_unescape(tail[1]), devnos, names)
            if name is not None:
                use(name, f"is mounted on {_unescape(fields[4])}{where}")
    with contextlib.suppress(OSError):
        for line in (procfs / "swaps").read_text().splitlines()[1:]:
            if line.split():
                name = _dev_matches(_unescape(line.split()[0]), devnos, names)
                if name is not None:
                    use(name, "is in use as swap")
    for b in devices:
        with contextlib.suppress(OSError):
            for h in sorted((b.path / "holders").iterdir()):
                use(b.name, f"is held by {_holder_kind(h)}")
    for p in _pids(procfs):
        try:
            fds = list((p / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            name = None
            try:
                st = os.stat(fd)
                if stat.S_ISBLK(st.st_mode):
                    key = (os.major(st.st_rdev), os.minor(st.st_rdev))
                    name = next((n for n, d in names.items() if _devno(d) == key), None)
            except OSError:
                name = _dev_matches(target, devnos, names)
            if name is not None:
                use(name, f"is open in pid {p.name} ({_comm(p)})")
    for b in devices:  # the kernel's own exclusive users (a filesystem, RAID, ZFS, ...)
        if b.name in named:
            continue
        try:
            excl = os.open(devfs / b.name, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.EBUSY:
                use(b.name, "is held open exclusively by the kernel (a filesystem, RAID, ...)")
            continue
        os.close(excl)
    return uses


def _holder_kind(holder: Path) -> str:
    name = holder.name
    with contextlib.suppress(OSError):
        dm_name = (holder / "dm/name").read_text().strip()
        uuid = ""
        with contextlib.suppress(OSError):
            uuid = (holder / "dm/uuid").read_text().strip()
        kind = "LVM" if uuid.startswith("LVM-") else "device-mapper"
        return f"{name} ({kind} {dm_name})"
    if name.startswith("md"):
        return f"{name} (md RAID)"
    return name


# -- bind ----------------------------------------------------------------------------------


def bind(
    address: str | PciAddress,
    sysfs: Path = SYSFS,
    *,
    force: bool = False,
    procfs: Path = PROCFS,
    devfs: Path = DEVFS,
    settle: float = BIND_SETTLE,
) -> str | None:
    """Bind a device to vfio-pci; returns the driver it had (None if none).

    Refuses, changing nothing, when vfio-pci is not loaded, when the device has no
    IOMMU group, when another device in its group keeps the group from being viable,
    when an unbind of it is still under way, or (unless ``force``) when one of its
    block devices is in use (:class:`~uvdma.errors.DeviceInUseError` names each use).
    When the only uses are processes holding a block device open, they get ``settle``
    seconds to close it first: udev's workers open every new block device for a moment
    (blkid), so a bind right after the driver made them would otherwise be refused.
    """
    dev = device(address, sysfs)
    what = f"bind {dev.address} to {VFIO_PCI}"
    if not (sysfs / "bus/pci/drivers" / VFIO_PCI).is_dir():
        raise PciError(f"{what}: the vfio-pci driver is not loaded; run `modprobe vfio-pci`")
    group = dev.iommu_group
    if group is None and not noiommu_mode(sysfs):
        raise PciError(
            f"{what}: the device has no IOMMU group, so no IOMMU protects it; "
            "enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line)"
        )
    # in VFIO's no-IOMMU mode vfio-pci makes a group of its own for the device when it binds
    blockers = [] if group is None else group_blockers(group, sysfs, besides=dev.address)
    if blockers:
        names = ", ".join(f"{d.address} ({d.driver})" for d in blockers)
        raise PciError(
            f"{what}: IOMMU group {group} is not viable: bind {names} to vfio-pci too, "
            "or unbind them from their drivers"
        )
    previous = dev.driver
    if previous == VFIO_PCI:
        return previous
    job = _running_job(dev.address, settle=5.0)
    if job is not None:
        raise PciError(
            f"{what}: an unbind of it is still under way (pid {job}); wait for it to finish"
        )
    if previous is not None and not force:
        blocks = block_devices(dev.address, sysfs)
        users = block_device_users(blocks, sysfs=sysfs, procfs=procfs, devfs=devfs)
        deadline = time.monotonic() + settle
        while users and all(" is open in pid " in u for u in users):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
            users = block_device_users(blocks, sysfs=sysfs, procfs=procfs, devfs=devfs)
        if users:
            raise DeviceInUseError(
                f"{what}: its block devices are in use ({'; '.join(users)}): unmount them, "
                "stop the swap, remove the device-mapper/md/LVM devices on top and close them, "
                f"then try again; `uvdma bind --force {dev.address}` takes it anyway, and "
                f"everything using it through {previous} gets I/O errors. Nothing was changed",
                users,
            )
    _remember(dev.address, previous)
    _write(dev.path / "driver_override", VFIO_PCI, what)
    if previous is not None:
        _write(dev.path / "driver/unbind", str(dev.address), what)
    _write(sysfs / "bus/pci/drivers_probe", str(dev.address), what)
    if dev.driver != VFIO_PCI:
        raise PciError(f"{what}: the device is bound to {dev.driver} after probing; see dmesg")
    return previous


# -- unbind ----------------------------------------------------------------------------------


def _jobs_dir() -> Path:
    return STATE_DIR / "unbinding"


def _job_file(address: PciAddress) -> Path:
    return _jobs_dir() / f"{address}.json"


def _read_job(address: PciAddress) -> dict[str, object]:
    try:
        got = json.loads(_job_file(address).read_text())
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (our own child, not reaped yet) has finished its work
    with contextlib.suppress(OSError):
        fields = (PROCFS / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    return True


def _running_job(address: PciAddress, settle: float = 0.0) -> int | None:
    """The pid of a give-back child still at work on ``address``, if any; a job that has
    given the device back is finishing and is waited for up to ``settle`` seconds."""
    deadline = time.monotonic() + settle
    while True:
        job = _read_job(address)
        pid = job.get("pid")
        if not isinstance(pid, int) or job.get("done") or not _alive(pid):
            return None
        if job.get("phase") == "unbinding" or time.monotonic() >= deadline:
            return pid
        time.sleep(0.05)


def _chardev_rdevs(address: PciAddress, sysfs: Path, devfs: Path) -> list[int]:
    """Device numbers of the character devices through which a process holds the device:
    its VFIO group ``/dev/vfio/<group>`` and its vfio cdev ``/dev/vfio/devices/vfioN``."""
    dev = PciDevice(address, sysfs)
    out: list[int] = []
    group = dev.iommu_group
    if group is not None:
        with contextlib.suppress(OSError):
            out.append(os.stat(vfio_group_path(group, devfs)).st_rdev)
        with contextlib.suppress(OSError, ValueError):
            major, minor = _devno((sysfs / "class/vfio" / str(group) / "dev").read_text().strip())
            out.append(os.makedev(major, minor))
    with contextlib.suppress(OSError):
        for c in (dev.path / "vfio-dev").iterdir():
            with contextlib.suppress(OSError, ValueError):
                major, minor = _devno((c / "dev").read_text().strip())
                out.append(os.makedev(major, minor))
    return sorted(set(out))


def device_holders(
    address: str | PciAddress,
    sysfs: Path = SYSFS,
    *,
    procfs: Path = PROCFS,
    devfs: Path = DEVFS,
    rdevs: list[int] | None = None,
) -> list[tuple[int, str]]:
    """Processes holding a VFIO device: (pid, comm) of each that has its group
    (``/dev/vfio/<group>``) or its vfio cdev open, or a VFIO device fd the kernel
    attributes to it (``vfio-device-syspath`` in fdinfo, newer kernels).

    ``rdevs`` are the character devices to look for (taken before an unbind: the nodes
    go away when vfio-pci lets the device go, the holders' fds stay).
    """
    addr = address if isinstance(address, PciAddress) else PciAddress.parse(address)
    wanted = set(rdevs if rdevs is not None else _chardev_rdevs(addr, sysfs, devfs))
    me = os.getpid()
    out: list[tuple[int, str]] = []
    for p in _pids(procfs):
        if int(p.name) == me:
            continue
        try:
            fds = list((p / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            hit = False
            try:
                st = os.stat(fd)
                hit = stat.S_ISCHR(st.st_mode) and st.st_rdev in wanted
            except OSError:
                pass
            if not hit:
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == "anon_inode:[vfio-device]":
                        info = (p / "fdinfo" / fd.name).read_text()
                        hit = f"/{addr}\n" in info and "vfio-device-syspath" in info
            if hit:
                out.append((int(p.name), _comm(p)))
                break
    return out


def _describe(holders: list[tuple[int, str]]) -> str:
    return ", ".join(f"pid {pid} ({comm})" for pid, comm in holders)


def unbind(
    address: str | PciAddress,
    sysfs: Path = SYSFS,
    *,
    wait: float = UNBIND_WAIT,
    procfs: Path = PROCFS,
    devfs: Path = DEVFS,
    progress: Callable[[str], None] | None = None,
) -> str | None:
    """Give a device bound to vfio-pci back to the driver it had before :func:`bind` (or,
    if that is not known, to whichever driver the kernel picks).

    Returns the driver it is bound to afterwards (None if no driver claimed it).  A
    device bound to any other driver, or to none, is refused (:class:`PciError`) and
    nothing changes.  The work runs in a detached child process: the kernel's unbind
    waits, uninterruptibly, until every holder has released the device (VFIO asks
    them through the device request interrupt).  If they have not let go within
    ``wait`` seconds this raises :class:`~uvdma.errors.UnbindPendingError` naming them;
    the child goes on and gives the device back as soon as they do.  ``progress`` is
    called with a line now and then while waiting.
    """
    dev = device(address, sysfs)
    if not wait >= 0:
        raise PciError(f"unbind {dev.address}: the wait must be 0 s or more, not {wait}")
    job = _running_job(dev.address)
    if job is None:
        driver = dev.driver
        unfinished = _read_job(dev.address)
        if driver is None and unfinished and not unfinished.get("done"):
            # a give-back that was killed after vfio-pci let go: finish its job
            if progress:
                progress(f"finishing an unbind of {dev.address} that was cut short")
        elif driver != VFIO_PCI:
            raise PciError(
                f"unbind {dev.address}: it is bound to {driver or 'no driver'}, not vfio-pci; "
                "uvdma unbind gives back only devices bound to vfio-pci. Nothing was changed"
                + (
                    f" (to let the kernel choose a driver: echo {dev.address} > "
                    f"{sysfs}/bus/pci/drivers_probe)"
                    if driver is None
                    else ""
                )
            )
        rdevs = _chardev_rdevs(dev.address, sysfs, devfs) or [
            x for x in _as_list(unfinished.get("rdevs")) if isinstance(x, int)
        ]
        started = _start_give_back(dev.address, sysfs, rdevs)
        child: subprocess.Popen[bytes] | None = started
        pid = started.pid
    else:
        child, pid = None, job
        rdevs = [x for x in _as_list(_read_job(dev.address).get("rdevs")) if isinstance(x, int)]
        if progress:
            progress(f"an unbind of {dev.address} is already under way (pid {pid}): waiting")
    return _wait_for_give_back(dev, child, pid, rdevs, wait, procfs, devfs, progress)


def _as_list(x: object) -> list[object]:
    return list(x) if isinstance(x, list) else []


def _start_give_back(address: PciAddress, sysfs: Path, rdevs: list[int]) -> subprocess.Popen[bytes]:
    """Start the detached child that does the unbind and the re-probe.

    SIGINT and SIGTERM are blocked while it starts (and stay blocked in it): whatever
    happens to the caller from now on, the child finishes the job."""
    args = [
        sys.executable,
        "-m",
        "uvdma.pci",
        "give-back",
        str(address),
        "--sysfs",
        str(sysfs),
        "--rdevs",
        ",".join(str(r) for r in rdevs),
    ]
    env = {**os.environ, "UVDMA_STATE_DIR": str(STATE_DIR)}
    blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            env=env,
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _wait_for_give_back(
    dev: PciDevice,
    child: subprocess.Popen[bytes] | None,
    pid: int,
    rdevs: list[int],
    wait: float,
    procfs: Path,
    devfs: Path,
    progress: Callable[[str], None] | None,
) -> str | None:
    try:
        return _wait_loop(dev, child, pid, rdevs, wait, procfs, devfs, progress)
    except KeyboardInterrupt:
        if progress:
            previous = _read_job(dev.address).get("previous") or _recall(dev.address)
            progress(
                f"the unbind of {dev.address} goes on in the background (pid {pid}): the "
                f"device goes back to {previous or 'its driver'} as soon as its holders let go"
            )
        raise


def _wait_loop(
    dev: PciDevice,
    child: subprocess.Popen[bytes] | None,
    pid: int,
    rdevs: list[int],
    wait: float,
    procfs: Path,
    devfs: Path,
    progress: Callable[[str], None] | None,
) -> str | None:
    start = time.monotonic()
    told = False
    while True:
        finished = child.poll() is not None if child is not None else not _alive(pid)
        if finished:
            job = _read_job(dev.address)
            code = child.returncode if child is not None else (0 if job.get("done") else 1)
            if code == 0:
                return dev.driver
            why = str(job.get("error") or f"the give-back process (pid {pid}) ended with {code}")
            if dev.driver is None:
                why += f"; `uvdma unbind {dev.address}` finishes the job"
            raise PciError(f"unbind {dev.address}: {why}")
        waited = time.monotonic() - start
        if waited >= wait:
            holders = device_holders(
                dev.address, dev.sysfs, procfs=procfs, devfs=devfs, rdevs=rdevs
            )
            previous = _read_job(dev.address).get("previous") or _recall(dev.address)
            back = f"to {previous}" if previous else "to its driver"
            if not holders and dev.driver != VFIO_PCI:
                raise UnbindPendingError(
                    f"unbind {dev.address}: not finished after {wait:g} s: vfio-pci has let it "
                    f"go and nothing holds it; the device goes back {back} in the background "
                    f"(pid {pid}), shortly",
                    holders,
                )
            who = _describe(holders) if holders else "a process uvdma could not identify"
            raise UnbindPendingError(
                f"unbind {dev.address}: still held after {wait:g} s by {who}: VFIO asked it to "
                f"let go (device request) and it has not. The device goes back {back} as soon "
                f"as it does; the unbind goes on in the background (pid {pid}). To end it now, "
                "stop that process",
                holders,
            )
        if progress and not told and waited >= 1.0:
            told = True
            holders = device_holders(
                dev.address, dev.sysfs, procfs=procfs, devfs=devfs, rdevs=rdevs
            )
            if holders:
                progress(
                    f"waiting for {_describe(holders)} to release {dev.address} "
                    f"(asked through the VFIO device request; up to {wait:g} s)"
                )
        time.sleep(0.05)


def give_back(
    address: str | PciAddress,
    sysfs: Path = SYSFS,
    *,
    rdevs: list[int] | None = None,
    procfs: Path = PROCFS,
    devfs: Path = DEVFS,
    settle: float = 2.0,
    poll: float = 0.25,
) -> str | None:
    """What the give-back child does (``python -m uvdma.pci give-back BDF``): clear
    ``driver_override``, unbind from vfio-pci (this blocks until every holder has let
    go), then probe until the previous driver (remembered by :func:`bind`; else the
    kernel's choice) has the device.

    The previous driver cannot take the device while a process still holds its IOMMU
    group (the group's DMA ownership, type1), so probing goes on as long as someone
    does, and ``settle`` seconds more after that.  Returns the driver it ends with.
    """
    dev = device(address, sysfs)
    what = f"unbind {dev.address}"
    previous = _recall(dev.address)
    wanted = rdevs if rdevs is not None else _chardev_rdevs(dev.address, sysfs, devfs)
    state: dict[str, object] = {"pid": os.getpid(), "previous": previous, "rdevs": wanted}

    def record(**kw: object) -> None:
        state.update(kw)
        with contextlib.suppress(OSError):
            _jobs_dir().mkdir(parents=True, exist_ok=True)
            tmp = _job_file(dev.address).with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(_job_file(dev.address))

    record(phase="unbinding")
    try:
        _write(dev.path / "driver_override", "\n", what)
        if dev.driver == VFIO_PCI:
            _write(dev.path / "driver/unbind", str(dev.address), what)  # blocks: see above
        record(phase="probing")
        quiet_since: float | None = None
        while True:
            if previous is not None and dev.driver not in (None, previous):
                _write(dev.path / "driver/unbind", str(dev.address), what)  # the wrong one
            if dev.driver is None:
                _write(sysfs / "bus/pci/drivers_probe", str(dev.address), what)
            if previous is not None and dev.driver is None:
                bind_file = sysfs / "bus/pci/drivers" / previous / "bind"
                with contextlib.suppress(PciError):
                    if bind_file.exists():
                        _write(bind_file, str(dev.address), what)
            now = dev.driver
            if now is not None and (previous is None or now == previous):
                break
            if device_holders(dev.address, sysfs, procfs=procfs, devfs=devfs, rdevs=wanted):
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= settle:
                if previous is None:
                    break  # no driver wants it: that is the kernel's answer
                raise PciError(
                    f"{what}: {previous} did not take the device back (it is bound to "
                    f"{now or 'no driver'}); see dmesg, then `echo {dev.address} > "
                    f"{sysfs}/bus/pci/drivers/{previous}/bind`"
                )
            time.sleep(poll)
    except PciError as e:
        record(phase="failed", error=str(e))
        raise
    _forget(dev.address)
    record(phase="done", done=True, driver=dev.driver)
    return dev.driver


def _remember(address: PciAddress, driver: str | None) -> None:
    try:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        (STATE_DIR / str(address)).write_text(driver or "")
    except OSError:
        pass  # best effort: unbind then lets the kernel choose


def _recall(address: PciAddress) -> str | None:
    try:
        return (STATE_DIR / str(address)).read_text().strip() or None
    except OSError:
        return None


def _forget(address: PciAddress) -> None:
    with contextlib.suppress(OSError):
        (STATE_DIR / str(address)).unlink()


def vfio_group_path(group: int, devfs: Path = DEVFS) -> Path:
    """The VFIO group character device: ``/dev/vfio/<group>``, or ``/dev/vfio/noiommu-<group>``
    for a group VFIO made up in no-IOMMU mode (when that node exists)."""
    noiommu = devfs / "vfio" / f"noiommu-{group}"
    if noiommu.exists():
        return noiommu
    return devfs / "vfio" / str(group)


def noiommu_mode(sysfs: Path = SYSFS) -> bool:
    """Whether VFIO's unsafe no-IOMMU mode is on (``vfio.enable_unsafe_noiommu_mode``)."""
    try:
        param = sysfs / "module/vfio/parameters/enable_unsafe_noiommu_mode"
        return param.read_text().strip() == "Y"
    except OSError:
        return False


def nvme_controllers(sysfs: Path = SYSFS) -> list[PciDevice]:
    """Every NVMe controller (class 0x010802)."""
    return [d for d in list_devices(sysfs) if d.class_code == NVME_CLASS]


def _give_back_main(argv: list[str]) -> int:
    """``python -m uvdma.pci give-back BDF [--sysfs DIR] [--rdevs N,N]``: the detached
    child of :func:`unbind`.  SIGINT, SIGTERM and SIGHUP are ignored: once started it
    finishes, so the device never stays without a driver."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    address, sysfs, rdevs = argv[0], SYSFS, None
    it = iter(argv[1:])
    for flag in it:
        value = next(it, "")
        if flag == "--sysfs":
            sysfs = Path(value)
        elif flag == "--rdevs":
            rdevs = [int(x) for x in value.split(",") if x]
    try:
        give_back(address, sysfs, rdevs=rdevs)
    except PciError as e:
        print(f"uvdma give-back: {e}", file=sys.stderr)
        return 1
    return 0


def _bind_nvme_main() -> int:
    """``python -m uvdma.pci bind-nvme``: the test guest's set-up step."""
    subprocess.run(["modprobe", VFIO_PCI], check=False)
    controllers = nvme_controllers()
    if not controllers:
        print("uvdma: no NVMe controller to bind", file=sys.stderr)
        return 1
    for dev in controllers:
        previous = bind(dev.address)
        print(
            f"uvdma: {dev.address} (group {dev.iommu_group}) bound to {VFIO_PCI}"
            f" (was {previous or 'unbound'})"
        )
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["bind-nvme"]:
        sys.exit(_bind_nvme_main())
    if sys.argv[1:2] == ["give-back"] and len(sys.argv) > 2:
        sys.exit(_give_back_main(sys.argv[2:]))
    print("usage: python -m uvdma.pci bind-nvme | give-back BDF", file=sys.stderr)
    sys.exit(2)
