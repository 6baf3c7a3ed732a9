"""``uvdma bench dma``: the DMA API's latencies beside a no-op anchor.

Cases (each an allocate+free or map+unmap pair through the public API):

* ``coherent 4K atomic``: ``dma_alloc_coherent(GFP_ATOMIC)`` from the atomic pools;
* ``coherent 4K kernel``: ``GFP_KERNEL`` from pages already mapped (no system call);
* ``coherent 4M kernel``: ``GFP_KERNEL`` larger than a 2 MiB chunk, so every pair maps
  and unmaps new memory (the "may sleep" path);
* ``dma_pool 4K``: ``dma_pool_alloc``/``dma_pool_free`` (what PRP lists come from);
* ``map_single 4K bounce`` and ``map_single 64K direct``: streaming maps of the
  caller's memory.

The ratio is the median over batches of each batch's time against an anchor batch (a
pair of no-op Python method calls with the same arguments) timed right before it, with
the garbage collector off; p99 is over single pairs.  Goals (issue 4): the atomic pair
at most 25x the anchor, the dma_pool pair at most 10x.
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from uvdma.bench.map import default_device
from uvdma.dma import (
    DMA_BIT_MASK,
    DMA_TO_DEVICE,
    GFP_ATOMIC,
    GFP_KERNEL,
    DmaAllocation,
    DmaDevice,
    dma_alloc_coherent,
    dma_free_coherent,
    dma_map_single,
    dma_pool_create,
    dma_set_mask_and_coherent,
    dma_unmap_single,
)
from uvdma.errors import UvdmaError
from uvdma.vfio import open_device

GOALS = {"coherent 4K atomic": 25.0, "dma_pool 4K": 10.0}


@dataclass
class DmaResult:
    """One case; times in nanoseconds per pair."""

    case: str
    median_ns: float
    p99_ns: float
    anchor_ns: float
    ratio: float
    samples: list[float]


_PAIR = DmaAllocation(0, 0)


class _Anchor:
    def noop(self, *args: object) -> DmaAllocation:
        """A method call that does nothing (returns a pair, as the allocators do)."""
        return _PAIR


def _measure(
    name: str, pair: Callable[[], None], anchor: Callable[[], None], batches: int, per_batch: int
) -> DmaResult:
    clock = time.perf_counter_ns
    pair()  # warm up
    ratios: list[float] = []
    anchors: list[float] = []
    singles: list[float] = []
    loop = range(per_batch)
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for _ in range(batches):
            t0 = clock()
            for _ in loop:
                anchor()
            t1 = clock()
            for _ in loop:
                pair()
            t2 = clock()
            anchors.append((t1 - t0) / per_batch)
            ratios.append((t2 - t1) / (t1 - t0))
            t3 = clock()
            pair()
            singles.append(clock() - t3)
    finally:
        if gc_was_on:
            gc.enable()
    singles.sort()
    p99 = singles[min(len(singles) - 1, round(0.99 * (len(singles) - 1)))]
    med_anchor = statistics.median(anchors)
    ratio = statistics.median(ratios)
    return DmaResult(name, ratio * med_anchor, p99, med_anchor, ratio, singles)


def run(
    device: str | None, quick: bool = False, progress: Callable[[str], None] | None = None
) -> list[DmaResult]:
    """Every case on one device (bound to vfio-pci)."""
    batches, per_batch = (20, 10) if quick else (100, 50)
    results: list[DmaResult] = []
    with open_device(device or default_device()) as vdev:
        dev = DmaDevice(vdev, debug=False)
        dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64))
        noop = _Anchor().noop

        def case(
            name: str,
            pair: Callable[[], None],
            anchor: Callable[[], None],
            n: int = batches,
            per: int = per_batch,
        ) -> None:
            if progress:
                progress(f"{name} ...")
            results.append(_measure(name, pair, anchor, n, per))

        def atomic() -> None:
            c, d = dma_alloc_coherent(dev, 4096, GFP_ATOMIC)
            dma_free_coherent(dev, 4096, c, d)

        def anchor_coherent() -> None:
            c, d = noop(dev, 4096, GFP_ATOMIC)
            noop(dev, 4096, c, d)

        case("coherent 4K atomic", atomic, anchor_coherent)

        def kernel4k() -> None:
            c, d = dma_alloc_coherent(dev, 4096, GFP_KERNEL)
            dma_free_coherent(dev, 4096, c, d)

        case("coherent 4K kernel", kernel4k, anchor_coherent)

        def kernel4m() -> None:
            c, d = dma_alloc_coherent(dev, 4 << 20, GFP_KERNEL)
            dma_free_coherent(dev, 4 << 20, c, d)

        # the system-call cases are slow: fewer, smaller batches
        case("coherent 4M kernel (maps)", kernel4m, anchor_coherent, max(batches // 10, 5), 2)

        pool = dma_pool_create("bench", dev, 4096, 4096, 0)
        pool_alloc, pool_free = pool.alloc, pool.free

        def dmapool() -> None:
            v, d = pool_alloc()
            pool_free(v, d)

        def anchor_pool() -> None:
            v, d = noop()
            noop(v, d)

        case("dma_pool 4K", dmapool, anchor_pool)
        pool.destroy()

        small = bytearray(4096)

        def bounce() -> None:
            h = dma_map_single(dev, small, DMA_TO_DEVICE)
            dma_unmap_single(dev, h, 4096, DMA_TO_DEVICE)

        def anchor_map() -> None:
            h = noop(dev, small, DMA_TO_DEVICE)
            noop(dev, h, 4096, DMA_TO_DEVICE)

        case("map_single 4K bounce", bounce, anchor_map)
        with mmap.mmap(-1, 64 << 10) as m:
            held = [np.frombuffer(m, dtype=np.uint8)]  # page-aligned: mapped in place

            def direct() -> None:
                h = dma_map_single(dev, held[0], DMA_TO_DEVICE)
                dma_unmap_single(dev, h, 64 << 10, DMA_TO_DEVICE)

            case("map_single 64K direct", direct, anchor_map, max(batches // 5, 5), 2)
            held.clear()  # release the buffer export before the mmap closes
        if dev.close():
            raise UvdmaError("the benchmark leaked DMA memory")
    return results


def plot(results: list[DmaResult], path: str) -> None:
    """A latency histogram per case (matplotlib: `pip install 'uvdma[plot]'`)."""
    # matplotlib wants a writable config dir; the test VM's home is read-only
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="uvdma-mpl-"))
    try:
        import matplotlib  # noqa: PLC0415 - optional

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as e:
        raise UvdmaError("--plot needs matplotlib: pip install 'uvdma[plot]'") from e
    fig, axes = plt.subplots(len(results), 1, figsize=(8, 2.2 * len(results)))
    for ax, r in zip(axes, results, strict=True):
        us = np.array(r.samples) / 1000
        ax.hist(us, bins=40, range=(0, float(np.percentile(us, 99)) * 1.2), color="#4472c4")
        ax.axvline(r.median_ns / 1000, color="k", linestyle="--", linewidth=1)
        ax.set_title(
            f"{r.case}: median {r.median_ns / 1000:.2f} us, {r.ratio:.1f}x anchor", fontsize=9
        )
        ax.set_xlabel("microseconds per pair", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(
    device: str | None = None,
    json_out: bool = False,
    plot_path: str | None = None,
    quick: bool = False,
) -> int:
    """Print the table (or JSON); write the histogram if asked."""

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = run(device, quick, progress)
    goals = {
        name: {"goal": goal, "ratio": r.ratio, "met": r.ratio <= goal}
        for name, goal in GOALS.items()
        for r in results
        if r.case == name
    }
    if plot_path:
        plot(results, plot_path)
    if json_out:
        rows = [{k: v for k, v in asdict(r).items() if k != "samples"} for r in results]
        print(json.dumps({"results": rows, "goals": goals}, indent=2))
        return 0
    print(f"{'case':<28} {'median':>10} {'p99':>10} {'x anchor':>9}")
    for r in results:
        print(
            f"{r.case:<28} {r.median_ns / 1000:>8.2f}us {r.p99_ns / 1000:>8.2f}us {r.ratio:>8.1f}x"
        )
    anchor = statistics.median(r.anchor_ns for r in results)
    print(f"\nanchor (a pair of no-op method calls): {anchor:.0f} ns")
    for name, g in goals.items():
        verdict = "met" if g["met"] else "NOT met"
        print(f"goal: {name} <= {g['goal']:.0f}x anchor: {g['ratio']:.1f}x ({verdict})")
    if plot_path:
        print(f"histogram: {plot_path}")
    return 0
