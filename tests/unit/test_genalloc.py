"""genalloc: the kernel-doc behaviours of lib/genalloc.c, exact values, bad frees, threads."""

from __future__ import annotations

import ctypes
import itertools
import mmap
import threading
import warnings
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import kernel_genalloc as ref
from uvdma.errors import (
    FreeCrossesChunkError,
    FreeNotAllocatedError,
    FreeNotInPoolError,
    GenPoolError,
    PoolBusyError,
)
from uvdma.genalloc import (
    Bitmap,
    GenPool,
    GenPoolAlgo,
    GenPoolChunk,
    GenPoolDataAlign,
    GenPoolDataFixed,
    GenPoolDma,
    best_fit,
    first_fit,
    first_fit_align,
    first_fit_order_align,
    fixed_alloc,
)

BASE = 0x1000_0000
PHYS = 0x8000_0000
KiB = 1024
MiB = 1024 * KiB


def snapshot(pool: GenPool) -> list[tuple[int, int, bytes, int]]:
    """Everything observable about a pool's state, for 'nothing changed' checks."""
    out: list[tuple[int, int, bytes, int]] = []
    pool.for_each_chunk(lambda _p, c: out.append((c.start_addr, c.avail, bytes(c.map.bits), 0)))
    return out


def make_pool(order: int = 12, size: int = 1 * MiB) -> GenPool:
    pool = GenPool(order)
    pool.add_virt(BASE, PHYS, size)
    return pool


# -- the basics the kernel-doc promises --------------------------------------------


def test_alloc_rounds_up_to_granules_and_accounts_avail() -> None:
    pool = make_pool()
    assert pool.size() == 1 * MiB
    assert pool.avail() == 1 * MiB
    a = pool.alloc(5000)  # two 4 KiB granules
    assert a == BASE
    assert pool.avail() == 1 * MiB - 8 * KiB
    b = pool.alloc(1)
    assert b == BASE + 8 * KiB
    pool.free(a, 5000)
    assert pool.avail() == 1 * MiB - 4 * KiB
    # First fit reuses the freed hole.
    assert pool.alloc(8 * KiB) == BASE


def test_alloc_returns_zero_for_size_zero_and_on_failure() -> None:
    pool = make_pool(size=64 * KiB)
    assert pool.alloc(0) == 0
    assert pool.alloc(64 * KiB + 1) == 0
    assert pool.alloc(64 * KiB) == BASE
    assert pool.alloc(1) == 0
    assert pool.avail() == 0


def test_negative_sizes_are_refused() -> None:
    pool = make_pool()
    with pytest.raises(ValueError, match="negative"):
        pool.alloc(-1)
    with pytest.raises(ValueError, match="negative"):
        pool.free(BASE, -1)


def test_newest_chunk_is_searched_first() -> None:
    # list_add_rcu adds at the head of pool->chunks.
    pool = GenPool(12)
    pool.add_virt(0x10000, 0x90000, 16 * KiB)
    pool.add_virt(0x40000, 0xA0000, 16 * KiB)
    assert pool.alloc(4 * KiB) == 0x40000
    chunks: list[int] = []
    pool.for_each_chunk(lambda _p, c: chunks.append(c.start_addr))
    assert chunks == [0x40000, 0x10000]


def test_avail_check_uses_the_unrounded_size() -> None:
    # A 6 KiB chunk at 4 KiB granules has one granule and avail 6 KiB:
    # alloc(5000) passes the avail check but needs two granules, so it fails there.
    pool = GenPool(12)
    pool.add(0x10000, 6 * KiB)
    assert pool.avail() == 6 * KiB
    assert pool.alloc(5000) == 0
    assert pool.alloc(4 * KiB) == 0x10000
    assert pool.avail() == 2 * KiB  # the sub-granule tail stays counted, as in the kernel


def test_virt_to_phys_and_has_addr() -> None:
    pool = make_pool()
    assert pool.virt_to_phys(BASE + 0x1234) == PHYS + 0x1234
    assert pool.virt_to_phys(BASE + 1 * MiB) == -1
    assert pool.virt_to_phys(BASE - 1) == -1
    assert pool.has_addr(BASE, 1 * MiB)
    assert not pool.has_addr(BASE, 1 * MiB + 1)
    assert not pool.has_addr(BASE - 1, 2)
    nophys = GenPool(12)
    nophys.add(0x20000, 8 * KiB)
    assert nophys.virt_to_phys(0x20000) == -1


def test_dma_alloc_returns_vaddr_and_dma() -> None:
    pool = make_pool()
    pool.alloc(4 * KiB)
    assert pool.dma_alloc(4 * KiB) == (BASE + 4 * KiB, PHYS + 4 * KiB)
    assert pool.dma_alloc(2 * MiB) is None
    # Aligned to 64 KiB: the first aligned free area.
    assert pool.dma_alloc_align(4 * KiB, 64 * KiB) == (BASE + 64 * KiB, PHYS + 64 * KiB)


def test_owner_comes_back_from_alloc_and_free() -> None:
    pool = GenPool(12)
    pool.add_owner(0x10000, 0x90000, 8 * KiB, owner="first")
    pool.add_owner(0x40000, 0xA0000, 8 * KiB, owner="second")
    assert pool.alloc_owner(4 * KiB) == (0x40000, "second")
    assert pool.alloc_owner(8 * KiB) == (0x10000, "first")
    assert pool.alloc_owner(8 * KiB) == (0, None)
    assert pool.free_owner(0x10000, 8 * KiB) == "first"
    assert pool.alloc_algo_owner(4 * KiB, best_fit) == (0x41000, "second")


def test_set_algo_and_none_restores_first_fit() -> None:
    pool = make_pool(size=64 * KiB)
    pool.set_algo(best_fit)
    assert pool.algo is best_fit
    pool.set_algo(None)
    assert pool.algo is first_fit


# -- the five algorithms, exact addresses ---------------------------------------------


def carve(pool: GenPool, pattern: str) -> None:
    """Allocate granule i of the (single, order-12) chunk where pattern[i] == '#'."""
    for i, ch in enumerate(pattern):
        if ch == "#":
            assert pool.alloc_algo(4 * KiB, fixed_alloc, GenPoolDataFixed(i * 4 * KiB))


def test_first_fit_takes_the_first_hole_that_fits() -> None:
    pool = make_pool(size=16 * 4 * KiB)
    carve(pool, "#.##..#...#.....")
    assert pool.alloc(2 * 4 * KiB) == BASE + 4 * 4 * KiB
    assert pool.alloc(3 * 4 * KiB) == BASE + 7 * 4 * KiB


def test_best_fit_takes_the_smallest_hole_lowest_first() -> None:
    pool = make_pool(size=16 * 4 * KiB)
    carve(pool, "#...#..#..#.....")
    # holes: [1,4) len 3, [5,7) len 2, [8,10) len 2, [11,16) len 5
    assert pool.alloc_algo(2 * 4 * KiB, best_fit) == BASE + 5 * 4 * KiB
    assert pool.alloc_algo(2 * 4 * KiB, best_fit) == BASE + 8 * 4 * KiB
    assert pool.alloc_algo(4 * 4 * KiB, best_fit) == BASE + 11 * 4 * KiB


def test_best_fit_breaks_ties_to_the_lowest_address_when_no_hole_fits_exactly() -> None:
    pool = make_pool(size=16 * 4 * KiB)
    carve(pool, "#...#...#.......")
    # holes of 3, 3 and 7 granules; two granules fit exactly nowhere
    assert pool.alloc_algo(2 * 4 * KiB, best_fit) == BASE + 1 * 4 * KiB
    assert pool.alloc_algo(2 * 4 * KiB, best_fit) == BASE + 5 * 4 * KiB


def test_order_align_aligns_to_the_rounded_up_size() -> None:
    pool = make_pool(size=32 * 4 * KiB)
    carve(pool, "#")
    # three granules align to four: the first free index that is a multiple of 4
    assert pool.alloc_algo(3 * 4 * KiB, first_fit_order_align) == BASE + 4 * 4 * KiB
    assert pool.alloc_algo(4 * KiB, first_fit_order_align) == BASE + 1 * 4 * KiB


def test_first_fit_align_aligns_the_address_not_the_index() -> None:
    # The chunk starts 4 KiB past a 16 KiB boundary: align_off makes the address aligned.
    pool = GenPool(12)
    pool.add_virt(0x11000, 0x91000, 64 * KiB)
    vaddr = pool.alloc_algo(4 * KiB, first_fit_align, GenPoolDataAlign(16 * KiB))
    assert vaddr == 0x14000
    assert pool.dma_alloc_align(4 * KiB, 16 * KiB) == (0x18000, 0x98000)


def test_fixed_alloc_takes_exactly_the_offset_or_fails() -> None:
    pool = make_pool(size=16 * 4 * KiB)
    data = GenPoolDataFixed(3 * 4 * KiB)
    assert pool.alloc_algo(4 * KiB, fixed_alloc, data) == BASE + 3 * 4 * KiB
    assert pool.alloc_algo(4 * KiB, fixed_alloc, data) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pool.alloc_algo(4 * KiB, fixed_alloc, GenPoolDataFixed(100)) == 0
    assert any("not a multiple" in str(w.message) for w in caught)


def test_custom_algorithm_is_called_like_genpool_algo_t() -> None:
    seen: list[tuple[int, int, int, Any, int]] = []

    def last_fit(
        m: Bitmap, size: int, start: int, nr: int, data: Any, pool: GenPool, start_addr: int
    ) -> int:
        seen.append((size, start, nr, data, start_addr))
        for i in range(size - nr, -1, -1):
            if m.find_next_bit(i + nr, i) == i + nr:
                return i
        return size

    pool = make_pool(size=8 * 4 * KiB)
    assert pool.alloc_algo(2 * 4 * KiB, last_fit, "x") == BASE + 6 * 4 * KiB
    assert seen == [(8, 0, 2, "x", BASE)]


def test_algorithm_data_must_have_the_right_type() -> None:
    pool = make_pool()
    with pytest.raises(TypeError, match="GenPoolDataAlign"):
        pool.alloc_algo(4 * KiB, first_fit_align, None)
    with pytest.raises(TypeError, match="GenPoolDataFixed"):
        pool.alloc_algo(4 * KiB, fixed_alloc, 7)
    with pytest.raises(ValueError, match="power of two"):
        GenPoolDataAlign(3000)


@given(
    bits=st.lists(st.booleans(), min_size=1, max_size=200),
    start=st.integers(0, 210),
    nr=st.integers(1, 20),
    shift=st.integers(0, 5),
    off=st.integers(0, 31),
)
def test_find_next_zero_area_matches_lib_bitmap(
    bits: list[bool], start: int, nr: int, shift: int, off: int
) -> None:
    mask = (1 << shift) - 1
    off &= mask
    m = Bitmap(len(bits))
    for i, b in enumerate(bits):
        if b:
            m._set(i, 1)
    expected = ref.find_next_zero_area_off(bits, len(bits), start, nr, mask, off)
    got = m.find_next_zero_area(len(bits), start, nr, mask, off)
    if expected <= len(bits) - nr:
        assert got == expected
    else:
        assert got > len(bits) - nr
    assert m.find_next_zero_bit(len(bits), start) == ref.find_next_zero_bit(bits, len(bits), start)
    assert m.find_next_bit(len(bits), start) == ref.find_next_bit(bits, len(bits), start)


# -- best_fit's index of free runs, against the kernel model ------------------------


def assert_index_matches(bitmap: Bitmap) -> None:
    """If best_fit has indexed this map, the index holds exactly the map's free runs."""
    runs = bitmap._runs
    if runs is None:
        return
    want = ref.free_runs([b == 1 for b in bitmap.bits])
    assert runs.end == want
    assert runs.start == {b: a for a, b in want.items()}
    assert runs.lengths == sorted(runs.heaps)
    for a, b in want.items():  # every run in the heap of its length (dead entries may wait)
        assert a in runs.heaps[b - a]
    for heap in runs.heaps.values():
        assert all(heap[(k - 1) // 2] <= heap[k] for k in range(1, len(heap)))
    assert runs.entries == sum(len(h) for h in runs.heaps.values())
    assert runs.entries <= 2 * (len(want) + 1) + 64  # checked at each add; a take may not add


class Twin:
    """A GenPool and the kernel model, driven together; every answer compared."""

    def __init__(self, order: int = 12) -> None:
        self.pool, self.model, self.order = GenPool(order), ref.RefPool(order), order

    def add(self, virt: int, size: int, owner: object = None) -> None:
        self.pool.add_owner(virt, PHYS + virt, size, owner)
        self.model.add(virt, PHYS + virt, size, owner)

    def alloc(self, granules: int, algo: ref.Algo = "best_fit", arg: int = 0) -> int:
        size = granules << self.order
        data = {"first_fit_align": GenPoolDataAlign, "fixed": GenPoolDataFixed}.get(algo)
        want = self.model.alloc(size, algo, arg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = self.pool.alloc_algo_owner(size, ALGOS[algo], data(arg) if data else None)
        assert got == want, (algo, granules, arg)
        self.check()
        return got[0]

    def free(self, addr: int, granules: int) -> None:
        assert self.model.free(addr, granules << self.order)[0] == "ok"
        self.pool.free(addr, granules << self.order)
        self.check()

    def carve(self, base: int, pattern: str) -> None:
        """Allocate granule i of the chunk at ``base`` where pattern[i] == '#'."""
        for i, ch in enumerate(pattern):
            if ch == "#":
                self.alloc(1, "fixed", i << self.order)
                assert self.pool.virt_to_phys(base + (i << self.order)) != -1

    def check(self) -> None:
        chunks: list[GenPoolChunk] = []
        self.pool.for_each_chunk(lambda _p, c: chunks.append(c))
        assert [[b == 1 for b in c.map.bits] for c in chunks] == [c.bits for c in self.model.chunks]
        for c in chunks:
            assert_index_matches(c.map)


ALGOS = {
    "first_fit": first_fit,
    "first_fit_align": first_fit_align,
    "fixed": fixed_alloc,
    "order_align": first_fit_order_align,
    "best_fit": best_fit,
}
G = 4 * KiB


def test_best_fit_ties_go_to_the_lowest_run_as_runs_come_and_go() -> None:
    t = Twin()
    t.add(BASE, 32 * G)
    t.carve(BASE, "#..#..#...#..#...#..#...........")
    # runs of 2 at 1, 4, 11, 18; of 3 at 7, 14; of 11 at 21
    assert t.alloc(1) == BASE + 1 * G  # no run of 1: the lowest run of 2
    assert t.alloc(2) == BASE + 4 * G  # the lowest exact fit
    t.free(BASE + 4 * G, 2)  # a run of 2 comes back below 11 and 18
    assert t.alloc(2) == BASE + 4 * G
    assert t.alloc(3) == BASE + 7 * G
    assert t.alloc(3) == BASE + 14 * G
    t.free(BASE + 7 * G, 3)
    assert t.alloc(2) == BASE + 11 * G  # equal runs of 2 at 11 and 18, and 3 at 7
    assert t.alloc(2) == BASE + 18 * G
    assert t.alloc(2) == BASE + 7 * G  # only 3 and 11 left: the 3
    assert t.alloc(2) == BASE + 21 * G


def test_frees_merge_runs_left_right_and_both() -> None:
    t = Twin()
    t.add(BASE, 24 * G)
    t.carve(BASE, "..#.#..###..#####.#.....")
    # runs [0,2) [3,4) [5,7) [10,12) [17,18) [19,24)
    assert t.alloc(1) == BASE + 3 * G  # builds the index; the lowest run of 1
    t.free(BASE + 2 * G, 1)  # merges left: [0,3)
    t.free(BASE + 3 * G, 1)  # left again: [0,4)
    t.free(BASE + 4 * G, 1)  # both sides: [0,7)
    t.free(BASE + 8 * G, 1)  # neither: [8,9)
    t.free(BASE + 7 * G, 1)  # both: [0,9)
    t.free(BASE + 9 * G, 1)  # both: [0,12)
    assert t.alloc(5) == BASE + 19 * G  # the exact fit, not the lower [0,12)
    assert t.alloc(1) == BASE + 17 * G
    assert t.alloc(6) == BASE + 0 * G
    t.free(BASE + 16 * G, 1)  # neither: [16,17)
    t.free(BASE + 17 * G, 1)  # left: [16,18)
    t.free(BASE + 12 * G, 4)  # right with [16,18) and left with [6,12): [6,18)
    assert t.alloc(12) == BASE + 6 * G


def test_best_fit_takes_the_first_chunk_with_a_fit_not_the_best_chunk() -> None:
    # gen_pool_alloc_algo_owner stops at the first chunk (newest first) where the
    # algorithm finds room: best fit is per chunk.
    t = Twin()
    t.add(BASE, 16 * G, "old")
    t.carve(BASE, "#..#############")  # an exact fit for 2 in the older chunk
    t.add(BASE + 1 * MiB, 16 * G, "new")  # one run of 16 in the newer
    assert t.pool.alloc_algo_owner(2 * G, best_fit) == (BASE + 1 * MiB, "new")
    t.model.alloc(2 * G, "best_fit", 0)
    t.check()
    assert t.alloc(14) == BASE + 1 * MiB + 2 * G
    assert t.alloc(2) == BASE + 1 * G  # the newer chunk is full: the older's exact fit
    assert t.alloc(1) == 0


def test_best_fit_on_a_chunk_with_a_sub_granule_tail() -> None:
    t = Twin()
    t.add(BASE, 10 * G + 100)  # ten granules; the 100-byte tail is never a granule
    t.carve(BASE, "#.........")
    assert t.alloc(9) == BASE + 1 * G
    t.free(BASE + 1 * G, 9)
    t.free(BASE, 1)
    assert t.alloc(10) == BASE
    assert t.alloc(1) == 0


def test_the_index_is_built_on_a_fragmented_chunk_and_kept_by_every_algorithm() -> None:
    t = Twin(order=6)
    t.add(BASE + 0x40, 200 << 6)  # a chunk start that is not aligned past 64 bytes
    held: list[tuple[int, int]] = []
    for i in range(60):  # fragment it before best_fit ever runs
        n = 1 + (i * 7) % 5
        held.append((t.alloc(n, "first_fit"), n))
    for addr, n in held[1::3]:
        t.free(addr, n)
    chunks: list[GenPoolChunk] = []
    t.pool.for_each_chunk(lambda _p, c: chunks.append(c))
    assert chunks[0].map._runs is None
    t.alloc(2)  # best_fit: builds the index from the bitmap
    assert chunks[0].map._runs is not None
    t.alloc(1, "first_fit")  # the inlined one-granule path
    t.alloc(3, "order_align")  # may land inside a run: its start found by rfind
    t.alloc(2, "first_fit_align", 16 << 6)
    t.alloc(1, "fixed", 190 << 6)  # the middle of the last run
    t.alloc(4, "best_fit")
    for addr, n in held[::3]:
        t.free(addr, n)
    t.alloc(5, "best_fit")


def test_the_index_stays_small_under_churn() -> None:
    # A run of 2 at granule 1 goes and comes back 200 times while another run of 2 lives
    # on: each return pushes a heap entry, and compaction keeps the heap bounded.
    t = Twin()
    t.add(BASE, 32 * G)
    t.carve(BASE, "#..#################..##########")
    for _ in range(200):
        assert t.alloc(2) == BASE + 1 * G
        t.free(BASE + 1 * G, 2)
    chunks: list[GenPoolChunk] = []
    t.pool.for_each_chunk(lambda _p, c: chunks.append(c))
    runs = chunks[0].map._runs
    assert runs is not None
    assert runs.entries <= 2 * (len(runs.end) + 1) + 64
    assert t.alloc(3) == 0  # avail is enough, no run is: the index answers "none"


def test_best_fit_on_part_of_a_map_walks_as_the_kernel_does() -> None:
    # Called with a start past 0 or a size short of the map, best_fit cannot use the
    # chunk's index (whose runs span the whole map): it walks, and truncates runs there.
    pattern = "#..#.....#...#......#.."
    bits = [ch == "#" for ch in pattern]
    m = Bitmap(len(bits))
    for i, b in enumerate(bits):
        if b:
            m._set(i, 1)
    pool = make_pool()
    for size, start, nr in [(len(bits), 5, 3), (18, 0, 5), (12, 2, 3), (len(bits), 0, 2)]:
        want = ref.best_fit(bits, size, start, nr)
        assert best_fit(m, size, start, nr, None, pool, BASE) == want, (size, start, nr)


@given(
    order=st.integers(0, 3),
    chunks=st.lists(st.integers(1, 300), min_size=1, max_size=3),
    ops=st.lists(
        st.tuples(st.integers(0, 9), st.integers(1, 12), st.integers(0, 400)),
        min_size=1,
        max_size=120,
    ),
)
def test_best_fit_matches_the_kernel_on_random_histories(
    order: int, chunks: list[int], ops: list[tuple[int, int, int]]
) -> None:
    """Fragment with every algorithm, free at random (merging runs), best-fit often."""
    t = Twin(order)
    for i, granules in enumerate(chunks):
        t.add(BASE + i * MiB + (i << order), (granules << order) + (i % 2) * ((1 << order) // 2))
    held: list[tuple[int, int]] = []
    kinds: list[ref.Algo] = ["best_fit"] * 5
    kinds += ["first_fit", "order_align", "first_fit_align"]
    for op, n, arg in ops:
        if op >= 8 and held:
            t.free(*held.pop(arg % len(held)))
            continue
        algo = kinds[op] if op < 8 else "fixed"
        data = arg
        if algo == "first_fit_align":
            data = 1 << (arg % 6 + order)
        elif algo == "fixed":
            data = arg << order
        addr = t.alloc(n, algo, data)
        if addr:
            held.append((addr, n))


# -- bad input: a specific error, and the pool exactly as it was -------------------


@pytest.mark.parametrize(
    ("addr", "size", "error", "words"),
    [
        (BASE - 4 * KiB, 4 * KiB, FreeNotInPoolError, "in no chunk"),
        (BASE + 2 * MiB, 4 * KiB, FreeNotInPoolError, "in no chunk"),
        (BASE + 1 * MiB - 4 * KiB, 8 * KiB, FreeCrossesChunkError, "past the end"),
        (BASE + 8 * KiB, 4 * KiB, FreeNotAllocatedError, "not wholly allocated"),
        (BASE, 12 * KiB, FreeNotAllocatedError, "not wholly allocated"),
        (BASE + 4 * KiB, 8 * KiB, FreeNotAllocatedError, "not wholly allocated"),
    ],
)
def test_bad_free_raises_and_changes_nothing(
    addr: int, size: int, error: type[GenPoolError], words: str
) -> None:
    pool = make_pool()
    a = pool.alloc(8 * KiB)
    before = snapshot(pool)
    with pytest.raises(error, match=words) as info:
        pool.free(addr, size)
    assert f"{addr:#x}" in str(info.value)
    assert snapshot(pool) == before
    pool.free(a, 8 * KiB)  # the real allocation still frees
    assert pool.avail() == 1 * MiB


def test_double_free_is_caught() -> None:
    pool = make_pool()
    a = pool.alloc(4 * KiB)
    pool.free(a, 4 * KiB)
    before = snapshot(pool)
    with pytest.raises(FreeNotAllocatedError, match="double free"):
        pool.free(a, 4 * KiB)
    assert snapshot(pool) == before


def test_destroy_refuses_while_allocated_then_succeeds() -> None:
    pool = make_pool()
    a = pool.alloc(4 * KiB)
    before = snapshot(pool)
    with pytest.raises(PoolBusyError, match=f"{a:#x}"):
        pool.destroy()
    assert snapshot(pool) == before
    pool.free(a, 4 * KiB)
    pool.destroy()
    assert pool.size() == 0
    assert pool.alloc(4 * KiB) == 0
    with pytest.raises(GenPoolError, match="destroyed"):
        pool.add(BASE, 4 * KiB)


def test_overlapping_and_empty_chunks_are_refused() -> None:
    pool = make_pool()
    before = snapshot(pool)
    with pytest.raises(ValueError, match="overlaps"):
        pool.add(BASE + 1 * MiB - 1, 4 * KiB)
    with pytest.raises(ValueError, match="overlaps"):
        pool.add(BASE - 4 * KiB, 8 * KiB)
    with pytest.raises(ValueError, match="size 0"):
        pool.add(0x100, 0)
    assert snapshot(pool) == before
    pool.add(BASE + 1 * MiB, 4 * KiB)  # adjacent is fine
    with pytest.raises(ValueError, match="min_alloc_order"):
        GenPool(64)


# -- the edges of the address space, against the kernel model ------------------------

TOP = 1 << 64


def test_a_chunk_at_address_0_gives_its_owner_as_the_kernel_does() -> None:
    # gen_pool_alloc_algo_owner sets *owner = chunk->owner on success, whatever the address;
    # an allocation at 0 returns 0, and only the owner tells it from a failure.
    pool, model = GenPool(12), ref.RefPool(12)
    for virt, owner in ((0x10_0000, "high"), (0, "zero")):
        pool.add_owner(virt, PHYS + virt, 8 * KiB, owner)
        model.add(virt, PHYS + virt, 8 * KiB, owner)
    assert pool.alloc_owner(4 * KiB) == model.alloc(4 * KiB, "first_fit", 0) == (0, "zero")
    want = model.alloc(4 * KiB, "best_fit", 0)
    assert pool.alloc_algo_owner(4 * KiB, best_fit) == want == (4 * KiB, "zero")
    assert pool.free_owner(0, 4 * KiB) == model.free(0, 4 * KiB)[1] == "zero"
    assert pool.alloc_owner(16 * KiB) == model.alloc(16 * KiB, "first_fit", 0) == (0, None)
    assert pool.alloc(4 * KiB) == 0  # at 0 again: alloc() alone cannot tell, as in the kernel
    assert pool.free_owner(0, 4 * KiB) == "zero"
    assert pool.free_owner(4 * KiB, 4 * KiB) == "zero"
    assert pool.avail() == pool.size()


def test_dma_alloc_at_address_0_returns_the_region() -> None:
    # The kernel's gen_pool_dma_alloc_algo returns NULL for vaddr 0 and keeps the memory
    # allocated; uvdma returns it (docs/genalloc.md, differences).
    pool = GenPool(12)
    pool.add_virt(0, PHYS, 8 * KiB)
    assert pool.dma_alloc(4 * KiB) == (0, PHYS)
    assert pool.dma_alloc(4 * KiB) == (4 * KiB, PHYS + 4 * KiB)
    assert pool.dma_alloc(4 * KiB) is None
    nophys = GenPool(12)
    nophys.add(0, 4 * KiB)
    assert nophys.dma_alloc(4 * KiB) == (0, -1)
    assert nophys.dma_alloc(4 * KiB) is None


def test_a_chunk_ending_at_2_64_works_to_its_last_byte() -> None:
    pool, model = GenPool(12), ref.RefPool(12)
    pool.add_owner(TOP - 16 * KiB, TOP - 32 * KiB, 16 * KiB, "top")
    model.add(TOP - 16 * KiB, TOP - 32 * KiB, 16 * KiB, "top")
    want = [model.alloc(4 * KiB, "fixed", 12 * KiB), model.alloc(12 * KiB, "first_fit", 0)]
    assert want == [(TOP - 4 * KiB, "top"), (TOP - 16 * KiB, "top")]
    assert pool.alloc_algo_owner(4 * KiB, fixed_alloc, GenPoolDataFixed(12 * KiB)) == want[0]
    assert pool.alloc_owner(12 * KiB) == want[1]
    assert pool.virt_to_phys(TOP - 1) == model.virt_to_phys(TOP - 1) == TOP - 16 * KiB - 1
    assert pool.has_addr(TOP - 4 * KiB, 4 * KiB) == model.has_addr(TOP - 4 * KiB, 4 * KiB)
    assert pool.has_addr(TOP - 4 * KiB, 4 * KiB)
    assert pool.free_owner(TOP - 4 * KiB, 4 * KiB) == "top"
    pool.add_virt(0x10000, TOP - 4 * KiB, 4 * KiB)  # a physical range ending at 2**64 - 1
    assert pool.virt_to_phys(0x10FFF) == TOP - 1


@pytest.mark.parametrize(
    ("virt", "phys", "size", "words"),
    [
        (TOP - 4 * KiB, PHYS, 8 * KiB, "passes 2\\*\\*64"),  # end_addr wraps to 0xfff
        (TOP - 1, PHYS, 2, "passes 2\\*\\*64"),
        (TOP, PHYS, 4 * KiB, "not a 64-bit address"),
        (-4 * KiB, PHYS, 4 * KiB, "not a 64-bit address"),
        (BASE, TOP - 4 * KiB, 8 * KiB, "physical range"),  # virt_to_phys would wrap
        (BASE, TOP, 4 * KiB, "physical range"),
        (BASE, -2, 4 * KiB, "physical range"),
        (BASE, PHYS, TOP, "size"),  # not a size_t
        (BASE, PHYS, 0, "size 0"),  # the kernel takes a chunk that never allocates
        (0, PHYS, 0, "size 0"),  # ... whose end_addr wraps to 2**64 - 1: every address
    ],
)
def test_chunks_the_kernel_would_wrap_are_refused(
    virt: int, phys: int, size: int, words: str
) -> None:
    model = ref.RefPool(12)
    if 0 <= virt < TOP and -1 <= phys < TOP and 0 <= size < TOP:
        model.add(virt, phys, size, None)  # the kernel's own sums wrap:
        c = model.chunks[0]
        assert c.end != virt + size - 1 or model.virt_to_phys(c.end) != phys + size - 1
    pool = make_pool()
    before = snapshot(pool)
    with pytest.raises(ValueError, match=words):
        pool.add_virt(virt, phys, size)
    assert snapshot(pool) == before
    assert pool.size() == 1 * MiB


def test_a_free_whose_range_would_wrap_is_refused() -> None:
    pool, model = GenPool(12), ref.RefPool(12)
    for virt, phys in ((0, PHYS), (TOP - 16 * KiB, 0x9_0000)):  # the top one searched first
        pool.add_owner(virt, phys, 16 * KiB, virt)
        model.add(virt, phys, 16 * KiB, virt)
    a = pool.alloc_algo(4 * KiB, fixed_alloc, GenPoolDataFixed(12 * KiB))
    assert a == TOP - 4 * KiB
    pool.alloc(4 * KiB)  # granule 1 of the top chunk
    model.alloc(4 * KiB, "fixed", 12 * KiB)
    model.alloc(4 * KiB, "first_fit", 0)
    before = snapshot(pool)
    # addr + size - 1 wraps to 0xfff <= end_addr: the kernel's BUG_ON passes, and
    # bitmap_clear_ll goes on far past the chunk's bitmap.
    assert model.free(a, 8 * KiB) == ("wraps", None)
    with pytest.raises(FreeCrossesChunkError, match="passes 2\\*\\*64"):
        pool.free(a, 8 * KiB)
    with pytest.raises(FreeCrossesChunkError, match="passes 2\\*\\*64"):
        pool.free(TOP - 16 * KiB, TOP - 1)
    # size 0 at address 0: addr + size - 1 wraps to 2**64 - 1; the kernel BUG()s
    assert model.free(0, 0) == ("crosses", None)
    with pytest.raises(FreeCrossesChunkError, match="below 0"):
        pool.free_owner(0, 0)
    assert snapshot(pool) == before
    assert pool.free_owner(a, 4 * KiB) == TOP - 16 * KiB
    assert pool.free_owner(16 * KiB - 1, 0) == 0  # size 0 elsewhere: frees nothing, as ever


def test_has_addr_refuses_a_range_that_would_wrap() -> None:
    pool, model = GenPool(12), ref.RefPool(12)
    pool.add(0, 16 * KiB)
    model.add(0, -1, 16 * KiB, None)
    pool.add(TOP - 16 * KiB, 16 * KiB)
    model.add(TOP - 16 * KiB, -1, 16 * KiB, None)
    assert model.has_addr(TOP - 4 * KiB, 8 * KiB)  # the kernel: end wraps to 0xfff
    for start, size in (
        (TOP - 4 * KiB, 8 * KiB),
        (0, 0),
        (4 * KiB, TOP),
        (TOP, 0),
        (-1, 1),
        (0, TOP),
    ):
        with pytest.raises(ValueError, match="would wrap"):
            pool.has_addr(start, size)
    assert pool.has_addr(TOP - 4 * KiB, 4 * KiB)
    assert pool.has_addr(0, 16 * KiB) and not pool.has_addr(0, 16 * KiB + 1)
    assert pool.has_addr(5, 0)


def test_alignments_the_kernel_takes_but_uvdma_refuses() -> None:
    # genpool_data_align.align is an int: the kernel builds a mask from any value
    # (3000 at order 0: an address aligned to nothing in particular).
    model = ref.RefPool(0)
    model.add(BASE + 1, -1, 8 * KiB, None)
    got = model.alloc(1, "first_fit_align", 3000)[0]
    assert got % 3000 and got % 2048  # 0x10000008
    pool = GenPool(0)
    pool.add(BASE + 1, 8 * KiB)
    before = snapshot(pool)
    for align in (3000, 0, -4096):
        with pytest.raises(ValueError, match="power of two"):
            pool.dma_alloc_align(1, align)
    assert snapshot(pool) == before
    assert pool.dma_alloc_align(1, 1 << 40) is None  # beyond the kernel's int: no fit here
    pool.add(1 << 41, 8 * KiB)
    assert pool.dma_alloc_align(1, 1 << 40) == (1 << 41, -1)


# -- zalloc writes real memory -------------------------------------------------------


def test_dma_zalloc_zeroes_real_memory() -> None:
    with mmap.mmap(-1, 64 * KiB) as mem:
        mem.write(b"\xa5" * (64 * KiB))
        virt = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        pool = GenPool(12)
        pool.add_virt(virt, PHYS, 64 * KiB)
        got = pool.dma_zalloc(5000)
        assert got == (virt, PHYS)
        assert mem[:5000] == bytes(5000)
        assert mem[5000:5001] == b"\xa5"  # memset(vaddr, 0, size): the unrounded size
        aligned = pool.dma_zalloc_align(4 * KiB, 16 * KiB)
        # the first 16 KiB-aligned address past the 8 KiB already taken
        want = (virt + 8 * KiB + 16 * KiB - 1) & ~(16 * KiB - 1)
        assert aligned == (want, PHYS + want - virt)
        off = want - virt
        assert mem[off : off + 4 * KiB] == bytes(4 * KiB)
        assert mem[off + 4 * KiB : off + 4 * KiB + 1] == b"\xa5"
        pool.free(virt, 5000)
        pool.free(want, 4 * KiB)
        pool.destroy()


def test_dma_zalloc_refuses_unmapped_memory_and_gives_it_back() -> None:
    # A chunk whose "virtual address" is not mapped: the kernel would fault in memset.
    # Page 0 is never mapped in a Linux process (vm.mmap_min_addr).
    pool = GenPool(12)
    pool.add_virt(0x1000, PHYS, 16 * KiB)
    with pytest.raises(GenPoolError, match="not mapped in this process"):
        pool.dma_zalloc(4 * KiB)
    assert pool.avail() == 16 * KiB


# -- threads -------------------------------------------------------------------------


@pytest.mark.parametrize("algo", [first_fit, best_fit])
def test_threads_never_share_a_granule_and_accounting_is_exact(algo: GenPoolAlgo) -> None:
    pool = GenPool(6)
    pool.add(1 << 32, 4096 * 64)
    pool.add(1 << 33, 4096 * 64)
    pool.set_algo(algo)  # best_fit: the index of free runs is kept under the pool's lock
    held: list[list[tuple[int, int]]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            mine = held[k]
            for i in range(3000):
                size = 64 * (1 + (i * 7 + k) % 5)
                a = pool.alloc(size)
                if a:
                    mine.append((a, size))
                if len(mine) > 40 or (not a and mine):
                    b, s = mine.pop(i % len(mine))
                    pool.free(b, s)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    spans = sorted((a, a + ((s + 63) & ~63)) for mine in held for a, s in mine)
    for (_, end), (nxt, _) in itertools.pairwise(spans):
        assert end <= nxt, "two threads were handed the same memory"
    outstanding = sum(e - a for a, e in spans)
    assert pool.avail() == pool.size() - outstanding
    for mine in held:
        for a, s in mine:
            pool.free(a, s)
    chunks: list[GenPoolChunk] = []
    pool.for_each_chunk(lambda _p, c: chunks.append(c))
    assert any(c.map._runs is not None for c in chunks) == (algo is best_fit)
    for c in chunks:
        assert_index_matches(c.map)
    assert pool.avail() == pool.size()


def test_chunk_repr_and_size() -> None:
    pool = make_pool()
    chunks: list[GenPoolChunk] = []
    pool.for_each_chunk(lambda _p, c: chunks.append(c))
    assert chunks[0].size() == 1 * MiB
    assert "avail=1048576" in repr(chunks[0])


def test_dma_allocations_are_typed_and_still_unpack() -> None:
    """gen_pool_dma_alloc's two results travel as a GenPoolDma (vaddr, dma), not a bare
    (int, int): named fields, and it still unpacks and compares as the pair."""
    pool = GenPool(12)
    pool.add_virt(1 << 20, 1 << 32, 1 << 20)
    got = pool.dma_alloc_align(8192, 8192)
    assert isinstance(got, GenPoolDma)
    assert (got.vaddr, got.dma) == (1 << 20, 1 << 32)
    vaddr, dma = got
    assert got == (vaddr, dma)
    pool.free(vaddr, 8192)
    nophys = GenPool(12)
    nophys.add(1 << 20, 1 << 20)  # no physical address: dma is -1, as the kernel's
    assert nophys.dma_alloc(4096) == GenPoolDma(1 << 20, -1)
