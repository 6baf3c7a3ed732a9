"""The DMA API against the real kernel in the guest: the device DMAs into memory from
every path, under 64-, 32- and 24-bit masks; atomic allocations race the refill worker;
the cannot-block path makes no system call."""

from __future__ import annotations

import itertools
import mmap
import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from tests.support import nvme_by_hand as nvme
from tests.support.counting_kernel import CountingKernel
from uvdma import _sys, pci
from uvdma.dma import (
    DMA_BIT_MASK,
    DMA_FROM_DEVICE,
    GFP_ATOMIC,
    GFP_KERNEL,
    DmaDevice,
    dma_alloc_coherent,
    dma_free_coherent,
    dma_map_single,
    dma_pool_create,
    dma_set_mask_and_coherent,
    dma_sync_single_for_cpu,
    dma_unmap_single,
    is_bounced,
)
from uvdma.vfio import VfioDevice, open_device

pytestmark = pytest.mark.vm


@pytest.fixture
def vdev() -> Iterator[VfioDevice]:
    with open_device(pci.nvme_controllers()[0].address) as d:
        yield d


def check_identify(data: bytes) -> None:
    assert data[0:2] == b"\x36\x1b"
    assert data[24:64].decode().strip() == "QEMU NVMe Ctrl"


@pytest.mark.parametrize("bits", [64, 32, 24])
def test_device_dmas_into_every_kind_of_dma_memory_within_the_mask(
    vdev: VfioDevice, bits: int
) -> None:
    dev = DmaDevice(vdev, coherent_pool="512K")
    dma_set_mask_and_coherent(dev, DMA_BIT_MASK(bits))
    mask = DMA_BIT_MASK(bits)
    sq = dma_alloc_coherent(dev, 4096, GFP_KERNEL)  # dma-direct: the page allocator
    cq = dma_alloc_coherent(dev, 4096, GFP_KERNEL)
    assert sq[1] + 4095 <= mask and cq[1] + 4095 <= mask

    # data into an atomic-pool allocation
    data = dma_alloc_coherent(dev, 4096, GFP_ATOMIC)
    assert data[1] + 4095 <= mask
    check_identify(nvme.identify_controller(vdev, nvme.Placement(sq, cq, data)))
    nvme.disable(vdev)

    # data into a dma_pool block (what PRP lists come from)
    pool = dma_pool_create("identify", dev, 4096, 4096, 0)
    block = pool.alloc()
    assert block[1] + 4095 <= mask
    check_identify(nvme.identify_controller(vdev, nvme.Placement(sq, cq, block)))
    nvme.disable(vdev)
    pool.free(*block)
    pool.destroy()

    # data into the caller's numpy array, bounced (4 KiB is below the direct threshold)
    arr = np.zeros(4096, dtype=np.uint8)
    handle = dma_map_single(dev, arr, DMA_FROM_DEVICE)
    assert is_bounced(dev, handle) and handle + 4095 <= mask
    out = nvme.identify_controller(vdev, nvme.Placement(sq, cq, (int(arr.ctypes.data), handle)))
    assert out[:2] == b"\xa5\xa5"  # the device wrote the bounce buffer; the array waits for sync
    dma_sync_single_for_cpu(dev, handle, 4096, DMA_FROM_DEVICE)
    check_identify(arr.tobytes())
    nvme.disable(vdev)
    dma_unmap_single(dev, handle, 4096, DMA_FROM_DEVICE)

    # data into a page-aligned 64 KiB mmap, mapped in place
    with mmap.mmap(-1, 64 * 1024) as m:
        big = np.frombuffer(m, dtype=np.uint8)
        handle = dma_map_single(dev, big, DMA_FROM_DEVICE)
        assert not is_bounced(dev, handle) and handle + len(big) - 1 <= mask
        vaddr = int(big.ctypes.data)
        out = nvme.identify_controller(vdev, nvme.Placement(sq, cq, (vaddr, handle)))
        check_identify(out)  # the device wrote the caller's own pages
        nvme.disable(vdev)
        dma_unmap_single(dev, handle, len(big), DMA_FROM_DEVICE)
        del big

    for cpu, dma in (sq, cq, data):
        dma_free_coherent(dev, 4096, cpu, dma)
    assert dev.close() == []


def test_atomic_allocations_from_threads_while_the_worker_expands(vdev: VfioDevice) -> None:
    dev = DmaDevice(vdev, coherent_pool="128K")
    dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64))
    pools = dev.dma_domain.pools
    start_size = pools.pool_size["kernel"]
    held: list[list[tuple[int, int, int]]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(300):
                size = 4096 << ((i + k) % 3)
                try:
                    cpu, dma = dma_alloc_coherent(dev, size, GFP_ATOMIC)
                except MemoryError:
                    continue  # pool exhausted before the worker caught up: the kernel's NULL
                held[k].append((cpu, dma, size))
                if len(held[k]) > 12:
                    c, d, s = held[k].pop(0)
                    dma_free_coherent(dev, s, c, d)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pools.flush(60)
    assert not errors
    live = sorted((dma, dma + size) for h in held for _, dma, size in h)
    for (_, end), (nxt, _) in itertools.pairwise(live):
        assert end <= nxt, "two threads got overlapping DMA memory"
    outstanding = sum(size for h in held for _, _, size in h)
    sizes = pools.pool_size
    avail = pools.avail()
    assert sum(sizes.values()) - sum(avail.values()) == outstanding  # nothing lost
    assert sizes["kernel"] > start_size and pools.expansions >= 1  # it did expand meanwhile
    for h in held:
        for cpu, dma, size in h:
            dma_free_coherent(dev, size, cpu, dma)
    assert pools.avail() == sizes
    assert dev.close() == []


def test_the_cannot_block_path_makes_no_system_call(vdev: VfioDevice) -> None:
    counting = CountingKernel(_sys.kernel())
    dev = DmaDevice(vdev, coherent_pool="1M")
    dma_set_mask_and_coherent(dev, DMA_BIT_MASK(32))
    dev.dma_domain.pools.flush()
    with _sys.use_kernel(counting):
        for _ in range(200):
            cpu, dma = dma_alloc_coherent(dev, 4096, GFP_ATOMIC)
            dma_free_coherent(dev, 4096, cpu, dma)
        assert counting.calls == {}
        big = dma_alloc_coherent(dev, 4 << 20, GFP_KERNEL)  # blocking, larger than a chunk
        assert counting.calls.get("ioctl", 0) >= 1 and counting.calls.get("mmap", 0) >= 1
        dma_free_coherent(dev, 4 << 20, *big)
    assert dev.close() == []


# -- allocations that cannot be satisfied: an error, never an OOM kill ---------------------------

LIMITS = """
import ctypes, resource, sys
from pathlib import Path
from tests.support import nvme_by_hand as nvme
from uvdma import pci
from uvdma.dma import (DMA_BIT_MASK, DmaAllocError, DmaDevice, dma_alloc_coherent,
                       dma_free_coherent, dma_set_mask_and_coherent)
from uvdma.vfio import open_device

def vmlck():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024

if sys.argv[1] == "memlock":  # as a process without CAP_IPC_LOCK: RLIMIT_MEMLOCK counts
    class Head(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]
    libc = ctypes.CDLL(None, use_errno=True)
    head, data = Head(0x20080522, 0), (Data * 2)()
    assert libc.capget(ctypes.byref(head), data) == 0
    data[0].effective &= ~(1 << 14)  # CAP_IPC_LOCK
    data[0].permitted &= ~(1 << 14)
    assert libc.capset(ctypes.byref(head), data) == 0
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (16 << 20, 16 << 20))

with open_device(pci.nvme_controllers()[0].address) as vd:
    dev = DmaDevice(vd, coherent_pool="128K")
    asks = [(32, 5 << 30), (64, 3 << 30)] if sys.argv[1] == "size" else [(64, 32 << 20)]
    for bits, size in asks:
        dma_set_mask_and_coherent(dev, DMA_BIT_MASK(bits))
        try:
            dma_alloc_coherent(dev, size)
            print(f"{bits} {size}: allocated", flush=True)
        except DmaAllocError as e:
            print(f"{bits} {size}: DmaAllocError: {e}", flush=True)
    print(f"locked {vmlck()}", flush=True)
    # and memory is still usable: the device DMAs an Identify into new allocations
    dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64))
    sq, cq, data = (dma_alloc_coherent(dev, 4096) for _ in range(3))
    out = nvme.identify_controller(vd, nvme.Placement(sq, cq, data))
    print("identify:", out[24:64].decode().strip(), flush=True)
    nvme.disable(vd)
    for cpu, dma in (sq, cq, data):
        dma_free_coherent(dev, 4096, cpu, dma)
    dev.close()
"""


def limits(case: str) -> subprocess.CompletedProcess[str]:
    """Run LIMITS in a process of its own: an OOM kill shows as its death, not ours."""
    return subprocess.run(
        [sys.executable, "-c", LIMITS, case],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_allocations_larger_than_the_zone_or_the_machine_raise_and_the_process_lives() -> None:
    # 2 GiB guest, 64 hugepages of 2 MiB: 5 GiB cannot fit under a 32-bit mask, and 3 GiB
    # is more than the free hugepages and the memory there is
    r = limits("size")
    assert r.returncode == 0, r.stdout + r.stderr  # not OOM-killed (-9), no traceback
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"32 {5 << 30}: DmaAllocError: ")
    assert "within mask 0xffffffff" in lines[0]
    assert lines[1].startswith(f"64 {3 << 30}: DmaAllocError: ")
    assert "more than this machine can give" in lines[1]
    assert lines[-1] == "identify: QEMU NVMe Ctrl"


def test_an_allocation_past_rlimit_memlock_says_how_much_this_process_has_locked() -> None:
    r = limits("memlock")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    locked = int(lines[1].split()[1])
    assert locked > 0  # VFIO's pinned DMA memory shows in VmLck
    assert lines[0].startswith(f"64 {32 << 20}: DmaAllocError: ")
    assert "RLIMIT_MEMLOCK is 16777216 bytes and this process has already locked" in lines[0]
    assert "ulimit -l" in lines[0]
    assert lines[-1] == "identify: QEMU NVMe Ctrl"  # what fits under the limit still works
