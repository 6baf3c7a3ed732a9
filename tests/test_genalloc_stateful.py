"""GenPool against the naive lib/genalloc.c model: same calls, same addresses, same errors."""

from __future__ import annotations

import warnings

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

from tests import kernel_genalloc as ref
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
    )
    def add_chunk(self, granules: int, tail: int, skew: int, gap: int, owner: str | None) -> None:
        g = 1 << self.order
        size = granules * g + min(tail, g - 1)
        virt = self.next_base + skew * g  # chunk starts not always aligned to big powers
        phys = 0x8000_0000 + virt * 3
        self.next_base = virt + size + gap * g + g
        self.pool.add_owner(virt, phys, size, owner)
        self.model.add(virt, phys, size, owner)

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

    @rule(allocation=allocations, delta=st.integers(-130, 130), dsize=st.integers(-70, 70))
    def free_something_odd(self, allocation: tuple[int, int], delta: int, dsize: int) -> None:
        """A double free, a wrong size, a foreign address: same verdict as the kernel."""
        addr, size = allocation
        self._free_both(max(addr + delta, 0), max(size + dsize, 0))

    def _free_both(self, addr: int, size: int) -> None:
        want, want_owner = self.model.free(addr, size)
        before = [bytes(c.map.bits) for c in self._chunks()]
        try:
            owner = self.pool.free_owner(addr, size)
            got: ref.FreeOutcome = "ok"
        except (FreeNotInPoolError, FreeCrossesChunkError, FreeNotAllocatedError) as e:
            got, owner = OUTCOME[type(e)], None
            assert [bytes(c.map.bits) for c in self._chunks()] == before
        assert (got, owner) == (want, want_owner), (hex(addr), size)

    def _chunks(self) -> list[GenPoolChunk]:
        out: list[GenPoolChunk] = []
        self.pool.for_each_chunk(lambda _p, c: out.append(c))
        return out

    @rule(probe=st.integers(0, 0x40_0000), size=st.integers(1, 5000))
    def lookups(self, probe: int, size: int) -> None:
        probe += 0x10_0000
        assert self.pool.virt_to_phys(probe) == self.model.virt_to_phys(probe)
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

    def teardown(self) -> None:
        busy = any(any(c.bits) for c in self.model.chunks)
        try:
            self.pool.destroy()
            assert not busy
        except PoolBusyError:
            assert busy


GenPoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestGenPoolAgainstKernelModel = GenPoolMachine.TestCase
