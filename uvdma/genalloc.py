"""gen_pool: the kernel's general-purpose special-memory allocator, in Python.

A port of ``lib/genalloc.c`` and ``include/linux/genalloc.h`` (Linux v6.x).  The
kernel's names are kept without the ``gen_pool_`` prefix: ``gen_pool_alloc`` is
:meth:`GenPool.alloc`, ``gen_pool_first_fit_order_align`` is
:func:`first_fit_order_align`.  For the same sequence of calls a :class:`GenPool`
returns the same addresses as the kernel's: chunks are searched newest first
(``list_add_rcu`` adds at the head), sizes are rounded up to granules of
``1 << min_alloc_order`` bytes, the ``avail`` check compares the *unrounded* size,
and :meth:`GenPool.alloc` returns 0 on failure and for size 0.

Where user space differs, and why:

* The kernel's bitmap has one bit per granule and is scanned word by word.  Here a
  chunk's map is a :class:`Bitmap` holding one byte per granule, so the searches
  are ``bytearray.find`` calls that run in C (``memchr`` and a substring search
  for a run of free granules), plus a "first free" hint that lets first-fit skip
  a full prefix.  The result of every search is the one the kernel's loop gives;
  ``tests/unit/test_genalloc.py`` checks that against a transliteration of
  ``lib/bitmap.c``.  The price is eight times the kernel's bitmap memory.
* :func:`best_fit` returns the kernel's answer without the kernel's walk over
  every free run: the first best fit on a chunk indexes its free runs by length
  (:class:`_FreeRuns`), and every later allocation and free of that chunk keeps
  the index, so a best fit costs the same in a chunk of 64 Ki granules or 16 Mi.
  The index costs ~120-155 bytes per free run, and each allocation and free of
  the chunk, whatever its algorithm, ~0.5 us to keep it.
* Where the kernel ``BUG()``s (freeing an address in no chunk, a range that is not
  wholly allocated, a range that runs past its chunk; destroying a pool with
  allocations outstanding) a :class:`~uvdma.errors.GenPoolError` subclass is
  raised and the pool is left exactly as it was: the check runs before any bit
  is cleared, where ``bitmap_clear_ll`` would have cleared part of the range.
* The kernel is lockless (``cmpxchg`` on bitmap words, RCU on the chunk list);
  here one lock per pool serialises allocations and frees, so a pool is safe to
  share between threads and the kernel's retry path never runs.
* Chunks whose virtual ranges overlap are refused when added (the kernel accepts
  them and then answers by list order); chunks are then found with a binary
  search rather than a list walk, with the same answer.
* Where the kernel's unsigned arithmetic would wrap, uvdma raises ``ValueError``:
  a chunk whose virtual or physical range passes 2**64, a free or a
  :meth:`GenPool.has_addr` range whose last byte (``addr + size - 1``) is not a
  64-bit address.  Inputs the kernel accepts but that can only be mistakes are
  refused too: a chunk of size 0, an alignment that is not a power of two.
  ``docs/genalloc.md`` lists every such difference.
* :meth:`GenPool.virt_to_phys` returns -1 for an address in a chunk added with
  :meth:`GenPool.add` (no physical address), where the kernel returns
  ``-1 + offset``.
* Zeroing (``dma_zalloc*``) writes through the virtual address, like the
  kernel's ``memset``; before the first write into a chunk uvdma checks once, with
  ``mincore(2)``, that the chunk's range is mapped in this process, and raises
  instead of crashing if it is not.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import threading
import warnings
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable
from dataclasses import dataclass
from heapq import heappop, heappush
from typing import Any, Final, Literal, NamedTuple, overload

from uvdma._sys import zero
from uvdma.errors import (
    FreeCrossesChunkError,
    FreeNotAllocatedError,
    FreeNotInPoolError,
    GenPoolError,
    PoolBusyError,
)

__all__ = [
    "Bitmap",
    "GenPool",
    "GenPoolAlgo",
    "GenPoolChunk",
    "GenPoolDataAlign",
    "GenPoolDataFixed",
    "GenPoolDma",
    "best_fit",
    "first_fit",
    "first_fit_align",
    "first_fit_order_align",
    "fixed_alloc",
]

_FREE = 0
_USED = 1
_U64 = 1 << 64  # unsigned long and phys_addr_t: addresses are 0..2**64-1
# What GenPool._alloc returns: the address; (address, phys), True kept for callers that
# pass it; (address, owner).  _NO_REGION is the (address, phys) failure, told apart by
# identity from a success at address 0 whose phys is -1.
_WITH_PHYS: Final = 1
_WITH_OWNER: Final = 2


class GenPoolDma(NamedTuple):
    """What ``gen_pool_dma_alloc`` gives: the address and, through its ``dma`` pointer, the
    DMA (physical) address; -1 where the chunk has none.  Unpacks as ``(vaddr, dma)``."""

    vaddr: int
    dma: int


_pair = tuple.__new__  # GenPoolDma without NamedTuple.__new__'s Python-level call (~250 ns)
_NO_REGION: Final = GenPoolDma(0, -1)


class _FreeRuns:
    """An index of one bitmap's free runs by length, for :func:`best_fit`.

    A free run is a maximal stretch of free granules, ``[a, b)``.  ``end`` maps each
    run's first granule to its end and ``start`` each end back to the first granule,
    so an allocation finds the run it splits, and a free the runs it joins, in O(1).
    ``heaps[length]`` is a heap of the first granules of the runs of that length and
    ``lengths`` the sorted list of the lengths that have a heap.  Runs leave the heaps
    lazily: an entry is live while ``end`` still maps it to a run of its length; a
    query pops the dead entries it meets and drops the lengths left empty, and when
    the heaps hold more than twice as many entries as there are runs (plus a little),
    they are rebuilt from ``end``.  Keeping the index costs an allocation or a free a
    few dictionary operations and a heap push.

    The best fit for ``nr`` granules is the smallest length ``>= nr`` in ``lengths``
    (a bisection) and the lowest live entry of its heap: what the kernel's walk over
    every run returns, in amortized O(log runs) instead of O(granules).  Built from
    the bitmap on the first :func:`best_fit` of a chunk, in O(runs).
    """

    __slots__ = ("end", "entries", "heaps", "lengths", "start")

    def __init__(self, bits: bytearray) -> None:
        self.end: dict[int, int] = {}
        self.start: dict[int, int] = {}
        size = len(bits)
        a = bits.find(_FREE)
        while a >= 0:
            b = bits.find(_USED, a)
            if b < 0:
                b = size
            self.end[a] = b
            self.start[b] = a
            a = bits.find(_FREE, b) if b < size else -1
        self._rebuild()

    def _rebuild(self) -> None:
        heaps: dict[int, list[int]] = {}
        for a, b in self.end.items():  # in address order when built from the bitmap
            heap = heaps.get(b - a)
            if heap is None:
                heaps[b - a] = [a]
            else:
                heap.append(a)
        for heap in heaps.values():
            heap.sort()  # a sorted list is a heap
        self.heaps = heaps
        self.lengths = sorted(heaps)
        self.entries = len(self.end)

    def _push(self, a: int, length: int) -> None:
        """Enter the new run of ``length`` granules at ``a`` in the heap of its length."""
        heap = self.heaps.get(length)
        if heap is None:
            self.heaps[length] = [a]
            insort(self.lengths, length)
        else:
            heappush(heap, a)
        self.entries += 1
        if self.entries > 2 * len(self.end) + 64:  # mostly dead entries
            self._rebuild()

    def best(self, nr: int) -> int:
        """The first granule of the smallest run of at least ``nr``, the lowest on
        ties; -1 if no run is that long."""
        lengths = self.lengths
        end = self.end
        i = bisect_left(lengths, nr)
        while i < len(lengths):
            length = lengths[i]
            heap = self.heaps[length]
            while heap:
                a = heap[0]
                if end.get(a) == a + length:
                    return a
                heappop(heap)  # dead: its run was split or joined since
                self.entries -= 1
            del self.heaps[length]
            del lengths[i]
        return -1

    def take(self, bits: bytearray, s: int, n: int) -> None:
        """Granules ``[s, s + n)``, all free, have just been allocated: the run that
        held them keeps what lies before ``s`` and after ``s + n``."""
        end = self.end
        b = end.pop(s, None)
        if b is None:  # inside a run (aligned, fixed): its start, by a memrchr back to it
            a = bits.rfind(_USED, 0, s) + 1
            b = end[a]
            end[a] = s
            self.start[s] = a
            self._push(a, s - a)
        e = s + n
        if e < b:
            end[e] = b
            self.start[b] = e
            self._push(e, b - e)
        else:
            del self.start[b]

    def give(self, s: int, n: int) -> None:
        """Granules ``[s, s + n)``, all allocated, have just been freed: one run with
        the free runs that end at ``s`` and start at ``s + n``."""
        e = s + n
        a = self.start.pop(s, s)  # the run that ends at s, if any, starts at a
        b = self.end.pop(e, e)  # the run that starts at e, if any, ends at b
        self.end[a] = b
        self.start[b] = a
        self._push(a, b - a)


class Bitmap:
    """The allocation map of one chunk: one byte per granule, 0 free, 1 allocated.

    Allocation algorithms receive it as the kernel's receive ``unsigned long *map``,
    and search it with the ``lib/bitmap.c`` helpers below.  Algorithms must only
    read it; the pool sets and clears bits itself (through ``_set`` and ``_clear``,
    or inline on the one-granule paths), and keeps the index of free runs that
    :func:`best_fit` builds on first use up to date as it does.
    """

    __slots__ = ("_first_free", "_runs", "bits")

    def __init__(self, nbits: int) -> None:
        self.bits = bytearray(nbits)
        # Every granule below _first_free is allocated (a lower bound on the
        # first free one); searches start there.
        self._first_free = 0
        # The index of free runs by length, once best_fit has run on this map.
        self._runs: _FreeRuns | None = None

    def __len__(self) -> int:
        return len(self.bits)

    def test_bit(self, nr: int) -> bool:
        """``test_bit``: whether granule ``nr`` is allocated."""
        return self.bits[nr] == _USED

    def find_next_zero_bit(self, size: int, start: int) -> int:
        """``find_next_zero_bit``: the first free granule in [start, size), else ``size``."""
        start = max(start, self._first_free)
        if start >= size:
            return size
        i = self.bits.find(_FREE, start, size)
        return size if i < 0 else i

    def find_next_bit(self, size: int, start: int) -> int:
        """``find_next_bit``: the first allocated granule in [start, size), else ``size``."""
        if start >= size:
            return size
        i = self.bits.find(_USED, start, size)
        return size if i < 0 else i

    def find_next_zero_area(
        self, size: int, start: int, nr: int, align_mask: int = 0, align_offset: int = 0
    ) -> int:
        """``bitmap_find_next_zero_area_off`` (lib/bitmap.c).

        Returns the lowest index ``a >= start`` with ``(a + align_offset) & align_mask == 0``
        such that granules ``[a, a + nr)`` are free and ``a + nr <= size``.  When there is
        none it returns a value greater than ``size`` (the kernel returns ``index + nr`` of
        its last candidate; callers only compare the result with ``size``).

        The kernel restarts after every allocated granule it meets; here each maximal
        run of at least ``nr`` free granules is found by one C-level substring search
        and tested for an aligned fit, which gives the same index.
        """
        if nr < 1:
            raise ValueError(f"find_next_zero_area: nr must be at least 1, not {nr}")
        bits = self.bits
        start = max(start, self._first_free)
        if nr == 1 and not align_mask:
            i = bits.find(_FREE, start, size) if start < size else -1
            return size + 1 if i < 0 else i
        run = bytes(nr)
        while start < size:
            i = bits.find(run, start, size)
            if i < 0:
                break
            if not align_mask:
                return i
            a = ((i + align_offset + align_mask) & ~align_mask) - align_offset
            if a + nr > size:
                break
            j = bits.find(_USED, i + nr, a + nr)
            if j < 0:
                return a
            start = j + 1
        return size + nr

    def _set(self, start: int, nr: int) -> None:
        if nr == 1:
            self.bits[start] = _USED
        else:
            self.bits[start : start + nr] = b"\x01" * nr
        if start == self._first_free:
            self._first_free = start + nr
        if self._runs is not None:
            self._runs.take(self.bits, start, nr)

    def _clear(self, start: int, nr: int) -> None:
        if nr == 1:
            self.bits[start] = _FREE
        else:
            self.bits[start : start + nr] = bytes(nr)
        if start < self._first_free:
            self._first_free = start
        if self._runs is not None:
            self._runs.give(start, nr)

    def _free_runs(self) -> _FreeRuns:
        """The index of free runs, built on first use (O(runs)); kept by _set/_clear."""
        if self._runs is None:
            self._runs = _FreeRuns(self.bits)
        return self._runs


#: An allocation algorithm: ``algo(map, size, start, nr, data, pool, start_addr)``
#: returns the first granule of the area to allocate, or a value ``>= size`` when
#: none fits (``genpool_algo_t`` in include/linux/genalloc.h).
GenPoolAlgo = Callable[[Bitmap, int, int, int, Any, "GenPool", int], int]


@dataclass(frozen=True)
class GenPoolDataAlign:
    """``struct genpool_data_align``: the alignment, in bytes, for :func:`first_fit_align`."""

    align: int

    def __post_init__(self) -> None:
        if self.align < 1 or self.align & (self.align - 1):
            raise ValueError(f"alignment must be a power of two, not {self.align}")


@dataclass(frozen=True)
class GenPoolDataFixed:
    """``struct genpool_data_fixed``: the byte offset in a chunk for :func:`fixed_alloc`."""

    offset: int

    def __post_init__(self) -> None:
        if self.offset < 0:
            raise ValueError(f"offset must not be negative, not {self.offset}")


def first_fit(
    map: Bitmap, size: int, start: int, nr: int, data: Any, pool: GenPool, start_addr: int
) -> int:
    """``gen_pool_first_fit``: the first free area of ``nr`` granules, no alignment."""
    return map.find_next_zero_area(size, start, nr, 0)


def first_fit_align(
    map: Bitmap, size: int, start: int, nr: int, data: Any, pool: GenPool, start_addr: int
) -> int:
    """``gen_pool_first_fit_align``: the first free area aligned to ``data.align`` bytes.

    The alignment is of the address, not of the granule index: a chunk whose start
    is not aligned gets ``align_offset`` as in the kernel.
    """
    if not isinstance(data, GenPoolDataAlign):
        raise TypeError("first_fit_align needs a GenPoolDataAlign as its data")
    order = pool.min_alloc_order
    align_mask = ((data.align + (1 << order) - 1) >> order) - 1
    align_off = (start_addr & (data.align - 1)) >> order
    return map.find_next_zero_area(size, start, nr, align_mask, align_off)


def fixed_alloc(
    map: Bitmap, size: int, start: int, nr: int, data: Any, pool: GenPool, start_addr: int
) -> int:
    """``gen_pool_fixed_alloc``: the area at exactly ``data.offset`` bytes into the chunk.

    An offset that is not a multiple of the granule fails the allocation with a
    warning, as the kernel's ``WARN_ON`` does.
    """
    if not isinstance(data, GenPoolDataFixed):
        raise TypeError("fixed_alloc needs a GenPoolDataFixed as its data")
    order = pool.min_alloc_order
    offset_bit = data.offset >> order
    if data.offset & ((1 << order) - 1):
        warnings.warn(
            f"fixed_alloc: offset {data.offset:#x} is not a multiple of the "
            f"{1 << order}-byte granule",
            RuntimeWarning,
            stacklevel=2,
        )
        return size
    start_bit = map.find_next_zero_area(size, start + offset_bit, nr, 0)
    return start_bit if start_bit == offset_bit else size


def first_fit_order_align(
    map: Bitmap, size: int, start: int, nr: int, data: Any, pool: GenPool, start_addr: int
) -> int:
    """``gen_pool_first_fit_order_align``: the first free area aligned to its own size.

    The alignment is ``roundup_pow_of_two(nr)`` granules, counted from the chunk start.
    """
    align_mask = (1 << (nr - 1).bit_length()) - 1
    return map.find_next_zero_area(size, start, nr, align_mask)


def best_fit(
    map: Bitmap, size: int, start: int, nr: int, data: Any, pool: GenPool, start_addr: int
) -> int:
    """``gen_pool_best_fit``: the smallest free run that holds ``nr`` granules.

    Ties go to the lowest address, as the kernel's walk gives them (it keeps the
    first run of the smallest length it meets and stops at an exact fit).  The
    pool's call (the whole chunk, from granule 0) is answered from the chunk's index
    of free runs by length (:class:`_FreeRuns`) in time that does not grow with the
    chunk; any other call walks the runs as the kernel does.
    """
    if start == 0 and size == len(map.bits) and nr > 0:
        a = map._free_runs().best(nr)
        return size if a < 0 else a
    start_bit = size
    length = size + 1
    index = map.find_next_zero_area(size, start, nr, 0)
    while index < size:
        next_bit = map.find_next_bit(size, index + nr)
        if next_bit - index < length:
            length = next_bit - index
            start_bit = index
            if length == nr:
                return start_bit
        index = map.find_next_zero_area(size, next_bit + 1, nr, 0)
    return start_bit


class GenPoolChunk:
    """``struct gen_pool_chunk``: one contiguous range of memory added to a pool.

    ``start_addr`` and ``end_addr`` are inclusive, as in the kernel; ``avail`` is the
    number of bytes not allocated (it counts a tail smaller than a granule, which can
    never be allocated, exactly as the kernel's ``atomic_long_set(&chunk->avail, size)``).
    """

    __slots__ = ("_mapped", "avail", "end_addr", "map", "nbits", "owner", "phys_addr", "start_addr")

    def __init__(self, virt: int, phys: int, size: int, nbits: int, owner: object) -> None:
        self.start_addr = virt
        self.end_addr = virt + size - 1
        self.phys_addr = phys
        self.owner = owner
        self.avail = size
        self.nbits = nbits
        self.map = Bitmap(nbits)
        self._mapped = False

    def size(self) -> int:
        """``chunk_size()``: the chunk's size in bytes."""
        return self.end_addr - self.start_addr + 1

    def __repr__(self) -> str:
        return (
            f"GenPoolChunk(start={self.start_addr:#x}, end={self.end_addr:#x}, "
            f"phys={self.phys_addr:#x}, avail={self.avail})"
        )


def _check_mapped(chunk: GenPoolChunk) -> None:
    """Raise unless the chunk's whole virtual range is mapped in this process."""
    if chunk._mapped:
        return
    page = _PAGE_SIZE
    lo = chunk.start_addr & ~(page - 1)
    length = chunk.end_addr + 1 - lo
    vec = ctypes.create_string_buffer((length + page - 1) // page)
    ctypes.set_errno(0)
    if _libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(length), vec) != 0:
        err = ctypes.get_errno()
        if err == _errno.ENOMEM:
            raise GenPoolError(
                f"gen_pool_dma_zalloc: chunk {chunk.start_addr:#x}-{chunk.end_addr:#x} is not "
                "mapped in this process, so it cannot be zeroed; add memory to the pool with "
                "the virtual address of a real mapping (mmap, a uvdma DMA region)"
            )
        raise OSError(err, f"mincore on chunk {chunk.start_addr:#x}")
    chunk._mapped = True


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.mincore.restype = ctypes.c_int
_PAGE_SIZE = 4096
try:
    import mmap as _mmap

    _PAGE_SIZE = _mmap.PAGESIZE
except ImportError:  # pragma: no cover - mmap is always there on Linux
    pass


def _check_chunk(virt: int, phys: int, size: int) -> None:
    """Refuse a chunk the kernel would take with a wrapped ``end_addr`` or phys, or size 0."""
    if not 0 < size < _U64:
        raise ValueError(
            f"gen_pool_add: chunk at {virt:#x} has size {size}; give its size in bytes, "
            "1 to 2**64-1 (a chunk of 0 bytes could never allocate)"
        )
    if not 0 <= virt < _U64:
        raise ValueError(
            f"gen_pool_add: {virt:#x} is not a 64-bit address; pass the chunk's virtual "
            "address, 0 to 2**64-1"
        )
    if virt + size > _U64:
        raise ValueError(
            f"gen_pool_add: chunk {virt:#x} of {size:#x} bytes passes 2**64 (the kernel's "
            f"end_addr would wrap to {(virt + size - 1) % _U64:#x}); pass the mapping's real "
            "address and size"
        )
    if phys != -1 and not 0 <= phys <= _U64 - size:
        raise ValueError(
            f"gen_pool_add: physical range {phys:#x} of {size:#x} bytes is not within 0 to "
            "2**64-1 (the kernel's gen_pool_virt_to_phys would wrap); pass the chunk's real "
            "physical address, or -1 for none"
        )


class GenPool:
    """``struct gen_pool``: special memory carved in granules of ``1 << min_alloc_order`` bytes.

    >>> pool = GenPool(12)               # 4 KiB granules
    >>> pool.add_virt(0x10000000, 0x80000000, 1 << 20)
    >>> pool.alloc(5000)                  # rounded up to two granules
    268435456
    >>> pool.avail()
    1040384
    >>> pool.free(0x10000000, 5000)

    All methods are safe to call from several threads.
    """

    def __init__(self, min_alloc_order: int) -> None:
        if not 0 <= min_alloc_order < 64:
            raise ValueError(f"min_alloc_order must be in 0..63, not {min_alloc_order}")
        self.min_alloc_order = min_alloc_order
        self.name: str | None = None
        self._lock = threading.Lock()
        self._chunks: list[GenPoolChunk] = []  # search order: newest first
        self._by_addr: list[GenPoolChunk] = []  # sorted by start_addr, for lookups
        self._starts: list[int] = []
        self._algo: GenPoolAlgo = first_fit
        self._data: Any = None
        self._destroyed = False
        self._avail = 0  # the sum of every chunk's avail, kept as they change

    # -- adding memory --------------------------------------------------------

    def add_owner(self, virt: int, phys: int, size: int, owner: object = None) -> None:
        """``gen_pool_add_owner``: add a chunk of ``size`` bytes at ``virt`` (physical ``phys``).

        The new chunk is searched first.  ``owner`` comes back from
        :meth:`alloc_owner` and :meth:`free_owner`.  ``phys`` is -1 for none.  A size
        that is not a multiple of the granule leaves a tail that is never allocated.

        Raises ``ValueError``, and adds nothing, for a size of 0, an address that is
        not 64-bit, a virtual or physical range that passes 2**64 (the kernel's
        ``end_addr`` would wrap), or a range that overlaps a chunk already in the pool.
        """
        if self._destroyed:
            raise GenPoolError("gen_pool_add: this pool was destroyed; create a new GenPool")
        _check_chunk(virt, phys, size)
        nbits = size >> self.min_alloc_order
        chunk = GenPoolChunk(virt, phys, size, nbits, owner)
        with self._lock:
            i = bisect_right(self._starts, virt)
            for neighbour in self._by_addr[max(i - 1, 0) : i + 1]:
                if neighbour.start_addr <= chunk.end_addr and virt <= neighbour.end_addr:
                    raise ValueError(
                        f"gen_pool_add: chunk {virt:#x}-{chunk.end_addr:#x} overlaps "
                        f"{neighbour!r}; add each range of memory once"
                    )
            self._chunks.insert(0, chunk)  # list_add_rcu: at the head
            self._by_addr.insert(i, chunk)
            self._starts.insert(i, virt)
            self._avail += size

    def add_virt(self, virt: int, phys: int, size: int) -> None:
        """``gen_pool_add_virt``: add a chunk with a known physical (DMA) address."""
        self.add_owner(virt, phys, size, None)

    def add(self, addr: int, size: int) -> None:
        """``gen_pool_add``: add a chunk with no physical address (``phys`` is -1)."""
        self.add_owner(addr, -1, size, None)

    # -- allocating -----------------------------------------------------------

    @overload
    def _alloc(
        self, size: int, algo: GenPoolAlgo, data: Any = None, want: Literal[0] = 0
    ) -> int: ...
    @overload
    def _alloc(
        self, size: int, algo: GenPoolAlgo, data: Any, want: Literal[1, True]
    ) -> GenPoolDma: ...
    @overload
    def _alloc(
        self, size: int, algo: GenPoolAlgo, data: Any, want: Literal[2]
    ) -> tuple[int, object]: ...
    def _alloc(
        self, size: int, algo: GenPoolAlgo, data: Any = None, want: int = 0
    ) -> int | GenPoolDma | tuple[int, object]:
        """``gen_pool_alloc_algo_owner``, the one allocation path every ``alloc`` method
        goes through.  ``want`` says what it returns: 0, the address (0 on failure);
        :data:`_WITH_PHYS`, (address, physical address), :data:`_NO_REGION` on failure,
        so the chunk found here spares a ``virt_to_phys``; :data:`_WITH_OWNER`,
        (address, owner), (0, None) on failure.  An allocation at address 0 (a chunk at
        0) is told from a failure by the owner, as in the kernel, or by identity with
        :data:`_NO_REGION`."""
        if size <= 0:
            if size < 0:
                raise ValueError(f"gen_pool_alloc: size must not be negative, not {size}")
            return 0 if not want else (_NO_REGION if want == _WITH_PHYS else (0, None))
        order = self.min_alloc_order
        nbits = (size + (1 << order) - 1) >> order
        nbytes = nbits << order
        # One granule by first fit (or order-align, which aligns one granule to 1: the
        # same answer) is the hot case, inlined below.
        one_first_fit = nbits == 1 and (algo is first_fit or algo is first_fit_order_align)
        lock = self._lock
        lock.acquire()  # cheaper than `with` on this path, and try/finally is free
        try:
            for chunk in self._chunks:
                if size > chunk.avail:
                    continue
                bitmap = chunk.map
                end_bit = chunk.nbits
                if one_first_fit:
                    # the first free granule, often the hint itself (0 free, 1 used)
                    bits = bitmap.bits
                    start_bit = bitmap._first_free
                    if start_bit >= end_bit:
                        continue
                    if bits[start_bit]:
                        start_bit = bits.find(0, start_bit, end_bit)
                        if start_bit < 0:
                            continue
                    bits[start_bit] = 1
                    # every granule below start_bit was allocated already
                    bitmap._first_free = start_bit + 1
                    if bitmap._runs is not None:
                        bitmap._runs.take(bits, start_bit, 1)
                else:
                    start_bit = algo(bitmap, end_bit, 0, nbits, data, self, chunk.start_addr)
                    if start_bit >= end_bit:
                        continue
                    bitmap._set(start_bit, nbits)
                chunk.avail -= nbytes
                self._avail -= nbytes
                offset = start_bit << order
                if not want:
                    return chunk.start_addr + offset
                if want == _WITH_PHYS:
                    phys = chunk.phys_addr
                    return _pair(
                        GenPoolDma,
                        (chunk.start_addr + offset, phys + offset if phys != -1 else -1),
                    )
                return chunk.start_addr + offset, chunk.owner
            return 0 if not want else (_NO_REGION if want == _WITH_PHYS else (0, None))
        finally:
            lock.release()

    #: ``gen_pool_alloc_algo(size, algo, data=None)``: allocate with a given algorithm and
    #: its data; the address, 0 on failure.  The allocation path itself, not a wrapper: a
    #: Python call level costs as much as a tenth of the whole first-fit alloc+free pair.
    alloc_algo = _alloc

    def alloc(self, size: int) -> int:
        """``gen_pool_alloc``: allocate ``size`` bytes with the pool's algorithm; 0 on failure.

        As in the kernel, an allocation at address 0 (from a chunk added at 0) also
        returns 0; :meth:`alloc_owner` tells the two apart.
        """
        return self._alloc(size, self._algo, self._data)

    def alloc_owner(self, size: int) -> tuple[int, object]:
        """``gen_pool_alloc_owner``: like :meth:`alloc`, also returning the chunk's owner
        (None on failure, and for a chunk added without one)."""
        return self._alloc(size, self._algo, self._data, _WITH_OWNER)

    def alloc_algo_owner(
        self, size: int, algo: GenPoolAlgo, data: Any = None
    ) -> tuple[int, object]:
        """``gen_pool_alloc_algo_owner``: :meth:`alloc_algo` that also returns the owner."""
        return self._alloc(size, algo, data, _WITH_OWNER)

    def dma_alloc_algo(self, size: int, algo: GenPoolAlgo, data: Any = None) -> GenPoolDma | None:
        """``gen_pool_dma_alloc_algo``: returns (vaddr, dma address) or None.

        An allocation at vaddr 0 (a chunk added at 0) is returned as (0, dma), where the
        kernel returns NULL and keeps the memory allocated.
        """
        got = self._alloc(size, algo, data, _WITH_PHYS)
        return None if got is _NO_REGION else got

    def dma_alloc(self, size: int) -> GenPoolDma | None:
        """``gen_pool_dma_alloc``: allocate with the pool's algorithm; (vaddr, dma) or None."""
        return self.dma_alloc_algo(size, self._algo, self._data)

    def dma_alloc_align(self, size: int, align: int) -> GenPoolDma | None:
        """``gen_pool_dma_alloc_align``: allocate at an address aligned to ``align`` bytes."""
        return self.dma_alloc_algo(size, first_fit_align, GenPoolDataAlign(align))

    def dma_zalloc_algo(self, size: int, algo: GenPoolAlgo, data: Any = None) -> GenPoolDma | None:
        """``gen_pool_dma_zalloc_algo``: :meth:`dma_alloc_algo`, then zero ``size`` bytes."""
        got = self.dma_alloc_algo(size, algo, data)
        if got is None:
            return None
        addr = got[0]
        chunk = self._find(addr)
        if chunk is None:  # only if the pool was destroyed under us
            raise GenPoolError(f"gen_pool_dma_zalloc: {addr:#x} left the pool while zeroing")
        try:
            _check_mapped(chunk)
        except BaseException:
            self.free(addr, size)
            raise
        zero(addr, size)
        return got

    def dma_zalloc(self, size: int) -> GenPoolDma | None:
        """``gen_pool_dma_zalloc``: :meth:`dma_alloc` of zeroed memory."""
        return self.dma_zalloc_algo(size, self._algo, self._data)

    def dma_zalloc_align(self, size: int, align: int) -> GenPoolDma | None:
        """``gen_pool_dma_zalloc_align``: :meth:`dma_alloc_align` of zeroed memory."""
        return self.dma_zalloc_algo(size, first_fit_align, GenPoolDataAlign(align))

    # -- freeing --------------------------------------------------------------

    def _find(self, addr: int) -> GenPoolChunk | None:
        i = bisect_right(self._starts, addr) - 1
        if i >= 0:
            chunk = self._by_addr[i]
            if addr <= chunk.end_addr:
                return chunk
        return None

    def free_owner(self, addr: int, size: int) -> object:
        """``gen_pool_free_owner``: give back ``size`` bytes at ``addr``; returns the
        owner of the chunk they came from (:meth:`free` is the same call).

        Raises :class:`~uvdma.errors.FreeNotInPoolError`,
        :class:`~uvdma.errors.FreeCrossesChunkError` or
        :class:`~uvdma.errors.FreeNotAllocatedError` where the kernel would ``BUG()``,
        and ``FreeCrossesChunkError`` too where its ``addr + size - 1`` would wrap
        (past 2**64; below 0 for size 0 at address 0); the pool is then unchanged:
        every check runs before a bit is cleared.
        """
        if size <= 0:
            if size < 0:
                raise ValueError(f"gen_pool_free: size must not be negative, not {size}")
            if not addr and self._find(0) is not None:
                raise FreeCrossesChunkError(
                    "gen_pool_free: 0x0 of size 0: its last byte, addr + size - 1, is below 0 "
                    "(the kernel's unsigned arithmetic wraps it to 2**64-1, past the chunk); "
                    "pass the size that was allocated"
                )
        order = self.min_alloc_order
        nbits = (size + (1 << order) - 1) >> order
        lock = self._lock
        lock.acquire()
        try:
            i = bisect_right(self._starts, addr) - 1
            chunk = self._by_addr[i] if i >= 0 else None
            if chunk is None or addr > chunk.end_addr:
                raise FreeNotInPoolError(
                    f"gen_pool_free: {addr:#x} (size {size}) is in no chunk of this pool; "
                    "free memory to the pool it was allocated from"
                )
            if addr + size - 1 > chunk.end_addr:
                raise self._crosses(addr, size, chunk)
            start_bit = (addr - chunk.start_addr) >> order
            bitmap = chunk.map
            bits = bitmap.bits
            if nbits == 1:
                if start_bit >= chunk.nbits or not bits[start_bit]:
                    raise self._not_allocated(addr, size)
                bits[start_bit] = 0  # free
                if start_bit < bitmap._first_free:
                    bitmap._first_free = start_bit
                if bitmap._runs is not None:
                    bitmap._runs.give(start_bit, 1)
            elif nbits:
                end_bit = start_bit + nbits
                if end_bit > chunk.nbits or bits.find(_FREE, start_bit, end_bit) >= 0:
                    raise self._not_allocated(addr, size)
                bitmap._clear(start_bit, nbits)
            # size 0: the kernel clears nothing
            nbytes = nbits << order
            chunk.avail += nbytes
            self._avail += nbytes
            return chunk.owner
        finally:
            lock.release()

    #: ``gen_pool_free(addr, size)``: :meth:`free_owner`, the owner ignored; the kernel's
    #: gen_pool_free is gen_pool_free_owner with a NULL owner.  The same function, not a
    #: wrapper, for the call level it saves on the alloc+free pair.
    free = free_owner

    @staticmethod
    def _crosses(addr: int, size: int, chunk: GenPoolChunk) -> FreeCrossesChunkError:
        if addr + size > _U64:
            return FreeCrossesChunkError(
                f"gen_pool_free: {addr:#x} of size {size:#x} passes 2**64 (the kernel's "
                "addr + size - 1 would wrap); pass the size that was allocated"
            )
        return FreeCrossesChunkError(
            f"gen_pool_free: {addr:#x} of size {size} runs past the end of its chunk "
            f"({chunk.start_addr:#x}-{chunk.end_addr:#x}); pass the size that was allocated"
        )

    @staticmethod
    def _not_allocated(addr: int, size: int) -> FreeNotAllocatedError:
        return FreeNotAllocatedError(
            f"gen_pool_free: {addr:#x} of size {size} is not wholly allocated "
            "(a double free, or the wrong size); free exactly what alloc returned"
        )

    # -- queries --------------------------------------------------------------

    def virt_to_phys(self, addr: int) -> int:
        """``gen_pool_virt_to_phys``: the physical address of ``addr``, or -1 if not in the pool."""
        chunk = self._find(addr)
        if chunk is None or chunk.phys_addr == -1:
            return -1
        return chunk.phys_addr + (addr - chunk.start_addr)

    def has_addr(self, start: int, size: int) -> bool:
        """``gen_pool_has_addr``: whether [start, start + size) lies inside one chunk.

        Raises ``ValueError`` where the kernel's ``start + size - 1`` would wrap (a range
        past 2**64, or size 0 at address 0) or for an argument that is not 64-bit.
        """
        if not (0 <= start < _U64 and 0 <= size < _U64 and 0 <= start + size - 1 < _U64):
            raise ValueError(
                f"gen_pool_has_addr: [{start:#x}, +{size:#x}) is not a range of 64-bit "
                "addresses (its last byte, start + size - 1, would wrap in the kernel); "
                "pass a start and a size whose last byte is 0 to 2**64-1"
            )
        chunk = self._find(start)
        return chunk is not None and start + size - 1 <= chunk.end_addr

    def avail(self) -> int:
        """``gen_pool_avail``: bytes not allocated, over all chunks."""
        return self._avail

    def size(self) -> int:
        """``gen_pool_size``: bytes managed by the pool, over all chunks."""
        return sum(chunk.size() for chunk in self._chunks)

    def for_each_chunk(self, func: Callable[[GenPool, GenPoolChunk], None]) -> None:
        """``gen_pool_for_each_chunk``: call ``func(pool, chunk)`` for each chunk, newest first."""
        for chunk in list(self._chunks):
            func(self, chunk)

    def set_algo(self, algo: GenPoolAlgo | None, data: Any = None) -> None:
        """``gen_pool_set_algo``: the algorithm :meth:`alloc` uses; None means :func:`first_fit`."""
        with self._lock:
            self._algo = algo if algo is not None else first_fit
            self._data = data

    @property
    def algo(self) -> GenPoolAlgo:
        """The algorithm :meth:`alloc` uses."""
        return self._algo

    def destroy(self) -> None:
        """``gen_pool_destroy``: drop every chunk.

        Raises :class:`~uvdma.errors.PoolBusyError`, naming the first outstanding
        allocation, when anything is still allocated; the pool is then unchanged.
        """
        with self._lock:
            for chunk in self._chunks:
                bit = chunk.map.find_next_bit(chunk.nbits, 0)
                if bit < chunk.nbits:
                    outstanding = chunk.size() - chunk.avail
                    raise PoolBusyError(
                        f"gen_pool_destroy: {outstanding} bytes are still allocated, the first at "
                        f"{chunk.start_addr + (bit << self.min_alloc_order):#x}; free them first"
                    )
            self._chunks.clear()
            self._by_addr.clear()
            self._starts.clear()
            self._avail = 0
            self._destroyed = True

    def __repr__(self) -> str:
        return (
            f"GenPool(min_alloc_order={self.min_alloc_order}, chunks={len(self._chunks)}, "
            f"size={self.size()}, avail={self.avail()})"
        )
