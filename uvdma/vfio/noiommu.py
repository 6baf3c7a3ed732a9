"""VFIO's no-IOMMU mode: a device with no IOMMU between it and memory.

The kernel offers it only when built with CONFIG_VFIO_NOIOMMU and told to
(``vfio.enable_unsafe_noiommu_mode=1``, or ``echo Y`` to that module parameter).  vfio-pci
then gives a device with no IOMMU group a fake one named ``vfio-noiommu``, reached through
``/dev/vfio/noiommu-<n>``; a container takes it with ``VFIO_SET_IOMMU(VFIO_NOIOMMU_IOMMU)``
(drivers/vfio/group.c, container.c).  That "IOMMU" has no map or unmap: the device reaches
every byte of memory by its physical address, and nothing stops a stray DMA.

So here a DMA address is the memory's physical address (``/proc/self/pagemap``, root only),
and a mapping is bookkeeping: the memory is locked (``mlock``, released again by
:meth:`~NoIommuContainer.unmap` or when a map is refused) and must be physically contiguous
over the whole mapping (a hugepage is; 4 KiB pages are not, past one page).  Hugetlb pages
are never swapped, and reclaim and compaction do not move them; only memory hot-unplug or a
CMA/gigantic-page allocation could migrate one, and :meth:`~NoIommuContainer.unmap` checks
the physical address again and logs an error if that happened.

A DMA mask or zone is honoured by the memory's own physical address: memory above it is
refused (:class:`~uvdma.errors.IovaExhaustedError`), and
:meth:`NoIommuContainer.alloc_below` finds a hugepage that lies below a limit.  The kernel
hands out hugepages from the highest memory first, so on a machine with memory above the
limit the pages reserved at boot all lie there; ``alloc_below`` then grows the 2 MiB pool
for the search (bounded, and shrunk back before it returns) so that the kernel, once the
memory above the limit is used up, takes pages from below it.

Opening a container warns (:class:`NoIommuWarning`, and the log): nothing protects the
machine from the device.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
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
PROCFS = Path("/proc")
_ALL = (1 << 64) - 1
#: Hugepages asked for beyond what the zones above a limit are estimated to hold.
GROW_MARGIN = 32
UNPROTECTED = (
    "VFIO no-IOMMU mode: no IOMMU protects memory from this device; it can read and write "
    "any physical address, and a stray DMA corrupts the machine"
)
# One pool search at a time in this process: each grows and shrinks the same pool.
_growing = threading.Lock()


def enabled(sysfs: Path = pci.SYSFS) -> bool:
    """Whether VFIO's no-IOMMU mode is on (``enable_unsafe_noiommu_mode`` is Y)."""
    return pci.noiommu_mode(sysfs)


def available(sysfs: Path = pci.SYSFS) -> bool:
    """Whether no-IOMMU mode is what this machine offers: the mode is on and no IOMMU is
    registered (``/sys/class/iommu`` is empty), so every device bound to vfio-pci gets a
    no-IOMMU group."""
    return enabled(sysfs) and not any((sysfs / "class/iommu").glob("*"))


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


@dataclass(frozen=True)
class Zone:
    """One memory zone as ``/proc/zoneinfo`` shows it (addresses and sizes in bytes)."""

    node: int
    name: str
    start: int  # physical address of its first page
    end: int  # one past its last page
    free: int
    low: int  # the low watermark: below it the allocator takes the next zone down

    @property
    def spare(self) -> int:
        """What the page allocator hands out from this zone before it falls back lower."""
        return max(0, self.free - self.low)


def zones(procfs: Path = PROCFS) -> list[Zone]:
    """The memory zones with pages in them, from ``/proc/zoneinfo`` (empty if unreadable)."""
    try:
        text = (procfs / "zoneinfo").read_text()
    except OSError:
        return []
    page = _sys.PAGE_SIZE
    out: list[Zone] = []
    cur: dict[str, int | str] = {}

    def flush() -> None:
        keys = ("node", "name", "start_pfn", "spanned", "free", "low")
        if all(k in cur for k in keys) and int(cur["spanned"]):
            start = int(cur["start_pfn"]) * page
            out.append(
                Zone(
                    node=int(cur["node"]),
                    name=str(cur["name"]),
                    start=start,
                    end=start + int(cur["spanned"]) * page,
                    free=int(cur["free"]) * page,
                    low=int(cur["low"]) * page,
                )
            )

    for line in text.splitlines():
        f = line.replace(",", " ").split()
        try:
            if len(f) >= 4 and f[0] == "Node" and f[2] == "zone":
                flush()
                cur = {"node": int(f[1]), "name": f[3]}
            elif f[:2] == ["pages", "free"] and len(f) == 3:
                cur["free"] = int(f[2])
            elif len(f) == 2 and f[0] in ("low", "spanned"):
                cur[f[0]] = int(f[1])
            elif len(f) == 2 and f[0] == "start_pfn:":
                cur["start_pfn"] = int(f[1])
        except ValueError:
            continue
    flush()
    return out


def memory_above(limit: int, procfs: Path = PROCFS) -> int | None:
    """Bytes the page allocator hands out from zones lying wholly above ``limit`` before it
    takes memory from lower zones (None when ``/proc/zoneinfo`` says nothing)."""
    found = zones(procfs)
    if not found:
        return None
    return sum(z.spare for z in found if z.start > limit)


class _PoolGrowth:
    """The 2 MiB pool grown for one search, shrunk back by :meth:`restore`."""

    def __init__(self, before: int, after: int, sysfs: Path, procfs: Path) -> None:
        self.before = before
        self.added = after - before
        self.sysfs = sysfs
        self.procfs = procfs

    def restore(self) -> None:
        try:
            hugepages.reserve_hugepages(
                hugepages.PAGE_2M, self.before, self.sysfs, meminfo=self.procfs / "meminfo"
            )
        except (UvdmaError, OSError) as e:
            log.error(
                "uvdma: no-IOMMU placement grew the 2 MiB hugepage pool to find memory below "
                "a limit and could not shrink it back to %d pages (%s): write %d to "
                "%s/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
                self.before,
                e,
                self.before,
                self.sysfs,
            )


class NoIommuContainer(Type1Container):
    """A VFIO container in no-IOMMU mode: DMA addresses are physical addresses.

    Groups are added as with type1 (:meth:`add_group`); :meth:`map` records and locks
    memory at its physical address instead of asking an IOMMU.  ``sysfs`` and ``procfs``
    are where :meth:`alloc_below` reads and grows the hugepage pool and reads the zones.
    """

    backend = "noiommu"
    iommu_type = V.IommuType.VFIO_NOIOMMU_IOMMU

    def __init__(self, sysfs: Path = pci.SYSFS, procfs: Path = PROCFS) -> None:
        super().__init__()
        self.sysfs = sysfs
        self.procfs = procfs
        # map's lock-check-record and unmap's forget-unlock, so neither unlocks the other's
        self._pinning = threading.Lock()
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

    def open_group(
        self, number: int, sysfs: Path = pci.SYSFS, devfs: Path = pci.DEVFS
    ) -> VfioGroup:
        """Open ``<devfs>/vfio/noiommu-<number>`` (not yet in this container)."""
        return VfioGroup(number, sysfs, path=str(group_path(number, devfs)))

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

        Refuses (nothing changed: the lock is released again) memory that is not
        physically contiguous (:class:`~uvdma.errors.DmaMapError`), that lies outside
        every one of ``windows`` (:class:`~uvdma.errors.IovaExhaustedError`: no IOMMU can
        move it below a mask), whose physical address is not a multiple of ``align``, or
        an ``iova`` other than the physical address.
        """
        self._check(f"DMA map of {size:#x} bytes at vaddr {vaddr:#x}")
        page = _sys.PAGE_SIZE
        if size <= 0 or size % page or vaddr % page:
            raise DmaMapError(
                f"DMA map of {size:#x} bytes at vaddr {vaddr:#x}: address and size must be "
                f"multiples of the page size {page:#x}"
            )
        with self._pinning:
            self._lock_range(vaddr, size)
            try:
                phys = self._physical(vaddr, size)
                self._check_placement(vaddr, size, phys, iova, align, windows)
                return super().map(vaddr, size, phys, read=read, write=write)
            except BaseException:
                self._unlock_range(vaddr, size)
                raise

    def unmap(self, mapping: DmaMapping) -> None:
        """Forget the mapping and release the lock :meth:`map` took on its memory (pages
        another live mapping of this domain covers stay locked).  ``mlock`` does not nest:
        a lock the caller took on the same 4 KiB pages goes too; hugetlb memory, what
        no-IOMMU DMA needs, is never swapped and the kernel does not lock it either way."""
        with self._pinning:
            super().unmap(mapping)
            self._unlock_range(mapping.vaddr, mapping.size)

    @staticmethod
    def _check_placement(
        vaddr: int,
        size: int,
        phys: int,
        iova: int | None,
        align: int | None,
        windows: Sequence[tuple[int, int]],
    ) -> None:
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

    def _lock_range(self, vaddr: int, size: int) -> None:
        try:
            _sys.kernel().mlock(vaddr, size)  # resident now and never swapped
        except OSError as e:
            raise UvdmaOSError(
                e.errno or errno.EIO,
                f"locking {size:#x} bytes at {vaddr:#x} for no-IOMMU DMA: "
                f"{hugepages.memlock_fix(size)}",
            ) from e

    def _unlock_range(self, vaddr: int, size: int) -> None:
        """munlock what of [vaddr, vaddr + size) no live mapping of this domain covers."""
        pieces = [(vaddr, vaddr + size)]
        for m in self.mappings():
            lo, hi = m.vaddr, m.vaddr + m.size
            pieces = [
                part
                for a, b in pieces
                for part in ((a, min(b, lo)), (max(a, hi), b))
                if part[0] < part[1]
            ]
        k = _sys.kernel()
        for a, b in pieces:
            try:
                k.munlock(a, b - a)
            except OSError as e:  # the memory is gone already: nothing left to unlock
                log.debug("uvdma: munlock of %#x bytes at %#x: %s", b - a, a, e)

    def _physical(self, vaddr: int, size: int) -> int:
        """The physical start of a locked range; refuse a discontiguous one."""
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
        pass  # no IOMMU to program; map locked the memory

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

    def alloc_below(
        self, size: int, limit: int, *, tries: int | None = None, grow: bool = True
    ) -> HugeMemory:
        """Hugepage memory of ``size`` bytes (at most one hugepage) whose physical range
        lies at or below ``limit``: the no-IOMMU way of honouring a DMA mask.

        Takes free hugepages one at a time (at most ``tries``) and keeps the first that
        fits, holding the others meanwhile so the kernel hands out a different one next.
        When every free hugepage is held and none fits, and ``grow`` is true, it grows the
        2 MiB pool (``nr_hugepages``, root) by what the zones above ``limit`` hold plus
        :data:`GROW_MARGIN`: the kernel takes new hugepages from the highest memory first
        and, once that is used up, from below the limit.  Never by more than leaves a
        quarter of the machine's memory available, and not at all when reaching below the
        limit would take more.  Before returning, every page held is given back and the
        pool is shrunk to its size before the search (the page kept counts as one of it).

        Raises :class:`~uvdma.errors.IovaExhaustedError` naming how many pages were seen,
        the lowest physical address among them and the fix, when no page fits.
        """
        if size <= 0:
            raise UvdmaError(f"no-IOMMU allocation of {size} bytes: the size must be positive")
        held: list[HugeMemory] = []
        lowest: int | None = None
        growth: _PoolGrowth | None = None
        why_not = ""  # why the pool was not grown, for the error
        with _growing:
            try:
                while tries is None or len(held) < tries:
                    try:
                        mem = hugepages.allocate(size, fallback=False)
                    except UvdmaError:  # no free hugepage left
                        if not grow or growth is not None:
                            break
                        growth, why_not = self._grow_pool(limit)
                        if growth is None:
                            break
                        continue
                    held.append(mem)
                    if mem.size > mem.page_size:
                        raise UvdmaError(
                            f"no-IOMMU allocation of {size:#x} bytes: larger than one "
                            f"hugepage ({mem.page_size:#x}), so not physically contiguous; "
                            "allocate pieces of at most one hugepage"
                        )
                    phys = physical_address(mem.vaddr)
                    if phys + mem.size - 1 <= limit:
                        held.pop()
                        return mem
                    lowest = phys if lowest is None else min(lowest, phys)
            finally:
                for m in reversed(held):
                    m.close()
                if growth is not None:
                    growth.restore()
        raise IovaExhaustedError(
            self._no_page_below(size, limit, len(held), lowest, growth, why_not)
        )

    def _grow_pool(self, limit: int) -> tuple[_PoolGrowth | None, str]:
        """Grow the 2 MiB pool so the next hugepage the kernel hands out lies below
        ``limit``; the growth (to undo), or None and why not.

        Two steps: first by what the zones above the limit hold (those pages come from
        there), then by :data:`GROW_MARGIN` (from below it, the memory above being used
        up).  The kernel hands out the pages added last first, so the page the search
        takes next is one of the second step's.
        """
        pools = hugepages.hugepage_pools(self.sysfs)
        if hugepages.PAGE_2M not in pools:
            return None, "this kernel has no 2 MiB hugepages to grow"
        above = memory_above(limit, self.procfs)
        if above is None:
            return None, f"{self.procfs}/zoneinfo cannot say how much memory lies above it"
        status = hugepages.memory_status(self.procfs)
        spare = max(0, (status.available - status.total // 4) // hugepages.PAGE_2M)
        first = -(-above // hugepages.PAGE_2M)
        if first + GROW_MARGIN > spare:
            return None, (
                f"reaching below it means first taking the {above >> 20} MiB free above "
                f"it, more than this machine can spare ({spare * 2} MiB in hugepages while "
                "a quarter of its memory stays available)"
            )
        before = pools[hugepages.PAGE_2M].total
        now = before
        try:
            for step in (first, GROW_MARGIN):
                if step:
                    now = hugepages.reserve_hugepages(
                        hugepages.PAGE_2M, now + step, self.sysfs, meminfo=self.procfs / "meminfo"
                    ).total
        except (UvdmaError, OSError) as e:
            growth = _PoolGrowth(before, now, self.sysfs, self.procfs)
            growth.restore()
            return None, f"growing the 2 MiB pool for the search failed: {e}"
        log.info(
            "uvdma: no-IOMMU placement below %#x: 2 MiB hugepage pool grown from %d to %d "
            "pages for the search (shrunk back afterwards)",
            limit,
            before,
            now,
        )
        return _PoolGrowth(before, now, self.sysfs, self.procfs), ""

    @staticmethod
    def _no_page_below(
        size: int,
        limit: int,
        seen: int,
        lowest: int | None,
        growth: _PoolGrowth | None,
        why_not: str,
    ) -> str:
        found = (
            "no free hugepage at all"
            if lowest is None
            else f"{seen} free hugepage(s), the lowest at physical {lowest:#x}"
        )
        if growth is not None:
            found += f", {growth.added} of them reserved for this search and given back"
        elif why_not:
            found += f"; the pool was not grown: {why_not}"
        return (
            f"no-IOMMU allocation of {size:#x} bytes below {limit:#x}: {found}; with no "
            "IOMMU the mask must be met by the memory itself, and the kernel hands out "
            "hugepages from the highest memory first: reserve hugepages early and more than "
            "the memory above the limit holds (hugepages=N on the kernel command line, or "
            "`uvdma hugepages --count N` right after boot), or allow a wider DMA mask"
        )

    def __repr__(self) -> str:
        return f"IommuDomain(noiommu, {len(self._maps)} mappings, UNPROTECTED)"
