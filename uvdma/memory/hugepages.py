"""Hugepage-backed memory for DMA.

Each allocation tries hugepages first, then 4 KiB pages: 1 GiB then 2 MiB pages when it
is at least 1 GiB, else 2 MiB then 1 GiB pages (a whole 1 GiB page for a small request
is still better than 4 KiB pages where only 1 GiB pages are free); for each hugepage size
``memfd_create(MFD_HUGETLB)`` first and a mounted hugetlbfs second.  Falling back to 4 KiB
pages works but costs IOMMU mappings and TLB reach, so it warns once, naming the fix.
Hugetlb memory is populated at mmap time (hugetlb reserves its pages then, so a shortage
is an error now, not a SIGBUS later).  4 KiB memory is locked so it stays resident, and
only after a check that the machine has it and the process may lock it: a request larger
than MemAvailable (less a margin) or than what RLIMIT_MEMLOCK still allows raises
:class:`MemoryShortError` (or :class:`~uvdma.errors.UvdmaOSError` ENOMEM for the limit)
before any memory is touched, never an OOM kill.  Fresh memory reads as zeros.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import warnings
from dataclasses import dataclass
from pathlib import Path

from uvdma import _sys
from uvdma._args import memparse
from uvdma.errors import HugepagesUnavailableError, MemoryShortError, UvdmaError, UvdmaOSError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_4K = 4 * KiB
PAGE_2M = 2 * MiB
PAGE_1G = 1 * GiB
HUGEPAGE_SIZES = (PAGE_1G, PAGE_2M)
_MFD_FLAG = {PAGE_2M: os.MFD_HUGE_2MB, PAGE_1G: os.MFD_HUGE_1GB}
_warned: set[str] = set()  # one-time warnings already given


PROCFS = Path("/proc")
CAP_IPC_LOCK = 14  # include/uapi/linux/capability.h


@dataclass(frozen=True)
class MemoryStatus:
    """What limits an allocation of 4 KiB pages: the machine's memory and the lock limit."""

    total: int  # MemTotal
    available: int  # MemAvailable
    locked: int  # VmLck of this process: mlock()ed memory and what VFIO type1 has pinned
    lock_limit: int  # RLIMIT_MEMLOCK (soft), -1 when unlimited
    may_lock_all: bool  # CAP_IPC_LOCK: the limit does not apply

    def lockable(self) -> int | None:
        """How many more bytes the process may lock, None when there is no limit."""
        if self.may_lock_all or self.lock_limit < 0:
            return None
        return max(0, self.lock_limit - self.locked)


def _kib_fields(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (KiB if parts[1:2] == ["kB"] else 1)
    return out


def memory_status(procfs: Path = PROCFS) -> MemoryStatus:
    """MemTotal and MemAvailable (``/proc/meminfo``), this process's VmLck and
    CAP_IPC_LOCK (``/proc/self/status``), and RLIMIT_MEMLOCK."""
    meminfo: dict[str, int] = {}
    status: dict[str, int] = {}
    cap_eff = 0
    with contextlib.suppress(OSError):
        meminfo = _kib_fields((procfs / "meminfo").read_text())
    with contextlib.suppress(OSError):
        text = (procfs / "self/status").read_text()
        status = _kib_fields(text)
        for line in text.splitlines():
            if line.startswith("CapEff:"):
                cap_eff = int(line.split()[1], 16)
    limit = _sys.kernel().memlock_limit()
    total = meminfo.get("MemTotal", 0)
    return MemoryStatus(
        total=total,
        available=meminfo.get("MemAvailable", meminfo.get("MemFree", total)),
        locked=status.get("VmLck", 0),
        lock_limit=-1 if limit == resource.RLIM_INFINITY else limit,
        may_lock_all=bool(cap_eff >> CAP_IPC_LOCK & 1),
    )


_lock_limited: dict[int, bool] = {}  # pid -> whether RLIMIT_MEMLOCK applies to it


def lock_limited(procfs: Path = PROCFS) -> bool:
    """Whether RLIMIT_MEMLOCK applies to this process: no CAP_IPC_LOCK and a finite limit.

    Worked out once per process (a process that drops CAP_IPC_LOCK later still meets the
    kernel's own check, only without the early message), so that the paths that map
    memory need not read /proc when it does not apply."""
    pid = os.getpid()
    got = _lock_limited.get(pid)
    if got is None:
        got = memory_status(procfs).lockable() is not None
        _lock_limited[pid] = got
    return got


def memlock_fix(size: int, status: MemoryStatus | None = None) -> str:
    """The message for a lock or pin of ``size`` bytes that RLIMIT_MEMLOCK refused: the
    limit, what this process has already locked, and the fix."""
    st = status or memory_status()
    limit = "unlimited" if st.lock_limit < 0 else f"{st.lock_limit} bytes"
    return (
        f"RLIMIT_MEMLOCK is {limit} and this process has already locked {st.locked} bytes "
        "(VmLck in /proc/self/status, which counts the memory VFIO has pinned for DMA), so "
        f"{size} more bytes do not fit: raise the limit (`ulimit -l unlimited`, or memlock "
        "in /etc/security/limits.conf), free DMA memory, or run as root"
    )


def reserve_margin(status: MemoryStatus) -> int:
    """Memory a 4 KiB allocation leaves the rest of the machine: 1/32 of it, at least 64 MiB."""
    return max(status.total // 32, 64 * MiB)


def check_small_pages(size: int, status: MemoryStatus | None = None) -> None:
    """Refuse, before anything is touched, ``size`` bytes of locked 4 KiB memory that the
    machine does not have or the process may not lock."""
    st = status or memory_status()
    room = st.available - reserve_margin(st)
    if size > room:
        raise MemoryShortError(
            f"{size} bytes of DMA memory: no hugepages are free for it, and in 4 KiB pages it "
            f"is more than this machine can give ({st.available} bytes available, of which "
            f"{reserve_margin(st)} are left for everything else): ask for less, or reserve "
            "hugepages (`uvdma hugepages --count N` as root)"
        )
    lockable = st.lockable()
    if lockable is not None and size > lockable:
        raise UvdmaOSError(errno.ENOMEM, f"locking DMA memory: {memlock_fix(size, st)}")


def size_name(size: int) -> str:
    """``2M``, ``1G``, ``4K``: the kernel's way of naming page sizes."""
    for unit, name in ((GiB, "G"), (MiB, "M"), (KiB, "K")):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{name}"
    return f"{size}B"


@dataclass(frozen=True)
class HugepagePool:
    """One hugepage size as /sys/kernel/mm/hugepages shows it."""

    page_size: int
    total: int
    free: int


def hugepage_pools(sysfs: Path = Path("/sys")) -> dict[int, HugepagePool]:
    """The reserved and free hugepages of each size."""
    pools: dict[int, HugepagePool] = {}
    root = sysfs / "kernel/mm/hugepages"
    if not root.is_dir():
        return pools
    for d in root.iterdir():
        if not d.name.startswith("hugepages-") or not d.name.endswith("kB"):
            continue
        size = int(d.name[len("hugepages-") : -2]) * KiB
        total = int((d / "nr_hugepages").read_text())
        free = int((d / "free_hugepages").read_text())
        pools[size] = HugepagePool(size, total, free)
    return pools


def reserve_hugepages(
    page_size: int,
    count: int,
    sysfs: Path = Path("/sys"),
    *,
    force: bool = False,
    meminfo: Path = Path("/proc/meminfo"),
) -> HugepagePool:
    """Set the number of reserved hugepages of ``page_size`` (root); returns the result.

    A count that would leave less than a quarter of the machine's memory available
    (MemAvailable less the memory the new pages take) is refused, naming the most that
    may be asked; ``force`` lowers that floor to a sixteenth, never to nothing: a kernel
    asked for nearly all its memory grinds through reclaim and compaction, and the
    machine then hangs.  A refusal changes nothing.  The kernel may reserve fewer than
    asked when memory is fragmented; the caller sees that in the result.
    """
    name = size_name(page_size)
    if count < 0:
        raise UvdmaError(f"cannot reserve {count} {name} hugepages: the count must be 0 or more")
    path = sysfs / f"kernel/mm/hugepages/hugepages-{page_size // KiB}kB/nr_hugepages"
    if not path.exists():
        raise UvdmaError(f"this kernel has no {name} hugepages")
    current = int(path.read_text())
    if count > current:
        info: dict[str, int] = {}
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                info[key] = int(rest.split()[0]) * KiB
        if "MemTotal" not in info:
            raise UvdmaError(f"cannot read MemTotal from {meminfo}: is /proc mounted?")
        total = info["MemTotal"]
        available = info.get("MemAvailable", info.get("MemFree", 0))
        floor = total // 16 if force else total // 4
        left = available - (count - current) * page_size
        if left < floor:
            most = current + max(0, (available - floor) // page_size)
            hint = "" if force else ", or pass --force to leave as little as a sixteenth"
            raise UvdmaError(
                f"reserving {count} {name} hugepages ({count - current} more) would leave "
                f"{max(left, 0) // MiB} MiB of this machine's {total // MiB} MiB available, "
                f"less than {'a sixteenth' if force else 'a quarter'}: ask for at most "
                f"{most}{hint}"
            )
    try:
        path.write_text(str(count))
    except PermissionError as e:
        raise UvdmaOSError(errno.EACCES, f"reserving hugepages: run as root ({path})") from e
    except OSError as e:
        raise UvdmaOSError(
            e.errno or errno.EINVAL, f"reserving {count} {name} hugepages through {path}"
        ) from e
    return hugepage_pools(sysfs)[page_size]


def _hugetlbfs_mount(page_size: int) -> Path | None:
    """A mounted hugetlbfs with this page size, from /proc/mounts."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    default = _default_hugepage_size()
    for line in mounts:
        fields = line.split()
        if len(fields) < 4 or fields[2] != "hugetlbfs":
            continue
        opts = dict(o.partition("=")[::2] for o in fields[3].split(","))
        size = _parse_pagesize(opts["pagesize"]) if "pagesize" in opts else default
        if size == page_size and os.access(fields[1], os.W_OK):
            return Path(fields[1])
    return None


def _parse_pagesize(text: str) -> int:
    """hugetlbfs's ``pagesize=`` mount option, which the kernel reads with memparse."""
    return memparse(text).value


def _default_hugepage_size() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) * KiB
    except OSError:
        pass
    return PAGE_2M


class HugeMemory:
    """One mapping of DMA memory: ``vaddr``, ``size``, ``page_size``; ``close()`` unmaps.

    Usable as a context manager; ``close()`` is idempotent.  Whoever maps this memory into
    an IOMMU unmaps it before closing it (uvdma's DMA domain does; this layer knows nothing
    of IOMMUs).
    """

    def __init__(self, vaddr: int, size: int, page_size: int, fd: int, source: str) -> None:
        self.vaddr = vaddr
        self.size = size
        self.page_size = page_size
        self.source = source
        self._fd = fd
        self._closed = False

    def close(self) -> None:
        """Unmap (retired in place: a numpy view kept past close reads zeros, never faults;
        see :func:`uvdma._sys.retire_mapping`) and close the memfd, which frees the pages."""
        if self._closed:
            return
        k = _sys.kernel()
        _sys.retire_mapping(self.vaddr, self.size)
        k.close(self._fd)
        self._closed = True

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def __enter__(self) -> HugeMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"HugeMemory(vaddr={self.vaddr:#x}, size={size_name(self.size)}, "
            f"pages={size_name(self.page_size)}, from {self.source})"
        )


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _try_hugetlb(size: int, page_size: int, name: str) -> HugeMemory | None:
    k = _sys.kernel()
    length = _round_up(size, page_size)
    prot = _sys.PROT_READ | _sys.PROT_WRITE
    flags = _sys.MAP_SHARED | _sys.MAP_POPULATE
    fd = -1
    source = f"memfd {size_name(page_size)}"
    try:
        fd = k.memfd_create(name, os.MFD_HUGETLB | _MFD_FLAG[page_size])
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            raise
        mount = _hugetlbfs_mount(page_size)
        if mount is None:
            return None
        path = str(mount / f"uvdma-{os.getpid()}-{id(object())}")
        fd = k.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the open fd keeps the memory; nothing is left behind
        source = f"hugetlbfs {mount}"
    try:
        k.ftruncate(fd, length)
        vaddr = k.mmap(length, prot, flags, fd, 0)
    except OSError as e:
        k.close(fd)
        if e.errno in (errno.ENOMEM, errno.EINVAL, errno.ENOSPC, errno.EFBIG, errno.EOVERFLOW):
            return None  # not enough free hugepages of this size (or an absurd size)
        raise
    return HugeMemory(vaddr, length, page_size, fd, source)


def _small_pages(size: int, name: str) -> HugeMemory:
    k = _sys.kernel()
    length = _round_up(size, PAGE_4K)
    check_small_pages(length)
    fd = k.memfd_create(name, 0)
    try:
        k.ftruncate(fd, length)
        # Not MAP_POPULATE: mlock checks RLIMIT_MEMLOCK before it faults anything in.
        vaddr = k.mmap(length, _sys.PROT_READ | _sys.PROT_WRITE, _sys.MAP_SHARED, fd, 0)
    except BaseException:
        k.close(fd)
        raise
    try:
        k.mlock(vaddr, length)
    except OSError as e:
        k.munmap(vaddr, length)
        k.close(fd)
        raise UvdmaOSError(
            e.errno or errno.ENOMEM, f"locking DMA memory: {memlock_fix(length)}"
        ) from e
    return HugeMemory(vaddr, length, PAGE_4K, fd, "memfd 4K")


def allocate(size: int, page_size: int | None = None, *, fallback: bool = True) -> HugeMemory:
    """Allocate ``size`` bytes of DMA memory, rounded up to the page size used.

    ``page_size`` None tries 1G then 2M (when ``size`` is at least 1 GiB) or 2M then 1G
    (smaller), then 4K.  A given ``page_size`` is tried first; with ``fallback`` False
    nothing smaller is tried and a shortage raises :class:`HugepagesUnavailableError`
    naming the fix.  4 KiB memory the machine does not have raises
    :class:`MemoryShortError`, and more than RLIMIT_MEMLOCK allows
    :class:`~uvdma.errors.UvdmaOSError` (ENOMEM), both before any memory is touched.
    """
    if size <= 0:
        raise ValueError(f"DMA memory size must be positive, not {size}")
    if page_size is not None and page_size not in (PAGE_4K, *HUGEPAGE_SIZES):
        raise ValueError(f"page size must be 4K, 2M or 1G, not {size_name(page_size)}")
    if page_size is None:
        order = [PAGE_1G, PAGE_2M] if size >= PAGE_1G else [PAGE_2M, PAGE_1G]
    else:
        order = [p for p in HUGEPAGE_SIZES if p <= page_size]
    name = "uvdma-dma"
    for p in order:
        mem = _try_hugetlb(size, p, name)
        if mem is not None:
            return mem
        if not fallback:
            break
    if page_size != PAGE_4K and not fallback:
        asked = size_name(page_size or PAGE_2M)
        raise HugepagesUnavailableError(
            f"no free {asked} hugepages for {size} bytes: reserve some "
            f"(`uvdma hugepages --size {asked} --count N` as root)"
        )
    if page_size != PAGE_4K and "4k" not in _warned:
        _warned.add("4k")
        warnings.warn(
            "uvdma: no free hugepages, falling back to 4 KiB pages (more IOMMU mappings, "
            "slower DMA): reserve hugepages with `uvdma hugepages --count 64` as root",
            RuntimeWarning,
            stacklevel=2,
        )
    return _small_pages(size, name)


def physical_address(vaddr: int) -> int:
    """The physical address behind ``vaddr`` from /proc/self/pagemap (for no-IOMMU use).

    Needs root (CAP_SYS_ADMIN): without it the kernel reports frame 0.
    """
    entry = _sys.kernel().pagemap_entry(vaddr)
    if not entry >> 63 & 1:
        raise UvdmaError(f"page at {vaddr:#x} is not resident: touch or lock it first")
    pfn = entry & ((1 << 55) - 1)
    if pfn == 0:
        raise UvdmaOSError(
            errno.EPERM,
            "reading physical addresses from /proc/self/pagemap needs root (CAP_SYS_ADMIN)",
        )
    return pfn * _sys.PAGE_SIZE + vaddr % _sys.PAGE_SIZE
