"""``uvdma bench map``: IOMMU map+unmap latency through uvdma, per size.

For 4 KiB, 64 KiB, 2 MiB and (when a 1 GiB hugepage is free) 1 GiB, memory is mapped
into the device's IOMMU domain and unmapped again through :meth:`IommuDomain.map` /
``unmap`` (the IOVA allocator, the bookkeeping and the ioctl).  The anchor is a null
ioctl on the same container (VFIO_GET_API_VERSION; IOMMU_OPTION on iommufd), timed
in the same run, so the ratio shows what a map costs beyond one trip into the kernel.

It runs unchanged on a real host with a real IOMMU; in the QEMU test VM the IOMMU is
emulated (every map updates emulated page tables and flushes an emulated IOTLB), so
figures there are emulation, not hardware.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from uvdma import pci
from uvdma.errors import UvdmaError
from uvdma.memory.hugepages import PAGE_1G, PAGE_2M, HugeMemory, allocate, size_name
from uvdma.vfio import IommuDomain, open_device

SIZES = (4 << 10, 64 << 10, PAGE_2M, PAGE_1G)


@dataclass
class MapResult:
    """One size; times in microseconds per map+unmap pair."""

    size: int
    page_size: int
    pairs: int
    median_us: float
    p99_us: float
    anchor_median_us: float
    ratio: float


def _samples(fn: Callable[[], None], budget_s: float, min_n: int, max_n: int) -> list[float]:
    out: list[float] = []
    clock = time.perf_counter
    start = clock()
    while len(out) < max_n and (len(out) < min_n or clock() - start < budget_s):
        t0 = clock()
        fn()
        out.append((clock() - t0) * 1e6)
    return out


def _p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]


def measure(domain: IommuDomain, mem: HugeMemory, size: int, budget_s: float) -> MapResult:
    """map+unmap pairs of ``size`` bytes from ``mem``, and the anchor beside them."""
    page = mem.page_size if mem.page_size <= size else domain.min_page_size()
    align = max(page, domain.min_page_size())

    def pair() -> None:
        domain.unmap(domain.map(mem.vaddr, size, align=align))

    pair()  # warm up: first-touch costs are not what we measure
    anchor = _samples(domain.null_ioctl, budget_s / 4, 50, 20000)
    pairs = _samples(pair, budget_s, 5, 5000)
    med, anchor_med = statistics.median(pairs), statistics.median(anchor)
    return MapResult(
        size, mem.page_size, len(pairs), med, _p99(pairs), anchor_med, med / anchor_med
    )


def default_device() -> str:
    """The first device bound to vfio-pci."""
    for dev in pci.list_devices():
        if dev.driver == pci.VFIO_PCI:
            return str(dev.address)
    raise UvdmaError("no device is bound to vfio-pci: pass --device BDF (and `uvdma bind BDF`)")


def run(
    device: str | None, budget_s: float = 2.0, progress: Callable[[str], None] | None = None
) -> tuple[str, list[MapResult]]:
    """Every size that memory can be had for; returns (backend, results)."""
    results: list[MapResult] = []
    with open_device(device or default_device()) as dev:
        for size in SIZES:
            page = PAGE_1G if size >= PAGE_1G else PAGE_2M
            try:
                mem = allocate(max(size, PAGE_2M), page, fallback=size < PAGE_1G)
            except UvdmaError as e:
                if progress:
                    progress(f"skipping {size_name(size)}: {e}")
                continue
            with mem:
                if progress:
                    progress(f"mapping {size_name(size)} ({size_name(mem.page_size)} pages) ...")
                results.append(measure(dev.domain, mem, size, budget_s))
        return dev.backend, results


def main(device: str | None = None, json_out: bool = False, budget_s: float = 2.0) -> int:
    """Print the table (or JSON)."""

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    backend, results = run(device, budget_s, progress)
    if json_out:
        print(json.dumps({"backend": backend, "results": [asdict(r) for r in results]}, indent=2))
        return 0
    print(f"IOMMU map+unmap through uvdma ({backend} backend)")
    print(f"{'size':>6} {'pages':>6} {'pairs':>6} {'median':>10} {'p99':>10} {'x null ioctl':>13}")
    for r in results:
        print(
            f"{size_name(r.size):>6} {size_name(r.page_size):>6} {r.pairs:>6} "
            f"{r.median_us:>8.1f}us {r.p99_us:>8.1f}us {r.ratio:>12.1f}x"
        )
    if results:
        print(f"\nanchor: null ioctl on the same container, {results[0].anchor_median_us:.2f} us")
    return 0
