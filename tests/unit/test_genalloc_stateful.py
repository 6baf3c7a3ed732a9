"""GenPool against the naive lib/genalloc.c model: same calls, same addresses, same errors.

Chunks are added low in the address space, at address 0 and at the very top (ending at
2**64 - 1); chunks whose virtual or physical range would pass 2**64 are tried too.  Where
the kernel's arithmetic would wrap, GenPool must raise ValueError and change nothing;
every other difference from the model is one of docs/genalloc.md's table, spelt out here.
"""

from __future__ import annotations

import warnings

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.support import kernel_genalloc as ref
from tests.unit.test_genalloc import assert_index_matches
from uvdma.errors import (
    FreeCrossesChunkError,
    FreeNotAllocatedError,
    FreeNotInPoolError,
    PoolBusyError,
)
from uvdma.genalloc import (
    GenPool,
    GenPoolAlgo,
    GenPoolChunk,
    GenPoolDataAlign,
    GenPoolDataFixed,
    best_fit,
    first_fit,
    first_fit_align,
    first_fit_order_align,
    fixed_alloc,
)

ALGOS: dict[ref.Algo, GenPoolAlgo] = {
    "first_fit": first_fit,
    "first_fit_align": first_fit_align,
    "fixed": fixed_alloc,
    "order_align": first_fit_order_align,
    "best_fit": best_fit,
}

OUTCOME: dict[type[Exception], ref.FreeOutcome] = {
    FreeNotInPoolError: "not_in_pool",
    FreeCrossesChunkError: "crosses",
    FreeNotAllocatedError: "not_allocated",
}


class GenPoolMachine(RuleBasedStateMachine):
    allocations = Bundle("allocations")

    def __init__(self) -> None:
        super().__init__()
        self.pool = GenPool(0)
        self.model = ref.RefPool(0)
        self.next_base = 0x10_0000
        self.order = 0
        self.edges_used: set[str] = set()
        self.no_phys: set[int] = set()  # chunks added with phys -1

    @initialize(order=st.integers(0, 6))
    def create(self, order: int) -> None:
        self.order = order
        self.pool = GenPool(order)
        self.model = ref.RefPool(order)

    @precondition(lambda self: len(self.model.chunks) < 4)
    @rule(
        granules=st.integers(1, 48),
        tail=st.integers(0, 3),
        skew=st.integers(0, 7),
        gap=st.integers(0, 3),
        owner=st.sampled_from(["a", "b", None]),
        with_phys=st.booleans(),
    )
    def add_chunk(
        self, granules: int, tail: int, skew: int, gap: int, owner: str | None, with_phys: bool
    ) -> None:
        g = 1 << self.order
        size = granules * g + min(tail, g - 1)
        virt = self.next_base + skew * g  # chunk starts not always aligned to big powers
        phys = 0x8000_0000 + virt * 3 if with_phys else -1
        if not with_phys:
            self.no_phys.add(virt)
        self.next_base = virt + size + gap * g + g
        self.pool.add_owner(virt, phys, size, owner)
        self.model.add(virt, phys, size, owner)

    @precondition(lambda self: len(self.model.chunks) < 4)
    @rule(
        edge=st.sampled_from(["zero", "top", "phys_top", "no_phys_at_zero"]),
        granules=st.integers(1, 16),
        tail=st.integers(0, 3),
        owner=st.sampled_from(["z", None]),
    )
    def add_chunk_at_an_edge(self, edge: str, granules: int, tail: int, owner: str | None) -> None:
        """A chunk at virtual 0, one ending at 2**64 - 1, one whose phys ends there."""
        g = 1 << self.order
        size = granules * g + min(tail, g - 1)
        at_zero = edge in ("zero", "no_phys_at_zero")
        if (at_zero and self.edges_used & {"zero", "no_phys_at_zero"}) or edge in self.edges_used:
            return
        self.edges_used.add(edge)
        virt = {"top": ref.U64 - size, "phys_top": self.next_base}.get(edge, 0)
        phys = {"phys_top": ref.U64 - size, "no_phys_at_zero": -1}.get(edge, 0x4000_0000)
        if edge == "phys_top":
            self.next_base = virt + size + g
        if phys == -1:
            self.no_phys.add(virt)
        self.pool.add_owner(virt, phys, size, owner)
        self.model.add(virt, phys, size, owner)

    @rule(
        over=st.integers(1, 1 << 20) | st.just(ref.U64),
        granules=st.integers(1, 16),
        physical=st.booleans(),
    )
    def add_chunk_past_2_64(self, over: int, granules: int, physical: bool) -> None:
        """The kernel would take the chunk and wrap its end; GenPool refuses it."""
        size = granules << self.order
        virt, phys = ref.U64 - size + over, 0x4000_0000
        if physical:
            virt, phys = 0xF000_0000, phys + ref.U64 - 0x4000_0000 - size + over
        before = self._state()
        with pytest.raises(ValueError, match="2\\*\\*64"):
            self.pool.add_owner(virt, phys, size, "w")
        assert self._state() == before

    @rule(
        target=allocations,
        size=st.integers(0, 20).flatmap(lambda n: st.integers(max(n - 1, 0) * 64 + 1, n * 64 + 1)),
        algo=st.sampled_from(sorted(ALGOS)),
        align_shift=st.integers(0, 9),
        fixed_granule=st.integers(0, 60),
        misaligned=st.booleans(),
    )
    def alloc(
        self,
        size: int,
        algo: ref.Algo,
        align_shift: int,
        fixed_granule: int,
        misaligned: bool,
    ) -> tuple[int, int]:
        size = size >> (6 - self.order) if self.order < 6 else size << (self.order - 6)
        data: object = None
        arg = 0
        if algo == "first_fit_align":
            arg = 1 << align_shift
            data = GenPoolDataAlign(arg)
        elif algo == "fixed":
            arg = fixed_granule << self.order
            if misaligned and self.order > 0:
                arg += 1
            data = GenPoolDataFixed(arg)
        want_addr, want_owner = self.model.alloc(size, algo, arg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            addr, owner = self.pool.alloc_algo_owner(size, ALGOS[algo], data)
        assert (addr, owner) == (want_addr, want_owner), (algo, size, arg)
        return (addr, size)

    @rule(allocation=consumes(allocations))
    def free(self, allocation: tuple[int, int]) -> None:
        addr, size = allocation
        self._free_both(addr, size)

    @rule(
        allocation=allocations,
        delta=st.integers(-130, 130),
        dsize=st.integers(-70, 70) | st.integers(ref.U64 - (1 << 20), ref.U64),
    )
    def free_something_odd(self, allocation: tuple[int, int], delta: int, dsize: int) -> None:
        """A double free, a wrong size, a foreign address, a range past 2**64: the kernel's
        verdict, or ValueError (FreeCrossesChunkError) where its arithmetic would wrap."""
        addr, size = allocation
        self._free_both(min(max(addr + delta, 0), ref.MASK), min(max(size + dsize, 0), ref.MASK))

    def _free_both(self, addr: int, size: int) -> None:
        want, want_owner = self.model.free(addr, size)
        if want == "wraps":  # the kernel clears bits past the chunk; GenPool refuses
            want = "crosses"
        before = self._state()
        try:
            owner = self.pool.free_owner(addr, size)
            got: ref.FreeOutcome = "ok"
        except (FreeNotInPoolError, FreeCrossesChunkError, FreeNotAllocatedError) as e:
            got, owner = OUTCOME[type(e)], None
            assert self._state() == before
        assert (got, owner) == (want, want_owner), (hex(addr), size)

    def _state(self) -> list[tuple[int, int, bytes]]:
        return [(c.start_addr, c.avail, bytes(c.map.bits)) for c in self._chunks()]

    def _chunks(self) -> list[GenPoolChunk]:
        out: list[GenPoolChunk] = []
        self.pool.for_each_chunk(lambda _p, c: out.append(c))
        return out

    @rule(
        probe=st.integers(0, 0x40_0000),
        near=st.integers(0, 3),
        delta=st.integers(-2, 2),
        size=st.integers(0, 5000) | st.integers(ref.U64 - 5000, ref.U64 + 2),
    )
    def lookups(self, probe: int, near: int, delta: int, size: int) -> None:
        if near < len(self.model.chunks):  # the edges of a chunk, where the sums wrap
            c = self.model.chunks[near]
            probe = (c.start if delta <= 0 else c.end) + delta
        else:
            probe += 0x10_0000
        probe = min(max(probe, 0), ref.MASK)
        phys = self.model.virt_to_phys(probe)
        inside = [c for c in self.model.chunks if c.start <= probe <= c.end]
        if not inside or inside[0].start in self.no_phys:
            phys = -1  # the kernel's (phys_addr_t)-1 (+ offset, for a chunk without phys)
        assert self.pool.virt_to_phys(probe) == phys
        if ref.u64(probe + size - 1) != probe + size - 1 or size > ref.MASK:
            with pytest.raises(ValueError, match="would wrap"):
                self.pool.has_addr(probe, size)
        else:
            assert self.pool.has_addr(probe, size) == self.model.has_addr(probe, size)

    @invariant()
    def same_state(self) -> None:
        assert self.pool.avail() == self.model.avail()
        assert self.pool.size() == self.model.size()
        got: list[tuple[int, list[bool]]] = []
        self.pool.for_each_chunk(
            lambda _p, c: got.append((c.start_addr, [b == 1 for b in c.map.bits]))
        )
        assert got == [(c.start, c.bits) for c in self.model.chunks]
        for c in self._chunks():
            assert_index_matches(c.map)

    def teardown(self) -> None:
        busy = any(any(c.bits) for c in self.model.chunks)
        try:
            self.pool.destroy()
            assert not busy
        except PoolBusyError:
            assert busy


GenPoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestGenPoolAgainstKernelModel = GenPoolMachine.TestCase
