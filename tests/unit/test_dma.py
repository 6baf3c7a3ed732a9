"""The DMA API against the fake kernel: pool.c's choices, dma-direct's zones and retries,
streaming maps, dma_pool, DMA-API debugging, and every refusal leaving the pools as they were.

That a device really DMAs into this memory is proven in tests/vm/test_dma.py.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from tests.support.counting_kernel import CountingKernel
from uvdma import _sys, pci
from uvdma._args import memparse, parse_size
from uvdma.dma import (
    DMA_BIDIRECTIONAL,
    DMA_BIT_MASK,
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    GFP_ATOMIC,
    GFP_DMA,
    GFP_DMA32,
    GFP_KERNEL,
    DmaAllocError,
    DmaApiError,
    DmaBuffer,
    DmaDevice,
    DmaDomain,
    DmaDomainError,
    DmaMaskError,
    dma_alloc_coherent,
    dma_free_coherent,
    dma_map_sg,
    dma_map_single,
    dma_pool_create,
    dma_set_coherent_mask,
    dma_set_mask,
    dma_set_mask_and_coherent,
    dma_sync_single_for_cpu,
    dma_sync_single_for_device,
    dma_unmap_sg,
    dma_unmap_single,
    is_bounced,
)
from uvdma.dma.debug import POISON_FREE
from uvdma.dma.pool import default_pool_size, resolve_pool_size
from uvdma.dma.region import DmaAllocation, DmaRegion, SgEntry
from uvdma.dma.zones import Zone, gfp_zone, zone_for_mask, zone_windows
from uvdma.errors import ClosedError, SizeError, UvdmaError
from uvdma.memory import hugepages
from uvdma.memory.hugepages import HugeMemory
from uvdma.testing.fake_kernel import FakeKernel
from uvdma.testing.fake_sysfs import make_device
from uvdma.vfio import VfioDevice, new_domain, open_device

BDF = "0000:00:09.0"
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeKernel, VfioDevice]]:
    make_device(tmp_path, BDF, pci.NVME_CLASS, 9, "vfio-pci", cdev=0)
    k = FakeKernel()
    k.add_device(BDF, 9, 0)
    k.free_hugepages[2 * MiB] = 64
    with _sys.use_kernel(k):
        vd = open_device(BDF, sysfs=tmp_path, backend="type1")
        yield k, vd
        vd.close()
        assert k.open_kinds() == []  # every mapping, memfd and fd released
        assert k.pinned == 0


@pytest.fixture
def dev(fake: tuple[FakeKernel, VfioDevice]) -> Iterator[DmaDevice]:
    d = DmaDevice(fake[1], coherent_pool="256K", debug=True)
    yield d
    assert d.close() == []  # no leaks


def state(dev: DmaDevice) -> tuple[dict[str, int], dict[str, int], int]:
    """Everything a bad call must leave unchanged."""
    return (
        dev.dma_domain.pools.avail(),
        dev.dma_domain.pages.mapped_bytes(),
        len(dev.domain.mappings()),
    )


# -- the atomic pools -----------------------------------------------------------------------


def test_pool_size_from_argument_environment_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SizeError, match=r"coherent_pool / UVDMA_COHERENT_POOL.*e\.g\. 512K"):
        resolve_pool_size("lots")
    assert resolve_pool_size("1M") == MiB
    assert resolve_pool_size("0x40000") == 256 * KiB
    # pool.c: coherent_pool=0 leaves atomic_pool_size 0, and init then uses the default
    assert resolve_pool_size(0) == resolve_pool_size("0") == default_pool_size()
    monkeypatch.setenv("UVDMA_COHERENT_POOL", "768K")
    assert resolve_pool_size() == 768 * KiB
    monkeypatch.delenv("UVDMA_COHERENT_POOL")
    # pool.c: 128 KiB per GiB, at least 128 KiB, at most MAX_PAGE_ORDER (4 MiB)
    assert default_pool_size(512 * MiB) == 128 * KiB
    assert default_pool_size(8 << 30) == MiB
    assert default_pool_size(64 << 30) == 4 * MiB


@pytest.mark.parametrize(
    ("text", "value", "rest"),
    [
        ("512K", 512 * KiB, ""),
        ("4m", 4 * MiB, ""),
        ("1G", 1 << 30, ""),
        ("2T", 2 << 40, ""),
        ("3P", 3 << 50, ""),
        ("1E", 1 << 60, ""),
        ("4096", 4096, ""),
        ("0x1000", 4096, ""),  # 0x: hexadecimal
        ("0X10k", 16 * KiB, ""),
        ("010", 8, ""),  # a leading 0: octal
        ("08", 0, "8"),  # 8 is no octal digit: reading stops there
        ("0x", 0, "x"),  # no hex digit after 0x: octal 0, then "x"
        ("1.5G", 1, ".5G"),  # trailing text ignored
        ("2Gfoo", 2 << 30, "foo"),
        ("4KB", 4 * KiB, "B"),  # one suffix letter only
        ("lots", 0, "lots"),  # no number: 0 and nothing read
        ("-1G", 0, "-1G"),  # simple_strtoull takes no sign
        (" 1G", 0, " 1G"),  # nor leading blanks
        ("", 0, ""),
    ],
)
def test_memparse_reads_sizes_as_the_kernel_does(text: str, value: int, rest: str) -> None:
    assert memparse(text) == (value, rest)


def test_parse_size_refuses_what_has_no_number_or_would_wrap() -> None:
    assert parse_size("2Gfoo", "x") == 2 << 30
    assert parse_size("15E", "x") == 15 << 60
    for bad in ("lots", "", "-1G", "K"):
        with pytest.raises(SizeError, match=r"cannot read the size .* \(coolant\): write a number"):
            parse_size(bad, "coolant")
    for wraps in ("16E", "0x10000000000000000", "9" * 40):
        with pytest.raises(SizeError, match=r"past 2\*\*64 - 1 bytes"):
            parse_size(wraps, "coolant")


def test_hugetlbfs_pagesize_is_read_by_memparse() -> None:
    assert [hugepages._parse_pagesize(t) for t in ("2M", "1G", "2097152", "2048k")] == [
        2 * MiB,
        1 << 30,
        2 * MiB,
        2 * MiB,
    ]


def test_coherent_returns_are_typed_and_still_unpack(dev: DmaDevice) -> None:
    got = dma_alloc_coherent(dev, 4096)
    cpu, dma = got  # the kernel's pair, as before
    assert isinstance(got, DmaAllocation)
    assert (got.cpu_addr, got.dma_handle) == (cpu, dma)
    atomic = dma_alloc_coherent(dev, 4096, GFP_ATOMIC)
    assert isinstance(atomic, DmaAllocation)
    pool = dma_pool_create("typed", dev, 64)
    block = pool.alloc()
    assert isinstance(block, DmaAllocation) and block.dma_handle % 64 == 0
    pool.free(*block)
    pool.destroy()
    with DmaBuffer(dev, 8192) as buf:
        region = buf.region
        assert isinstance(region, DmaRegion) and region.size == 8192
        assert region.allocation == (buf.vaddr, buf.dma)
    dma_free_coherent(dev, 4096, *atomic)
    dma_free_coherent(dev, 4096, *got)


def test_three_pools_in_their_zones_with_debugfs_sizes(dev: DmaDevice) -> None:
    pools = dev.dma_domain.pools
    assert pools.stats() == {
        "pool_size_dma": 256 * KiB,
        "pool_size_dma32": 256 * KiB,
        "pool_size_kernel": 256 * KiB,
    }
    for pool, lo, hi in (
        (pools.dma, 0, 1 << 24),
        (pools.dma32, 1 << 24, 1 << 32),
        (pools.kernel, 1 << 32, 1 << 64),
    ):
        assert pool is not None
        vaddr = pool.alloc(4096)
        assert lo <= pool.virt_to_phys(vaddr) < hi
        pool.free(vaddr, 4096)


def test_guess_pool_order_and_fallback(dev: DmaDevice) -> None:
    p = dev.dma_domain.pools
    assert p.guess_pool(None, Zone.DMA) is p.dma
    assert p.guess_pool(None, Zone.DMA32) is p.dma32
    assert p.guess_pool(None, Zone.NORMAL) is p.kernel
    assert p.guess_pool(p.kernel, Zone.NORMAL) is p.dma32
    assert p.guess_pool(p.dma32, Zone.NORMAL) is p.dma
    assert p.guess_pool(p.dma, Zone.NORMAL) is None
    assert p.sequence[Zone.NORMAL] == (p.kernel, p.dma32, p.dma)
    assert p.sequence[Zone.DMA] == (p.dma,)


def test_phys_addr_ok_refusal_gives_the_memory_back(dev: DmaDevice) -> None:
    p = dev.dma_domain.pools
    before = p.avail()
    assert p.alloc_from_pool(4096, Zone.NORMAL, lambda dma, n: False) is None
    assert p.avail() == before
    got = p.alloc_from_pool(4096, Zone.NORMAL, lambda dma, n: dma < 1 << 32)  # to dma32
    assert got is not None and (1 << 24) <= got.dma_handle < 1 << 32
    assert got.pool is p.dma32
    assert p.free_from_pool(got.cpu_addr, 4096) is True
    assert p.free_from_pool(0x1234000, 4096) is False  # not pool memory


def test_worker_expands_a_pool_that_runs_low(dev: DmaDevice) -> None:
    p = dev.dma_domain.pools
    dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64))  # the kernel pool serves 64-bit masks
    held = [dma_alloc_coherent(dev, 64 * KiB, GFP_ATOMIC) for _ in range(3)]  # 192K of 256K
    try:
        assert p.flush(10)
        assert p.pool_size["kernel"] == 512 * KiB  # a chunk the size of the pool was added
        assert p.pool_size["dma32"] == 256 * KiB  # the others did not need to grow
        assert p.expansions == 1
    finally:
        for cpu, dma in held:
            dma_free_coherent(dev, 64 * KiB, cpu, dma)


def test_atomic_allocations_make_no_system_call(fake: tuple[FakeKernel, VfioDevice]) -> None:
    k, vd = fake
    counting = CountingKernel(k)
    with _sys.use_kernel(counting):
        dev = DmaDevice(vd, coherent_pool="1M")
        dev.dma_domain.pools.flush()
        counting.calls.clear()
        for _ in range(50):
            cpu, dma = dma_alloc_coherent(dev, 4096, GFP_ATOMIC)
            dma_free_coherent(dev, 4096, cpu, dma)
        assert counting.calls == {}
        dma_alloc_coherent(dev, 3 * MiB, GFP_KERNEL)  # the blocking path does map memory
        assert counting.calls.get("ioctl", 0) >= 1
        dev.close()


# -- masks and zones -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [24, 32, 36, 64])
@pytest.mark.parametrize("gfp", [GFP_KERNEL, GFP_ATOMIC])
def test_every_coherent_address_fits_the_mask(dev: DmaDevice, bits: int, gfp: int) -> None:
    dma_set_mask_and_coherent(dev, DMA_BIT_MASK(bits))
    held = []
    for size in (1, 4096, 5000, 64 * KiB):
        cpu, dma = dma_alloc_coherent(dev, size, gfp)
        assert dma + size - 1 <= DMA_BIT_MASK(bits)
        assert ctypes.string_at(cpu, size) == bytes(size)  # zeroed
        held.append((size, cpu, dma))
    for size, cpu, dma in held:
        dma_free_coherent(dev, size, cpu, dma)


def test_default_masks_are_32_bits_and_an_impossible_mask_changes_nothing(dev: DmaDevice) -> None:
    assert dev.dma_mask == dev.coherent_dma_mask == DMA_BIT_MASK(32)
    for setter in (dma_set_mask, dma_set_coherent_mask, dma_set_mask_and_coherent):
        with pytest.raises(DmaMaskError, match="no usable IOVA range"):
            setter(dev, DMA_BIT_MASK(20))
    assert dev.dma_mask == dev.coherent_dma_mask == DMA_BIT_MASK(32)


def test_a_36_bit_mask_makes_exactly_one_iova_choice(
    fake: tuple[FakeKernel, VfioDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The optimal zone for a 36-bit mask is NORMAL.  With NORMAL's IOVAs below 2**36
    # taken, the kernel's __dma_direct_alloc_pages would get pages above the mask, see
    # dma_coherent_ok fail and retry in DMA32.  uvdma passes the mask down as the window's
    # upper bound: one IOVA choice, in DMA32, one MAP_DMA, nothing mapped above the mask.
    k, vd = fake
    iova = vd.domain.iova
    iova.reserve(1 << 32, (1 << 36) - (1 << 32))
    dev = DmaDevice(vd, coherent_pool="256K", debug=True)
    dma_set_coherent_mask(dev, DMA_BIT_MASK(36))
    choices: list[tuple[int, ...]] = []
    real_alloc = iova.alloc

    def alloc(size: int, align: int = 4096, windows: object = ()) -> int:
        got = real_alloc(size, align, windows)  # type: ignore[arg-type]
        choices.append((size, got))
        return got

    monkeypatch.setattr(iova, "alloc", alloc)
    k.calls.clear()
    cpu, dma = dma_alloc_coherent(dev, 8192)
    assert (1 << 24) <= dma < 1 << 32
    assert len(choices) == 1 and (1 << 24) <= choices[0][1] < 1 << 32
    assert k.calls.count("ioctl VFIO_IOMMU_MAP_DMA") == 1
    assert "ioctl VFIO_IOMMU_UNMAP_DMA" not in k.calls
    dma_free_coherent(dev, 8192, cpu, dma)
    assert dev.close() == []


def test_zones_and_the_one_mask_rule() -> None:
    assert [zone_for_mask(DMA_BIT_MASK(b)) for b in (24, 28, 32, 36, 64)] == [
        Zone.DMA,
        Zone.DMA32,
        Zone.DMA32,
        Zone.NORMAL,
        Zone.NORMAL,
    ]
    assert [gfp_zone(g) for g in (GFP_KERNEL, GFP_DMA, GFP_DMA32, GFP_DMA | GFP_DMA32)] == [
        Zone.NORMAL,
        Zone.DMA,
        Zone.DMA32,
        Zone.DMA,
    ]
    # the windows: the zone, then the lower ones, each cut at the mask
    assert zone_windows(Zone.NORMAL, DMA_BIT_MASK(36)) == (
        (1 << 32, DMA_BIT_MASK(36)),
        (1 << 24, DMA_BIT_MASK(32)),
        (0, DMA_BIT_MASK(24)),
    )
    assert zone_windows(Zone.DMA32, DMA_BIT_MASK(28)) == (
        (1 << 24, DMA_BIT_MASK(28)),
        (0, DMA_BIT_MASK(24)),
    )
    assert zone_windows(Zone.DMA, DMA_BIT_MASK(64)) == ((0, DMA_BIT_MASK(24)),)


# -- bad input: clear errors, pools unchanged ------------------------------------------------


def test_size_zero_and_sizes_larger_than_any_zone(dev: DmaDevice) -> None:
    before = state(dev)
    with pytest.raises(ValueError, match="size must be positive"):
        dma_alloc_coherent(dev, 0)
    dma_set_mask_and_coherent(dev, DMA_BIT_MASK(24))
    with pytest.raises(DmaAllocError, match="no DMA memory within mask 0xffffff"):
        dma_alloc_coherent(dev, 32 * MiB)
    with pytest.raises(DmaAllocError, match="atomic pools have no"):
        dma_alloc_coherent(dev, 2 * MiB, GFP_ATOMIC)
    assert state(dev) == before


def test_a_size_that_is_not_a_whole_number_of_bytes_is_refused(dev: DmaDevice) -> None:
    before = state(dev)
    for size in (1.5, "4096", True, None):
        with pytest.raises(TypeError, match=r"size must be a whole number of bytes \(an int\)"):
            dma_alloc_coherent(dev, size)  # type: ignore[arg-type]
    assert state(dev) == before
    cpu, dma = dma_alloc_coherent(dev, np.int64(4096))  # numpy's integers are integers
    dma_free_coherent(dev, 4096, cpu, dma)
    assert state(dev) == before


def test_bad_frees_are_refused_with_the_allocating_call_site(dev: DmaDevice) -> None:
    cpu, dma = dma_alloc_coherent(dev, 8192, GFP_ATOMIC)
    before = state(dev)
    with pytest.raises(
        DmaApiError, match=r"size 4096, allocated 8192 \(allocated at .*test_dma.py"
    ):
        dma_free_coherent(dev, 4096, cpu, dma)
    with pytest.raises(DmaApiError, match="cpu address"):
        dma_free_coherent(dev, 8192, cpu + 4096, dma)
    with pytest.raises(DmaApiError, match="no such allocation"):
        dma_free_coherent(dev, 8192, cpu, dma + 0x10000)
    assert state(dev) == before
    dma_free_coherent(dev, 8192, cpu, dma)
    with pytest.raises(DmaApiError, match=r"already freed at .*test_dma.py.*double free"):
        dma_free_coherent(dev, 8192, cpu, dma)


def test_freed_memory_is_poisoned_and_leaks_are_listed(fake: tuple[FakeKernel, VfioDevice]) -> None:
    with DmaDomain(fake[1].domain, coherent_pool="256K") as domain:
        dev = DmaDevice(fake[1], domain, debug=True)
        cpu, dma = dma_alloc_coherent(dev, 4096)
        ctypes.memset(cpu, 0x11, 4096)
        dma_free_coherent(dev, 4096, cpu, dma)
        assert ctypes.string_at(cpu, 4) == bytes([POISON_FREE]) * 4
        leaked = dma_alloc_coherent(dev, 4096, GFP_ATOMIC)
        lines = dev.close()
        assert len(lines) == 1
        assert f"leaked coherent dma {leaked.dma_handle:#x} size 4096" in lines[0]
        assert "test_dma.py" in lines[0]
        dma_free_coherent(dev, 4096, *leaked)  # the domain still holds the memory


def test_without_debugging_the_checks_still_hold(fake: tuple[FakeKernel, VfioDevice]) -> None:
    dev = DmaDevice(fake[1], coherent_pool="256K", debug=False)
    cpu, dma = dma_alloc_coherent(dev, 4096, GFP_ATOMIC)
    with pytest.raises(DmaApiError, match="size 8192, allocated 4096"):
        dma_free_coherent(dev, 8192, cpu, dma)
    dma_free_coherent(dev, 4096, cpu, dma)
    with pytest.raises(DmaApiError, match="already freed: a double free"):
        dma_free_coherent(dev, 4096, cpu, dma)
    dev.close()


def test_dma_buffer_views_and_context(dev: DmaDevice) -> None:
    with DmaBuffer(dev, 4096) as buf:
        arr = buf.array(np.uint32)
        arr[:] = np.arange(1024, dtype=np.uint32)
        assert buf.cpu[4:8].tobytes() == (1).to_bytes(4, "little")
        assert buf.dma + buf.size - 1 <= dev.coherent_dma_mask
    assert dev.debug.leaks() == []


# -- streaming -------------------------------------------------------------------------------


def device_writes(dev: DmaDevice, dma: int, data: bytes) -> None:
    """Stand-in for the device writing at an IOVA: through the domain's translation."""
    vaddr = dev.domain.translate(dma)
    assert vaddr is not None
    ctypes.memmove(vaddr, data, len(data))


def test_small_or_unaligned_buffers_bounce_and_copy_back(dev: DmaDevice) -> None:
    buf = bytearray(b"x" * 1000)
    dma = dma_map_single(dev, buf, DMA_BIDIRECTIONAL)
    assert is_bounced(dev, dma)
    assert ctypes.string_at(dev.domain.translate(dma) or 0, 3) == b"xxx"  # copied in
    device_writes(dev, dma, b"dev")
    assert buf[:3] == b"xxx"
    dma_sync_single_for_cpu(dev, dma, 1000, DMA_BIDIRECTIONAL)
    assert buf[:3] == b"dev"
    buf[:3] = b"cpu"
    dma_sync_single_for_device(dev, dma, 1000, DMA_BIDIRECTIONAL)
    assert ctypes.string_at(dev.domain.translate(dma) or 0, 3) == b"cpu"
    device_writes(dev, dma, b"end")
    dma_unmap_single(dev, dma, 1000, DMA_BIDIRECTIONAL)
    assert buf[:3] == b"end"


def test_large_page_aligned_buffers_are_mapped_in_place(dev: DmaDevice) -> None:
    with mmap.mmap(-1, 128 * KiB) as m:
        arr = np.frombuffer(m, dtype=np.uint8)
        dma = dma_map_single(dev, arr, DMA_FROM_DEVICE)
        assert not is_bounced(dev, dma)
        assert dev.domain.translate(dma) == arr.ctypes.data
        assert dma + arr.nbytes - 1 <= dev.dma_mask
        perms = [(m.read, m.write) for m in dev.domain.mappings() if m.iova == dma]
        assert perms == [(False, True)]  # the device may only write it
        dma_unmap_single(dev, dma, arr.nbytes, DMA_FROM_DEVICE)
        del arr


def test_read_only_buffer_for_the_device_to_write_is_refused(dev: DmaDevice) -> None:
    before = state(dev)
    with pytest.raises(DmaApiError, match="read-only buffer for the device to write"):
        dma_map_single(dev, b"immutable", DMA_FROM_DEVICE)
    dma = dma_map_single(dev, b"immutable", DMA_TO_DEVICE)  # reading it is fine
    dma_unmap_single(dev, dma, 9, DMA_TO_DEVICE)
    assert state(dev) == before


def test_unmap_checks_handle_size_and_direction(dev: DmaDevice) -> None:
    buf = bytearray(64)
    dma = dma_map_single(dev, buf, DMA_TO_DEVICE)
    with pytest.raises(DmaApiError, match="direction 2, mapped with 1"):
        dma_unmap_single(dev, dma, 64, DMA_FROM_DEVICE)
    with pytest.raises(DmaApiError, match="no such allocation or mapping"):
        dma_unmap_single(dev, dma + 4096, 64, DMA_TO_DEVICE)
    dma_unmap_single(dev, dma, 64, DMA_TO_DEVICE)


def test_scatter_gather_is_all_or_nothing(dev: DmaDevice) -> None:
    before = state(dev)
    with pytest.raises(DmaApiError, match="read-only"):
        dma_map_sg(dev, [bytearray(100), b"ro", bytearray(10)], DMA_FROM_DEVICE)
    assert state(dev) == before
    sg = dma_map_sg(dev, [bytearray(100), bytearray(5000)], DMA_BIDIRECTIONAL)
    assert [e.dma_length for e in sg] == [100, 5000]
    assert all(isinstance(e, SgEntry) for e in sg)
    with pytest.raises(DmaApiError, match="size 99"):
        dma_unmap_sg(dev, [SgEntry(sg[0].dma_address, 99), sg[1]], DMA_BIDIRECTIONAL)
    dma_unmap_sg(dev, sg, DMA_BIDIRECTIONAL)
    assert state(dev) == before


# -- dma_pool --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "align", "boundary"), [(64, 64, 0), (24, 8, 256), (4096, 4096, 0), (100, 4, 512)]
)
def test_dma_pool_blocks_are_aligned_and_never_cross_the_boundary(
    dev: DmaDevice, size: int, align: int, boundary: int
) -> None:
    pool = dma_pool_create("test", dev, size, align, boundary)
    blocks = [pool.alloc() for _ in range(200)]
    bound = pool.boundary
    assert len({b[1] for b in blocks}) == 200
    for vaddr, dma in blocks:
        assert dma % align == 0 and vaddr % align == 0
        assert dma // bound == (dma + pool.size - 1) // bound
        assert dma + pool.size - 1 <= dev.coherent_dma_mask
    for b in blocks:
        pool.free(*b)
    pool.destroy()


def test_dma_pool_refusals(dev: DmaDevice) -> None:
    with pytest.raises(ValueError, match="power of two"):
        dma_pool_create("bad", dev, 64, 3, 0)
    with pytest.raises(ValueError, match="at least the block size"):
        dma_pool_create("bad", dev, 512, 8, 256)
    pool = dma_pool_create("prp", dev, 64, 64, 0)
    vaddr, dma = pool.zalloc()
    assert ctypes.string_at(vaddr, 64) == bytes(64)
    with pytest.raises(DmaApiError, match="still out"):
        pool.destroy()
    pool.free(vaddr, dma)
    with pytest.raises(DmaApiError, match="double free"):
        pool.free(vaddr, dma)
    with pytest.raises(DmaApiError, match="not a block this pool has out"):
        pool.free(vaddr + 64, dma + 64)
    assert pool.blocks_out() == 0
    pool.destroy()


# -- the refill worker (pool.c's atomic_pool_work_fn) ---------------------------------------


@pytest.mark.parametrize("error", [RuntimeError("a bug"), UvdmaError("no memory")])
def test_a_failing_pool_neither_skips_the_others_nor_ends_the_worker(
    dev: DmaDevice,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    p = dev.dma_domain.pools
    real = p.pages.alloc_pages
    broken = {Zone.DMA}

    def alloc_pages(zone: Zone, order: int, limit: int = DMA_BIT_MASK(64)) -> DmaRegion | None:
        if zone in broken:
            raise error
        return real(zone, order, limit)

    monkeypatch.setattr(p.pages, "alloc_pages", alloc_pages)
    held = []
    for pool in (p.dma, p.dma32, p.kernel):  # every pool low: dma is refilled first
        assert pool is not None
        held.append((pool, pool.alloc(192 * KiB)))
    with caplog.at_level("WARNING", logger="uvdma.dma.pool"):
        p.schedule_work()
        assert p.flush(10)
    assert p.pool_size == {"dma": 256 * KiB, "dma32": 512 * KiB, "kernel": 512 * KiB}
    assert p.refill_errors == 1
    assert p.last_refill_error is not None
    assert f"refilling the dma atomic pool: {type(error).__name__}: {error}" in p.last_refill_error
    assert p.refill_stats() == {
        "expansions": 2,
        "refill_errors": 1,
        "last_refill_error": p.last_refill_error,
    }
    assert "refilling the dma atomic pool" in caplog.text  # reported, not swallowed
    worker = p._worker
    assert worker is not None and worker.is_alive()  # and the worker lives on
    broken.clear()  # the cause goes away: the next pass refills it
    p.schedule_work()
    assert p.flush(10)
    assert p.pool_size["dma"] == 512 * KiB and p.refill_errors == 1
    for pool, vaddr in held:
        pool.free(vaddr, 192 * KiB)
    p.close()
    assert not worker.is_alive()  # close() still stops it


# -- use after close ---------------------------------------------------------------------------


def test_after_close_a_dma_device_refuses_use_naming_it(
    fake: tuple[FakeKernel, VfioDevice],
) -> None:
    domain = DmaDomain(fake[1].domain, coherent_pool="256K")
    dev = DmaDevice(fake[1], domain, debug=True)
    cpu, dma = dma_alloc_coherent(dev, 4096)
    pool = dma_pool_create("prp", dev, 64)
    block = pool.alloc()
    assert len(dev.close()) == 2  # the leaks, reported
    assert dev.close() == []  # a second close does nothing
    buf = np.zeros(8192, dtype=np.uint8)
    for call in (
        lambda: dma_alloc_coherent(dev, 4096, GFP_KERNEL),
        lambda: dma_alloc_coherent(dev, 4096, GFP_ATOMIC),
        lambda: DmaBuffer(dev, 4096),
        lambda: dma_map_single(dev, buf, DMA_TO_DEVICE),
        lambda: dma_map_sg(dev, [buf], DMA_TO_DEVICE),
        lambda: dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64)),
        lambda: dma_pool_create("late", dev, 64),
        pool.alloc,
    ):
        with pytest.raises(ClosedError, match=r"DmaDevice 0000:00:09\.0 is closed"):
            call()
    # what it handed out can still be given back while the domain lives
    pool.free(*block)
    pool.destroy()
    pool.destroy()
    with pytest.raises(ClosedError, match="DmaPool 'prp' is destroyed"):
        pool.alloc()
    dma_free_coherent(dev, 4096, cpu, dma)
    domain.close()
    assert "memfd" not in fake[0].open_kinds()  # the DMA memory went with the domain


def test_the_default_domain_goes_with_its_last_device(
    fake: tuple[FakeKernel, VfioDevice],
) -> None:
    k, vd = fake
    a = DmaDevice(vd, coherent_pool="256K")
    b = DmaDevice(vd)  # the default path: the same DMA domain
    assert a.dma_domain is b.dma_domain
    cpu, dma = dma_alloc_coherent(b, 4096)
    a.close()
    assert not b.dma_domain.closed  # b still uses it
    dma_free_coherent(b, 4096, cpu, dma)
    held = dma_alloc_coherent(b, 4096)
    b.close()  # the last one: the domain closes, its memory with it
    assert a.dma_domain.closed and vd.domain.mappings() == []
    assert "memfd" not in k.open_kinds()
    with pytest.raises(ClosedError, match=r"its DMA domain is closed.*memory went with it"):
        dma_free_coherent(b, 4096, *held)
    c = DmaDevice(vd, coherent_pool="128K")  # a new default domain, a new size is fine
    assert c.dma_domain.atomic_pool_size == 128 * KiB
    c.close()


def test_a_second_coherent_pool_size_is_an_error_naming_the_fix(
    fake: tuple[FakeKernel, VfioDevice],
) -> None:
    vd = fake[1]
    a = DmaDevice(vd, coherent_pool="256K")
    b = DmaDevice(vd, coherent_pool=256 * KiB)  # the same size, written otherwise: fine
    with pytest.raises(DmaDomainError, match=r"made with 262144 bytes.*DmaDomain\(iommu_domain"):
        DmaDevice(vd, coherent_pool="1M")
    assert a.dma_domain.atomic_pool_size == 256 * KiB  # nothing changed
    with DmaDomain(vd.domain, coherent_pool="1M") as own:
        with pytest.raises(ValueError, match="belongs to the DmaDomain"):
            DmaDevice(vd, own, coherent_pool="1M")
        c = DmaDevice(vd, own)
        assert c.dma_domain.atomic_pool_size == MiB
        c.close()
    b.close()
    a.close()


def test_a_dma_domain_serves_only_devices_of_its_iommu_domain(
    fake: tuple[FakeKernel, VfioDevice],
) -> None:
    vd = fake[1]
    with new_domain("iommufd") as other, DmaDomain(other, coherent_pool="128K") as elsewhere:
        with pytest.raises(ValueError, match="over another IOMMU domain"):
            DmaDevice(vd, elsewhere)
        assert len(elsewhere.devices) == 0  # nothing was changed
    with pytest.raises(ClosedError, match="the IOMMU domain is closed"):
        DmaDomain(other)


def test_new_memory_is_asked_of_the_iommu_domain_with_the_masks_windows(
    fake: tuple[FakeKernel, VfioDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    # with no IOMMU the memory's physical address is its DMA address, so the backend places
    # the memory itself (NoIommuContainer.memory_for); the page allocator hands it the
    # windows cut at the device's mask
    vd = fake[1]
    asked: list[tuple[int, int]] = []
    real = vd.domain.memory_for

    def memory_for(size: int, windows: Sequence[tuple[int, int]]) -> HugeMemory:
        asked.append((size, max(hi for _lo, hi in windows)))
        return real(size, windows)

    monkeypatch.setattr(vd.domain, "memory_for", memory_for)
    dev = DmaDevice(vd, coherent_pool="128K")  # the pools: each its zone's windows
    assert sorted(top for _size, top in asked) == [DMA_BIT_MASK(n) for n in (24, 32, 64)]
    asked.clear()
    dma_set_coherent_mask(dev, DMA_BIT_MASK(32))
    cpu, dma = dma_alloc_coherent(dev, 4 * MiB)  # a region of its own: new memory
    assert asked == [(4 * MiB, DMA_BIT_MASK(32))]
    dma_free_coherent(dev, 4 * MiB, cpu, dma)
    dev.close()


def test_dma_domain_teardown_stops_the_pools_then_unmaps_then_frees(
    fake: tuple[FakeKernel, VfioDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    k, vd = fake
    domain = DmaDomain(vd.domain, coherent_pool="256K")
    dev = DmaDevice(vd, domain)
    dma_alloc_coherent(dev, 4 * MiB)  # a region of its own, still out at close
    order: list[str] = []
    real_pools_close, real_pages_close = domain.pools.close, domain.pages.close

    def pools_close() -> None:
        order.append("pools")
        real_pools_close()

    def pages_close() -> None:
        order.append("pages")
        real_pages_close()

    monkeypatch.setattr(domain.pools, "close", pools_close)
    monkeypatch.setattr(domain.pages, "close", pages_close)
    k.calls.clear()
    domain.close()
    assert order == ["pools", "pages"]  # the refill worker stops before memory goes
    unmaps = [i for i, c in enumerate(k.calls) if c == "ioctl VFIO_IOMMU_UNMAP_DMA"]
    # memory goes by munmap, or retired in place (mmap_fixed: stale views read zeros)
    munmaps = [i for i, c in enumerate(k.calls) if c in ("munmap", "mmap_fixed")]
    assert len(unmaps) == len(munmaps) == 4  # three pools' chunks and the 4 MiB region
    assert all(u < m for u, m in zip(unmaps, munmaps, strict=True))  # IOMMU first, then memory
    assert vd.domain.mappings() == [] and not vd.domain.closed  # the IOMMU domain is the caller's
    with pytest.raises(ClosedError, match="its DMA domain is closed"):
        dma_alloc_coherent(dev, 4096)
    domain.close()  # idempotent
    dev.close()


def test_a_dma_device_on_a_closed_vfio_device_is_refused(
    fake: tuple[FakeKernel, VfioDevice],
) -> None:
    fake[1].close()
    with pytest.raises(ClosedError, match=r"DmaDevice\(0000:00:09\.0\): VfioDevice .* is closed"):
        DmaDevice(fake[1])


def test_closing_the_vfio_device_leaves_every_dma_object_refusing_never_crashing(
    fake: tuple[FakeKernel, VfioDevice],
) -> None:
    k, vd = fake
    dev = DmaDevice(vd, coherent_pool="256K")
    dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64))
    buf = DmaBuffer(dev, 8192)
    array = np.zeros(8192, dtype=np.uint8)
    handle = dma_map_single(dev, array, DMA_FROM_DEVICE)  # bounced
    pool = dma_pool_create("prp", dev, 4096)
    pool.free(*pool.alloc())  # a free block waits in the pool
    atomic = dma_alloc_coherent(dev, 4096, GFP_ATOMIC)
    vd.close()  # the device's own IOMMU domain goes with it: everything is unmapped
    assert k.open_kinds() == ["memfd"] * 3  # host memory: the DMA domain's, until it closes
    assert vd.domain.mappings() == []
    with pytest.raises(ClosedError, match=r"VfioDevice 0000:00:09\.0 is closed"):
        dma_alloc_coherent(dev, 4096, GFP_KERNEL)
    with pytest.raises(ClosedError, match=r"VfioDevice 0000:00:09\.0 is closed"):
        dma_alloc_coherent(dev, 4096, GFP_ATOMIC)  # would write zeros into unmapped memory
    with pytest.raises(ClosedError, match=r"VfioDevice 0000:00:09\.0 is closed"):
        pool.alloc()  # would hand out a block of unmapped memory
    with pytest.raises(ClosedError, match="memory went with it"):
        pool.free(0x1000, 0x1000)
    with pytest.raises(ClosedError, match="memory went with it"):
        buf.cpu  # noqa: B018 - the property is the use
    with pytest.raises(ClosedError, match="memory went with it"):
        dma_sync_single_for_cpu(dev, handle, 8192, DMA_FROM_DEVICE)  # would copy from it
    with pytest.raises(ClosedError, match="memory went with it"):
        dma_unmap_single(dev, handle, 8192, DMA_FROM_DEVICE)
    with pytest.raises(ClosedError, match="memory went with it"):
        dma_free_coherent(dev, 4096, *atomic)
    buf.free()  # nothing left to free: not an error
    assert buf.freed
    pool.destroy()
    assert pool.destroyed
    dev.close()  # the last default-path device: the DMA domain frees its memory
    assert k.open_kinds() == []


def test_a_view_kept_past_close_reads_zeros_never_crashes(
    fake: tuple[FakeKernel, VfioDevice],
) -> None:
    """A numpy array taken from a DmaBuffer outlives the buffer, the device and the DMA domain:
    the memory under it is retired in place (inert zeros), not unmapped (SIGSEGV).  The
    memory itself is given back: its memfd is closed."""
    k, vd = fake
    dev = DmaDevice(vd, coherent_pool="256K")
    buf = DmaBuffer(dev, 8192)
    stale = buf.array()
    stale[:] = 0x5A
    vd.close()
    dev.close()
    assert k.open_kinds() == []  # every memfd closed: the pages went back
    assert k.retired  # the ranges were retired, not unmapped
    assert int(stale.sum()) == 0  # reads the inert memory: zeros, and the process lives
    stale[0] = 1  # a write lands in inert memory too


# -- allocations that cannot be satisfied ----------------------------------------------------------


def machine(total: int, available: int, **kw: int | bool) -> hugepages.MemoryStatus:
    fields: dict[str, int | bool] = {
        "total": total,
        "available": available,
        "locked": 0,
        "lock_limit": -1,
        "may_lock_all": True,
    }
    fields.update(kw)
    return hugepages.MemoryStatus(**fields)  # type: ignore[arg-type]


def test_impossible_allocations_raise_before_any_memory_is_touched(
    fake: tuple[FakeKernel, VfioDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    k, vd = fake
    dev = DmaDevice(vd, coherent_pool="256K")
    # a small machine: 256 MiB, 200 MiB of it available, 64 free 2 MiB hugepages
    monkeypatch.setattr(hugepages, "memory_status", lambda: machine(256 * MiB, 200 * MiB))
    counting = CountingKernel(k)
    before = state(dev)
    with _sys.use_kernel(counting):
        # larger than the zones a 32-bit mask allows: refused before anything is asked for
        with pytest.raises(DmaAllocError, match=r"within mask 0xffffffff"):
            dma_alloc_coherent(dev, 5 << 30)
        assert counting.calls == {}
        # larger than the free hugepages and the available memory
        dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64))
        with pytest.raises(DmaAllocError, match=r"more than this machine can give"):
            dma_alloc_coherent(dev, 512 * MiB)
        assert "mlock" not in counting.calls  # no 4 KiB memory was made, let alone touched
        with pytest.raises(DmaAllocError, match=r"bounce memory: .*more than this machine"):
            dma_map_single(dev, np.zeros(300 * MiB + 1, dtype=np.uint8), DMA_TO_DEVICE)
    assert state(dev) == before  # nothing was left behind
    # and memory is still usable after
    cpu, dma = dma_alloc_coherent(dev, 4 * MiB)
    dma_free_coherent(dev, 4 * MiB, cpu, dma)
    dev.close()


def test_an_allocation_past_rlimit_memlock_says_how_much_is_locked(
    fake: tuple[FakeKernel, VfioDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    _k, vd = fake
    dev = DmaDevice(vd, coherent_pool="256K")
    status = machine(8 << 30, 6 << 30, lock_limit=8 * MiB, locked=6 * MiB, may_lock_all=False)
    monkeypatch.setattr(hugepages, "memory_status", lambda: status)
    monkeypatch.setattr(hugepages, "lock_limited", lambda: True)
    before = state(dev)
    with pytest.raises(
        DmaAllocError,
        match=r"RLIMIT_MEMLOCK is 8388608 bytes and this process has already locked 6291456 "
        r"bytes \(VmLck .*VFIO has pinned.*ulimit -l",
    ):
        dma_alloc_coherent(dev, 4 * MiB)
    assert state(dev) == before
    dev.close()


def test_only_1g_hugepages_free_are_used_before_4k_pages(
    fake: tuple[FakeKernel, VfioDevice],
) -> None:
    k, vd = fake
    k.free_hugepages = {2 * MiB: 0, 1 << 30: 1}
    dev = DmaDevice(vd, coherent_pool="256K")
    dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64))
    assert k.free_hugepages[1 << 30] == 0  # the kernel pool's first chunk took the 1G page
    assert dev.dma_domain.pages.mapped_bytes()["NORMAL"] == 1 << 30  # all of it, to carve
    mapped = dev.dma_domain.pages.mapped_bytes()
    held = [dma_alloc_coherent(dev, 2 * MiB) for _ in range(8)]  # from the same page
    assert dev.dma_domain.pages.mapped_bytes() == mapped
    for cpu, dma in held:
        dma_free_coherent(dev, 2 * MiB, cpu, dma)
    dev.close()


def test_two_threads_share_a_device_its_pool_and_the_atomic_pools(dev: DmaDevice) -> None:
    dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64))
    pool = dma_pool_create("prp", dev, 4096)
    held: list[list[tuple[str, int, int]]] = [[], []]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(300):
                if i % 3 == 0:
                    cpu, dma = pool.alloc()
                    held[k].append(("pool", cpu, dma))
                else:
                    gfp = GFP_ATOMIC if i % 3 == 1 else GFP_KERNEL
                    cpu, dma = dma_alloc_coherent(dev, 4096, gfp)
                    held[k].append(("coherent", cpu, dma))
                if i % 5 == 4:  # give some back as we go
                    kind, cpu, dma = held[k].pop(0)
                    if kind == "pool":
                        pool.free(cpu, dma)
                    else:
                        dma_free_coherent(dev, 4096, cpu, dma)
        except BaseException as e:  # the test reports it
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    blocks = sorted(dma for h in held for _, _, dma in h)
    assert len(blocks) == len(set(blocks))  # nobody got a block twice
    assert all(b - a >= 4096 for a, b in itertools.pairwise(blocks))
    assert dev.dma_domain.pools.flush(10)
    for h in held:
        for kind, cpu, dma in h:
            if kind == "pool":
                pool.free(cpu, dma)
            else:
                dma_free_coherent(dev, 4096, cpu, dma)
    pool.destroy()


def test_mapping_new_memory_reads_no_proc_file_when_no_limit_applies(
    fake: tuple[FakeKernel, VfioDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no(*_a: object) -> hugepages.MemoryStatus:
        raise AssertionError("read /proc on the mapping path")

    monkeypatch.setattr(hugepages, "lock_limited", lambda: False)
    monkeypatch.setattr(hugepages, "memory_status", no)
    dev = DmaDevice(fake[1], coherent_pool="256K")
    cpu, dma = dma_alloc_coherent(dev, 4 * MiB)  # a mapping of its own
    dma_free_coherent(dev, 4 * MiB, cpu, dma)
    dev.close()


@pytest.mark.parametrize("size", [1 << 40, 1 << 64, 1 << 70])
def test_absurd_sizes_are_an_error_not_a_crash(dev: DmaDevice, size: int) -> None:
    dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64))
    before = state(dev)
    for call in (
        lambda: dma_alloc_coherent(dev, size),
        lambda: dma_alloc_coherent(dev, size, GFP_ATOMIC),
        lambda: DmaBuffer(dev, size),
    ):
        with pytest.raises(DmaAllocError):
            call()
    with pytest.raises((DmaAllocError, ValueError)):
        dma_pool_create("huge", dev, size).alloc()
    assert state(dev) == before
