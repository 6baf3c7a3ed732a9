"""An IOMMU domain: the IOVA space a set of devices shares, and the mappings in it.

Two backends implement it: the type1 container (:mod:`uvdma.vfio.type1`) and an iommufd
IOAS (:mod:`uvdma.vfio.iommufd`).  Bookkeeping common to both lives here: overlap and
never-mapped checks before the kernel is asked (so the error names the mapping in the
way), the IOVA allocator, and teardown (every mapping is unmapped before close).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from uvdma.errors import UvdmaError
from uvdma.memory.hugepages import HugeMemory
from uvdma.memory.iova import IovaSpace, Zone


class DmaMapError(UvdmaError):
    """A DMA map or unmap was refused; the domain is unchanged."""


@dataclass(frozen=True)
class DmaMapping:
    """One IOMMU mapping: ``size`` bytes at ``vaddr`` appear to devices at ``iova``."""

    iova: int
    vaddr: int
    size: int
    read: bool = True
    write: bool = True
    owner: object = field(default=None, compare=False, repr=False)

    @property
    def last(self) -> int:
        """The last IOVA of the mapping (inclusive)."""
        return self.iova + self.size - 1


class IommuDomain:
    """Base of the backends: subclasses provide the ``_kernel_*`` calls and ``info``."""

    backend = "none"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[int, DmaMapping] = {}
        self._starts: list[int] = []
        self._iova: IovaSpace | None = None
        self._close_hooks: list[Callable[[], None]] = []
        self._last_hit: DmaMapping | None = None
        self.extensions: dict[str, object] = {}  # per-domain state of higher layers (the DMA API)
        self.closed = False

    def add_close_hook(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` first when the domain closes (last added, first run)."""
        self._close_hooks.append(fn)

    # -- what a backend supplies ----------------------------------------------------------
    def iova_ranges(self) -> list[tuple[int, int]]:
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
        zone: Zone = Zone.NORMAL,
        align: int | None = None,
        limit: int = (1 << 64) - 1,
        owner: object = None,
    ) -> DmaMapping:
        """Map ``size`` bytes at ``vaddr`` for DMA; at ``iova``, or at one chosen in ``zone``.

        Raises :class:`DmaMapError` for a range that overlaps an existing mapping or is
        misaligned, and the kernel's error (naming the fix) when it refuses.
        """
        if self.closed:
            raise DmaMapError("this IOMMU domain is closed")
        page = self.min_page_size()
        if size <= 0 or size % page or vaddr % page or (iova is not None and iova % page):
            raise DmaMapError(
                f"DMA map of {size:#x} bytes at vaddr {vaddr:#x}"
                f"{'' if iova is None else f' to IOVA {iova:#x}'}: address and size must be "
                f"multiples of the IOMMU page size {page:#x}"
            )
        if iova is None:
            chosen = self.iova.alloc(size, max(align or page, page), zone, limit)
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
        m = DmaMapping(chosen, vaddr, size, read, write, owner)
        try:
            self._kernel_map(m)
        except BaseException:
            self.iova.free(chosen, size)
            raise
        with self._lock:
            self._maps[chosen] = m
            bisect.insort(self._starts, chosen)
        if isinstance(owner, HugeMemory):
            owner.mapped_by.add(m)  # the memory now refuses to be freed until unmapped
        return m

    def map_memory(
        self, mem: HugeMemory, *, zone: Zone = Zone.NORMAL, read: bool = True, write: bool = True
    ) -> DmaMapping:
        """Map a whole :class:`HugeMemory` at an IOVA in ``zone``, aligned to its page size
        (so the IOMMU can use large pages); ``mem`` cannot be closed until it is unmapped."""
        return self.map(
            mem.vaddr, mem.size, read=read, write=write, zone=zone, align=mem.page_size, owner=mem
        )

    def unmap(self, mapping: DmaMapping) -> None:
        """Undo :meth:`map`; refuses what this domain never mapped (or already unmapped)."""
        with self._lock:
            if self._maps.get(mapping.iova) != mapping:
                raise DmaMapError(
                    f"DMA unmap of IOVA {mapping.iova:#x}+{mapping.size:#x}: not mapped in "
                    "this domain (never mapped, or already unmapped)"
                )
        self._kernel_unmap(mapping)
        with self._lock:
            del self._maps[mapping.iova]
            self._starts.remove(mapping.iova)
            if self._last_hit is mapping:
                self._last_hit = None  # it holds the caller's buffer alive
        self.iova.free(mapping.iova, mapping.size)
        if isinstance(mapping.owner, HugeMemory):
            mapping.owner.mapped_by.discard(mapping)

    def mappings(self) -> list[DmaMapping]:
        """The live mappings, by IOVA."""
        with self._lock:
            return [self._maps[i] for i in self._starts]

    def translate(self, iova: int) -> int | None:
        """The virtual address a device access to ``iova`` reaches, or None."""
        m = self._last_hit  # drivers ask about the same buffers again and again
        if m is not None and m.iova <= iova <= m.last and self._maps.get(m.iova) is m:
            return m.vaddr + (iova - m.iova)
        with self._lock:
            m = self._overlapping(iova, 1)
        if m is None:
            return None
        self._last_hit = m
        return m.vaddr + (iova - m.iova)

    def _overlapping(self, iova: int, size: int) -> DmaMapping | None:
        i = bisect.bisect_right(self._starts, iova + size - 1) - 1
        if i >= 0:
            m = self._maps[self._starts[i]]
            if m.last >= iova:
                return m
        return None

    def close(self) -> None:
        """Unmap everything still mapped, then release the domain. Idempotent."""
        if self.closed:
            return
        try:
            while self._close_hooks:
                self._close_hooks.pop()()
        finally:
            for m in reversed(self.mappings()):
                self.unmap(m)
            self._kernel_close()
            self.closed = True

    def __enter__(self) -> IommuDomain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
