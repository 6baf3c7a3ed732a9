"""``uvdma bench genalloc``: alloc+free pair latency of each gen_pool algorithm.

For each algorithm, at 64 Ki and 1 Mi granules, at 0, 50 and 90 % fill, one
granule is allocated and freed again, in batches; the figure is the time per pair.
Beside it, in the same run and with the same loop, an anchor: a pair of no-op
Python method calls taking the same arguments.  The ratio to the anchor is what
carries from machine to machine.  Anchor and case batches alternate, so drift in
the machine's speed hits both; the garbage collector is off while timing, as in
``timeit``.

The fill is deterministic (seed 2026): random allocations of 1 to 8 granules by
first fit until the pool is full, then frees of randomly chosen ones until the
fill falls to the target, so the holes are spread over the whole pool.
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from uvdma.genalloc import (
    GenPool,
    GenPoolAlgo,
    GenPoolDataAlign,
    GenPoolDataFixed,
    best_fit,
    first_fit,
    first_fit_align,
    first_fit_order_align,
    fixed_alloc,
)

ORDER = 12  # 4 KiB granules; the search cost depends on granule counts, not bytes
BASE = 1 << 40
SEED = 2026
#: The goals of issue 2, checked and printed (never asserted in a timed test).
GOAL_RATIO_FIRST_FIT = 20.0  # first_fit, 64 Ki granules, 50 % fill, vs the anchor
GOAL_SCALING = 3.0  # first_fit 1 Mi / 90 % vs 64 Ki / 50 %


@dataclass
class Result:
    """One benchmark case; times are nanoseconds per alloc+free pair."""

    algo: str
    granules: int
    fill: float
    median_ns: float
    p99_ns: float
    anchor_median_ns: float
    ratio: float


class _Anchor:
    def noop(self, a: object, b: object = None, c: object = None) -> None:
        """Nothing at all: the cost of a Python method call."""


def fill_pool(granules: int, fill: float, seed: int = SEED) -> GenPool:
    """A pool of ``granules`` granules filled to ``fill`` (deterministic)."""
    pool = GenPool(ORDER)
    pool.add(BASE, granules << ORDER)
    if fill <= 0:
        return pool
    rnd = random.Random(seed)
    held: list[tuple[int, int]] = []
    while True:
        size = rnd.randint(1, 8) << ORDER
        addr = pool.alloc(size)
        if not addr:
            break
        held.append((addr, size))
    rnd.shuffle(held)
    target_avail = (granules << ORDER) * (1 - fill)
    while pool.avail() < target_avail:
        addr, size = held.pop()
        pool.free(addr, size)
    return pool


def _algo_data(algo: GenPoolAlgo, pool: GenPool) -> Any:
    if algo is first_fit_align:
        return GenPoolDataAlign(1 << ORDER)
    if algo is fixed_alloc:
        # The first free granule: the fixed-offset allocation that succeeds.
        probe = pool.alloc(1 << ORDER)
        pool.free(probe, 1 << ORDER)
        return GenPoolDataFixed(probe - BASE)
    return None


def _time_batches(
    alloc: Callable[[int, GenPoolAlgo, Any], int],
    free: Callable[[int, int], object],
    algo: GenPoolAlgo,
    data: Any,
    batches: int,
    per_batch: int,
) -> tuple[list[float], list[float]]:
    """Alternate a batch of anchor pairs and a batch of alloc+free pairs; ns per pair.

    Both loops have the same shape (one call nested in another, same arguments), so
    the loop's own cost is in both and the ratio is the allocator's cost in calls.
    """
    size = 1 << ORDER
    noop = _Anchor().noop
    loop = range(per_batch)
    case_ns: list[float] = []
    anchor_ns: list[float] = []
    clock = time.perf_counter_ns
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for _ in range(batches):
            t0 = clock()
            for _ in loop:
                noop(noop(size, algo, data), size)
            t1 = clock()
            for _ in loop:
                free(alloc(size, algo, data), size)
            t2 = clock()
            anchor_ns.append((t1 - t0) / per_batch)
            case_ns.append((t2 - t1) / per_batch)
    finally:
        if gc_was_on:
            gc.enable()
    return case_ns, anchor_ns


def _p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]


def measure(
    algo_name: str, algo: GenPoolAlgo, pool: GenPool, batches: int, per_batch: int
) -> tuple[float, float, float, float]:
    """(median, p99, anchor median) in ns per pair for one algorithm on one pool, and the
    ratio to the anchor: the median over batches of each batch's ratio to the anchor
    batch timed right before it (robust to the machine speeding up or slowing down)."""
    data = _algo_data(algo, pool)
    size = 1 << ORDER
    before = pool.avail()
    pool.free(pool.alloc_algo(size, algo, data), size)  # warm up, and prove it balances
    if pool.avail() != before:
        raise RuntimeError(f"{algo_name}: an alloc+free pair changed the pool")
    case_ns, anchor_ns = _time_batches(pool.alloc_algo, pool.free, algo, data, batches, per_batch)
    ratio = statistics.median(c / a for c, a in zip(case_ns, anchor_ns, strict=True))
    return statistics.median(case_ns), _p99(case_ns), statistics.median(anchor_ns), ratio


ALGORITHMS: dict[str, GenPoolAlgo] = {
    "first_fit": first_fit,
    "first_fit_align": first_fit_align,
    "fixed_alloc": fixed_alloc,
    "first_fit_order_align": first_fit_order_align,
    "best_fit": best_fit,
}


def run(quick: bool = False, progress: Callable[[str], None] | None = None) -> list[Result]:
    """Every case; ``quick`` takes fewer samples (a smoke run, not for quoting)."""
    batches, per_batch = (20, 50) if quick else (200, 200)
    results: list[Result] = []
    for granules in (64 * 1024, 1024 * 1024):
        for fill in (0.0, 0.5, 0.9):
            if progress:
                progress(f"filling {granules} granules to {fill:.0%} ...")
            pool = fill_pool(granules, fill)
            for name, algo in ALGORITHMS.items():
                med, p99, anchor, ratio = measure(name, algo, pool, batches, per_batch)
                results.append(Result(name, granules, fill, med, p99, anchor, ratio))
    return results


def goals(results: list[Result]) -> dict[str, float | bool]:
    """The issue's two goals, from the results."""
    by = {(r.algo, r.granules, r.fill): r for r in results}
    small = by["first_fit", 64 * 1024, 0.5]
    large = by["first_fit", 1024 * 1024, 0.9]
    # From the anchor-normalised ratios: robust to the machine's speed changing between cases.
    scaling = large.ratio / small.ratio
    return {
        "first_fit_64Ki_50pct_ratio": small.ratio,
        "first_fit_64Ki_50pct_goal_met": small.ratio <= GOAL_RATIO_FIRST_FIT,
        "first_fit_1Mi_90pct_over_64Ki_50pct": scaling,
        "scaling_goal_met": scaling <= GOAL_SCALING,
    }


def main(json_out: bool = False, quick: bool = False) -> int:
    """Print the table (or JSON); returns 0."""

    def progress(msg: str) -> None:
        if not json_out:
            print(msg, file=sys.stderr, flush=True)

    results = run(quick=quick, progress=progress)
    summary = goals(results)
    if json_out:
        print(json.dumps({"results": [asdict(r) for r in results], "goals": summary}, indent=2))
        return 0
    print(f"{'algorithm':<22} {'granules':>9} {'fill':>5} {'median':>9} {'p99':>9} {'x anchor':>9}")
    for r in results:
        print(
            f"{r.algo:<22} {r.granules:>9} {r.fill:>5.0%} {r.median_ns:>7.0f}ns "
            f"{r.p99_ns:>7.0f}ns {r.ratio:>8.1f}x"
        )
    anchor = statistics.median(r.anchor_median_ns for r in results)
    print(f"\nanchor (a pair of no-op method calls): {anchor:.0f} ns")
    ok = "met" if summary["first_fit_64Ki_50pct_goal_met"] else "NOT met"
    print(
        f"goal: first_fit 64Ki granules 50% fill <= {GOAL_RATIO_FIRST_FIT:.0f}x anchor: "
        f"{summary['first_fit_64Ki_50pct_ratio']:.1f}x ({ok})"
    )
    ok = "met" if summary["scaling_goal_met"] else "NOT met"
    print(
        f"goal: first_fit 1Mi/90% <= {GOAL_SCALING:.0f}x 64Ki/50%: "
        f"{summary['first_fit_1Mi_90pct_over_64Ki_50pct']:.2f}x ({ok})"
    )
    return 0
