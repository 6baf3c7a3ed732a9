"""An IOMMU domain: the IOVA space a set of devices shares, and the mappings in it.

Backends implement it: the type1 container (:mod:`uvdma.vfio.type1`) and an iommufd
IOAS (:mod:`uvdma.vfio.iommufd`).  Bookkeeping common to both lives here: overlap and
never-mapped checks before the kernel is asked (so the error names the mapping in the
way), the IOVA allocator (:class:`~uvdma.vfio.iova.IovaSpace`: an IOVA is chosen inside
windows [lo, hi] the caller names), and teardown (every mapping is unmapped before close).

A domain maps, unmaps and translates; it knows nothing of zones, GFP flags, pools or who
mapped what.  Whoever maps memory unmaps it before freeing it (in uvdma that is
:class:`uvdma.dma.DmaDomain`, which also writes the teardown order down).

A domain knows the devices opened in it: :meth:`IommuDomain.close` refuses while any of them
is still open (close the devices first; a device that made its own domain closes it).  After
close every use raises :class:`~uvdma.errors.ClosedError`.  Thread-safe: maps, unmaps and
translations from several threads; closing while another thread maps is the caller's race
(that thread gets ``ClosedError`` or its mapping is unmapped by the close).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from uvdma.errors import ClosedError, DeviceReleasedError, DmaMapError, DomainInUseError
from uvdma.memory.hugepages import HugeMemory, allocate
from uvdma.vfio.iova import ANYWHERE, IovaSpace, Window

__all__ = ["DmaMapError", "DmaMapping", "DomainUser", "IommuDomain"]


@dataclass(frozen=True)
class DmaMapping:
    """One IOMMU mapping: ``size`` bytes at ``vaddr`` appear to devices at ``iova``."""

    iova: int
    vaddr: int
    size: int
    read: bool = True
    write: bool = True

    @property
    def last(self) -> int:
        """The last IOVA of the mapping (inclusive)."""
        return self.iova + self.size - 1


class DomainUser(Protocol):
    """What a domain needs to know of a device opened in it."""

    @property
    def closed(self) -> bool: ...


class IommuDomain:
    """Base of the backends: subclasses provide the ``_kernel_*`` calls and ``info``."""

    backend = "none"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[int, DmaMapping] = {}
        self._starts: list[int] = []
        self._iova: IovaSpace | None = None
        self._last_hit: DmaMapping | None = None
        #: Unmaps so far (bumped before each one takes effect): a caller may remember that a
        #: range is mapped (:meth:`mapping_at`) for as long as this has not changed.  A map
        #: never invalidates such a memory, so maps do not count.
        self.unmaps = 0
        self.closed = False
        self._users: list[DomainUser] = []  # the devices opened in this domain
        # type1: the kernel dropped this domain's IOMMU mappings (its last group left the
        # container when the kernel took a device back); unmaps are then bookkeeping only
        self.detached = False

    def _attach_user(self, dev: DomainUser) -> None:
        with self._lock:
            self._users.append(dev)

    def _detach_user(self, dev: DomainUser) -> None:
        with self._lock:
            if dev in self._users:
                self._users.remove(dev)

    def users(self) -> list[DomainUser]:
        """The devices opened in this domain that are still open."""
        with self._lock:
            return [d for d in self._users if not d.closed]

    def _check(self, what: str) -> None:
        if self.closed:
            raise ClosedError(f"{what}: {self!r} is closed")
        if self.detached:
            raise DeviceReleasedError(
                f"{what}: {self!r} lost its IOMMU: the kernel asked for its last device back "
                "(uvdma unbind, hot-unplug) and uvdma gave it up; open the device again in a "
                "new domain"
            )

    # -- what a backend supplies ----------------------------------------------------------
    def iova_ranges(self) -> list[Window]:
        """Usable IOVA ranges, (start, last) inclusive, as the kernel reports them."""
        raise NotImplementedError

    def page_sizes(self) -> int:
        """Bitmap of the IOMMU page sizes (bit n set: 2**n bytes supported)."""
        raise NotImplementedError

    def mappings_left(self) -> int | None:
        """How many more mappings the kernel allows (type1's DMA_AVAIL), if it says."""
        return None

    def null_ioctl(self) -> None:
        """The cheapest ioctl on the domain's fd: the benchmark's anchor."""
        raise NotImplementedError

    def _kernel_map(self, m: DmaMapping) -> None:
        raise NotImplementedError

    def _kernel_unmap(self, m: DmaMapping) -> None:
        raise NotImplementedError

    def _kernel_close(self) -> None:
        raise NotImplementedError

    # -- the common part -----------------------------------------------------------------------
    @property
    def iova(self) -> IovaSpace:
        """The allocator over this domain's usable IOVA ranges."""
        if self._iova is None:
            self._iova = IovaSpace(self.iova_ranges())
        return self._iova

    def memory_for(self, size: int, windows: Sequence[Window]) -> HugeMemory:
        """Host memory of ``size`` bytes to be mapped at an IOVA inside ``windows``.  With
        an IOMMU any memory will do (the IOVA is chosen, not the memory); a backend whose
        DMA address is the memory's physical address (no-IOMMU) places the memory itself."""
        return allocate(size)

    def min_page_size(self) -> int:
        """The smallest IOMMU page size: every map must be aligned to it."""
        bits = self.page_sizes()
        return bits & -bits if bits else 4096

    def map(
        self,
        vaddr: int,
        size: int,
        iova: int | None = None,
        *,
        read: bool = True,
        write: bool = True,
        align: int | None = None,
        windows: Sequence[Window] = ANYWHERE,
    ) -> DmaMapping:
        """Map ``size`` bytes at ``vaddr`` for DMA; at ``iova``, or at one chosen inside the
        first of ``windows`` (each [lo, hi], inclusive) that has room, aligned to ``align``.

        Raises :class:`DmaMapError` for a range that overlaps an existing mapping or is
        misaligned, and the kernel's error (naming the fix) when it refuses.
        """
        self._check(f"DMA map of {size:#x} bytes at vaddr {vaddr:#x}")
        page = self.min_page_size()
        if size <= 0 or size % page or vaddr % page or (iova is not None and iova % page):
            raise DmaMapError(
                f"DMA map of {size:#x} bytes at vaddr {vaddr:#x}"
                f"{'' if iova is None else f' to IOVA {iova:#x}'}: address and size must be "
                f"multiples of the IOMMU page size {page:#x}"
            )
        if iova is None:
            chosen = self.iova.alloc(size, max(align or page, page), windows)
        else:
            with self._lock:
                clash = self._overlapping(iova, size)
            if clash is not None:
                raise DmaMapError(
                    f"DMA map to IOVA {iova:#x}+{size:#x} overlaps {clash}: unmap it first, "
                    "or let uvdma choose the IOVA"
                )
            self.iova.reserve(iova, size)
            chosen = iova
        m = DmaMapping(chosen, vaddr, size, read, write)
        try:
            self._kernel_map(m)
        except BaseException:
            self.iova.free(chosen, size)
            raise
        with self._lock:
            self._maps[chosen] = m
            bisect.insort(self._starts, chosen)
        return m

    def map_memory(
        self,
        mem: HugeMemory,
        *,
        windows: Sequence[Window] = ANYWHERE,
        read: bool = True,
        write: bool = True,
    ) -> DmaMapping:
        """Map a whole :class:`HugeMemory` at an IOVA inside ``windows``, aligned to its page
        size (so the IOMMU can use large pages).  Unmap it before closing ``mem``."""
        return self.map(
            mem.vaddr, mem.size, read=read, write=write, align=mem.page_size, windows=windows
        )

    def unmap(self, mapping: DmaMapping) -> None:
        """Undo :meth:`map`; refuses what this domain never mapped (or already unmapped)."""
        if self.closed:
            raise ClosedError(f"DMA unmap of IOVA {mapping.iova:#x}: {self!r} is closed")
        with self._lock:
            if self._maps.get(mapping.iova) != mapping:
                raise DmaMapError(
                    f"DMA unmap of IOVA {mapping.iova:#x}+{mapping.size:#x}: not mapped in "
                    "this domain (never mapped, or already unmapped)"
                )
            self.unmaps += 1
        if not self.detached:  # else the kernel has already dropped it
            self._kernel_unmap(mapping)
        with self._lock:
            del self._maps[mapping.iova]
            self._starts.remove(mapping.iova)
            if self._last_hit is mapping:
                self._last_hit = None  # it holds the caller's buffer alive
        self.iova.free(mapping.iova, mapping.size)

    def mappings(self) -> list[DmaMapping]:
        """The live mappings, by IOVA."""
        with self._lock:
            return [self._maps[i] for i in self._starts]

    def translate(self, iova: int) -> int | None:
        """The virtual address a device access to ``iova`` reaches, or None."""
        m = self._last_hit  # drivers ask about the same buffers again and again
        if m is not None and m.iova <= iova <= m.last and self._maps.get(m.iova) is m:
            return m.vaddr + (iova - m.iova)
        if self.closed:
            raise ClosedError(f"translating IOVA {iova:#x}: {self!r} is closed")
        with self._lock:
            m = self._overlapping(iova, 1)
        if m is None:
            return None
        self._last_hit = m
        return m.vaddr + (iova - m.iova)

    def mapping_at(self, iova: int) -> DmaMapping | None:
        """The live mapping that contains ``iova`` (what :meth:`translate` finds), or None.
        Read :attr:`unmaps` before calling: the answer holds while it is unchanged."""
        if self.closed:
            raise ClosedError(f"looking up IOVA {iova:#x}: {self!r} is closed")
        with self._lock:
            return self._overlapping(iova, 1)

    def _overlapping(self, iova: int, size: int) -> DmaMapping | None:
        i = bisect.bisect_right(self._starts, iova + size - 1) - 1
        if i >= 0:
            m = self._maps[self._starts[i]]
            if m.last >= iova:
                return m
        return None

    def close(self) -> None:
        """Unmap everything still mapped, then release the domain. Idempotent.

        Refuses (:class:`~uvdma.errors.DomainInUseError`, nothing changed) while devices
        opened in it are still open: a domain goes after its devices."""
        if self.closed:
            return
        users = self.users()
        if users:
            names = ", ".join(repr(d) for d in users)
            raise DomainInUseError(
                f"closing {self!r}: {names} still use it; close them first (a domain is "
                "closed after its devices). Nothing was changed"
            )
        for m in reversed(self.mappings()):
            self.unmap(m)
        self._kernel_close()
        self.closed = True

    def __repr__(self) -> str:
        return f"IommuDomain({self.backend}, {len(self._maps)} mappings)"

    def __enter__(self) -> IommuDomain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
