"""The same claims on every IOMMU backend, and what only one backend has.

Run in three guests by ``tools/test`` (docs/test-vm.md): Debian's stock kernel proves type1;
uvdma's built kernel proves iommufd + VFIO cdev (emulated VT-d) and VFIO's no-IOMMU mode
(no IOMMU at all).  Tests taking the ``backend`` fixture make the same claim on each (the
id names the backend); ``@pytest.mark.backends(...)`` tests are for the backends named.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import runpy
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import nvme_by_hand as nvme
from uvdma import doctor, pci
from uvdma.errors import IovaExhaustedError, NoIommuWarning, PciError, UvdmaError
from uvdma.memory import HugeMemory, allocate, physical_address
from uvdma.memory.hugepages import PAGE_2M
from uvdma.vfio import VfioDevice, new_domain, open_device
from uvdma.vfio.device import backend_choice
from uvdma.vfio.faults import IommuFaultLog
from uvdma.vfio.iommufd import IommufdDomain
from uvdma.vfio.iova import MSI_WINDOW
from uvdma.vfio.noiommu import NoIommuContainer, memory_above

pytestmark = [pytest.mark.vm, pytest.mark.backends()]

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
ROOT = Path(__file__).resolve().parents[2]


def controllers() -> list[pci.PciDevice]:
    return pci.nvme_controllers()


def quietly_open(address: object, **kw: object) -> VfioDevice:
    """open_device without the no-IOMMU warning (tests that check it say so)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoIommuWarning)
        return open_device(address, **kw)  # type: ignore[arg-type]


@pytest.fixture
def dev(backend: str) -> Iterator[VfioDevice]:
    with quietly_open(controllers()[0].address, backend=backend) as d:
        yield d


def memory(dev: VfioDevice, limit: int = U64) -> HugeMemory:
    """2 MiB of DMA memory the device can reach below ``limit``: with no IOMMU the memory
    itself must lie there (placement); with one, any hugepage will do (the IOVA is chosen)."""
    if isinstance(dev.domain, NoIommuContainer):
        return dev.domain.alloc_below(PAGE_2M, limit)
    return allocate(PAGE_2M)


def placement(v: int, i: int, data: int | None = None) -> nvme.Placement:
    d = i + 8192 if data is None else data
    return nvme.Placement(sq=(v, i), cq=(v + 4096, i + 4096), data=(v + 8192, d))


# -- the same claim on every backend -------------------------------------------------------------


def test_auto_picks_this_tiers_backend_and_says_why(backend: str) -> None:
    address = controllers()[0].address
    choice = backend_choice("auto", address)
    assert choice.backend == backend, choice.reason
    with quietly_open(address) as d:
        assert d.backend == backend
        assert d.backend_reason == choice.reason
    expected = {"type1": "no iommufd", "iommufd": "/dev/vfio/devices/vfio", "noiommu": "no IOMMU"}
    assert expected[backend] in choice.reason


@pytest.mark.parametrize("bits", [64, 32])
def test_the_device_dmas_into_memory_mapped_under_a_mask(
    dev: VfioDevice, backend: str, bits: int
) -> None:
    mask = (1 << bits) - 1
    if backend == "noiommu" and bits == 32 and ram_above_4g():
        pool_above_4g_only()  # every free hugepage above 4 GiB: placement must act
    with memory(dev, mask) as mem:
        m = dev.domain.map_memory(mem, windows=[(0, mask)])
        try:
            assert m.iova + m.size - 1 <= mask
            if backend == "noiommu":
                assert m.iova == physical_address(mem.vaddr)  # the device sees RAM directly
            data = nvme.identify_controller(dev, placement(mem.vaddr, m.iova))
            assert data[4:24].decode().strip() == "uvdma0000"  # SN, DMA'd by the device
            nvme.disable(dev)
        finally:
            dev.domain.unmap(m)


def test_msix_eventfd_fires_for_the_completion(dev: VfioDevice) -> None:
    fds = dev.enable_irqs(1)
    assert len(fds) == 1
    with pytest.raises(TimeoutError, match="vector 0"):
        dev.wait_irq(0, 0.05)
    with memory(dev) as mem:
        m = dev.domain.map_memory(mem)
        nvme.identify_controller(dev, placement(mem.vaddr, m.iova))
        assert dev.wait_irq(0, 10.0) >= 1
        nvme.disable(dev)
        dev.domain.unmap(m)
    dev.disable_irqs()


@pytest.mark.parametrize("bits", [64, 32])
def test_the_nvme_example_writes_reads_and_verifies_under_a_mask(
    backend: str, bits: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The program itself (its main, as `python rw.py` runs it), in this process: a second
    # interpreter costs 40-90 s of imports over 9p in the stock guest.
    bdf = str(controllers()[0].address)
    args = ["--device", bdf, "--mask-bits", str(bits), "--lba", "64", "--blocks", "256"]
    monkeypatch.setattr(sys, "argv", ["rw.py", *args])
    # no IOMMU: each map (DMA address, size, pagemap's address, top of the windows asked
    # for), and each DMA address the driver checks before handing it to the device
    mapped: list[tuple[int, int, int, int]] = []
    used: list[int] = []
    if backend == "noiommu":
        if bits == 32 and ram_above_4g():  # else every address fits anyway
            pool_above_4g_only()  # every free hugepage above 4 GiB: placement must act
        real_map, real_at = NoIommuContainer.map, NoIommuContainer.mapping_at

        def spy_map(self: NoIommuContainer, vaddr: int, size: int, *a: Any, **kw: Any) -> Any:
            m = real_map(self, vaddr, size, *a, **kw)
            top = max(hi for _lo, hi in kw.get("windows", [(0, U64)]))
            mapped.append((m.iova, m.size, physical_address(vaddr), top))
            return m

        def spy_at(self: NoIommuContainer, iova: int) -> Any:
            used.append(iova)
            return real_at(self, iova)

        monkeypatch.setattr(NoIommuContainer, "map", spy_map)
        monkeypatch.setattr(NoIommuContainer, "mapping_at", spy_at)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(ROOT / "examples/nvme/rw.py"), run_name="__main__")
    out, err = capsys.readouterr()
    assert done.value.code == 0, out + err
    assert "verified: 256 LBAs" in out
    told = [w for w in seen if issubclass(w.category, NoIommuWarning)]
    if backend == "noiommu":  # and the user was told that nothing protected the machine
        assert told and "no IOMMU protects memory" in str(told[0].message)
        # each piece of memory lies where the DMA layer asked (its zone, the mask)
        assert mapped and all(iova == phys for iova, _size, phys, _top in mapped)
        assert all(iova + size - 1 <= top for iova, size, _phys, top in mapped), mapped
        if bits == 32:  # the device's memory was placed below 4 GiB, and its I/O went there
            assert any(top <= U32 for *_m, top in mapped), mapped
            assert used and all(iova <= U32 for iova in used), [hex(i) for i in used]
    else:
        assert not told


def test_a_stray_dma_is_blocked_by_the_iommu_or_the_user_is_warned(
    backend: str,
) -> None:
    address = controllers()[0].address
    if backend == "noiommu":
        # nothing can block it: opening the device says so, once, loudly
        with pytest.warns(NoIommuWarning, match="a stray DMA corrupts the machine"):
            d = open_device(address)
        d.close()
        return
    with open_device(address, backend=backend) as d, allocate(PAGE_2M) as mem:
        m = d.domain.map(mem.vaddr, 8192)  # the queues only; the data page is not mapped
        stray = m.iova + 8192
        assert d.domain.translate(stray) is None
        with IommuFaultLog(d.address) as log:
            # a controller may report the failed transfer; QEMU 7.2's says success
            with contextlib.suppress(RuntimeError):
                nvme.identify_controller(d, placement(mem.vaddr, m.iova, stray), timeout=10)
            faults = log.faults(wait=10)
        assert faults and faults[0].iova >> 12 == stray >> 12 and faults[0].kind == "Write"
        assert ctypes.string_at(mem.vaddr + 8192, 16) == b"\xa5" * 16  # nothing landed in RAM
        nvme.disable(d)
        d.domain.unmap(m)


def test_doctor_reports_the_backend_and_the_mode(
    backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bdf = str(controllers()[0].address)
    code = doctor.main(bdf)  # what `uvdma doctor BDF` runs (tests/vm/test_cli.py runs the CLI)
    out = capsys.readouterr().out
    assert f"backend: {backend} (" in out, out
    assert f"{bdf} backend: {backend} (" in out, out
    if backend == "noiommu":
        assert "mode: no-IOMMU, UNPROTECTED" in out
        assert f"{bdf} opens with no IOMMU: DMA addresses are physical" in out
        assert "VFIO's unsafe no-IOMMU mode is on" in out
    else:
        assert "mode: IOMMU-protected" in out
        assert f"usable IOVA ranges ({backend}):" in out
        assert code == 0, out


# -- iommufd + VFIO cdev only ----------------------------------------------------------------


@pytest.mark.backends("iommufd")
def test_each_bound_controller_has_its_cdev_in_dev_vfio_devices() -> None:
    for c in controllers():
        names = [p.name for p in (c.path / "vfio-dev").iterdir()]
        assert len(names) == 1 and names[0].startswith("vfio")
        node = Path("/dev/vfio/devices") / names[0]
        major, minor = (c.path / "vfio-dev" / names[0] / "dev").read_text().split(":")
        assert os.stat(node).st_rdev == os.makedev(int(major), int(minor))


@pytest.mark.backends("iommufd")
def test_the_ioas_reports_its_ranges_and_options() -> None:
    with open_device(controllers()[0].address, backend="iommufd") as d:
        domain = d.domain
        assert isinstance(domain, IommufdDomain)
        ranges = domain.iova_ranges()  # IOMMU_IOAS_IOVA_RANGES, after the attach
        for start, last in ranges:
            assert last < MSI_WINDOW.start or start > MSI_WINDOW.last
        assert max(last for _s, last in ranges) == (1 << 39) - 1  # QEMU VT-d: 39-bit
        assert domain.min_page_size() == 4096
        assert domain.options() == {"huge_pages": 1, "rlimit_mode": 0}


@pytest.mark.backends("iommufd")
def test_a_fixed_iova_map_is_used_and_its_unmap_really_blocks() -> None:
    iova = 0x40_0000_0000  # above 4 GiB, fixed by us (IOMMU_IOAS_MAP_FIXED_IOVA)
    with open_device(controllers()[0].address, backend="iommufd") as d, allocate(PAGE_2M) as mem:
        m = d.domain.map(mem.vaddr, PAGE_2M, iova)
        assert m.iova == iova
        data = nvme.identify_controller(d, placement(mem.vaddr, iova))
        assert data[4:24].decode().strip() == "uvdma0000"
        nvme.disable(d)
        d.domain.unmap(m)
        queues = d.domain.map(mem.vaddr, 8192)  # somewhere else now
        with IommuFaultLog(d.address) as log:
            with contextlib.suppress(RuntimeError):
                nvme.identify_controller(d, placement(mem.vaddr, queues.iova, iova + 8192))
            faults = log.faults(wait=10)
        assert faults and faults[0].iova >> 12 == (iova + 8192) >> 12
        nvme.disable(d)
        d.domain.unmap(queues)


@pytest.mark.backends("iommufd")
def test_two_controllers_share_one_ioas_and_one_leaving_keeps_the_other() -> None:
    a, b = controllers()[:2]
    with new_domain("iommufd") as domain, allocate(PAGE_2M) as mem:
        assert isinstance(domain, IommufdDomain)
        da = open_device(a.address, domain=domain)
        db = open_device(b.address, domain=domain)
        m = domain.map(mem.vaddr, PAGE_2M)
        for k, d in enumerate((da, db)):
            base = k * 64 * 1024
            out = nvme.identify_controller(d, placement(mem.vaddr + base, m.iova + base))
            assert out[4:24].decode().strip() == f"uvdma{k:04d}"
            nvme.disable(d)
        da.close()  # detached from the IOAS, cdev closed; the IOAS and b stay
        out = nvme.identify_controller(db, placement(mem.vaddr, m.iova))
        assert out[4:24].decode().strip() == "uvdma0001"
        nvme.disable(db)
        db.close()
        domain.unmap(m)


@pytest.mark.backends("iommufd")
def test_type1_still_works_beside_iommufd_on_the_built_kernel() -> None:
    with open_device(controllers()[0].address, backend="type1") as d, allocate(PAGE_2M) as mem:
        m = d.domain.map_memory(mem)
        out = nvme.identify_controller(d, placement(mem.vaddr, m.iova))
        assert out[4:24].decode().strip() == "uvdma0000"
        nvme.disable(d)
        d.domain.unmap(m)


# -- no-IOMMU mode only -----------------------------------------------------------------------


@pytest.mark.backends("noiommu")
def test_no_iommu_groups_and_an_iommu_backend_is_refused_clearly() -> None:
    c = controllers()[0]
    assert c.iommu_group is not None
    assert (Path("/sys/kernel/iommu_groups") / str(c.iommu_group) / "name").read_text().strip() == (
        "vfio-noiommu"
    )
    assert Path(f"/dev/vfio/noiommu-{c.iommu_group}").exists()
    with pytest.raises(PciError, match="no-IOMMU group"):
        open_device(c.address, backend="type1")
    with pytest.warns(NoIommuWarning):
        open_device(c.address).close()
    log = subprocess.run(["dmesg"], check=True, capture_output=True, text=True).stdout
    assert "vfio-noiommu device opened by user" in log  # the kernel says so too


@pytest.mark.backends("noiommu")
def test_placement_below_an_impossible_limit_is_a_clear_error(dev: VfioDevice) -> None:
    domain = dev.domain
    assert isinstance(domain, NoIommuContainer)
    before = pool()
    with pytest.raises(
        IovaExhaustedError,
        match=r"below 0x1fffff: \d+ free hugepage.*the pool was not grown: reaching below "
        r"it means first taking the \d+ MiB free above it, more than this machine can spare",
    ):
        domain.alloc_below(PAGE_2M, PAGE_2M - 1)  # no hugepage starts at physical 0
    assert pool() == before  # every page probed went back, and nothing was grown
    with allocate(PAGE_2M) as mem:
        phys = physical_address(mem.vaddr)
        with pytest.raises(IovaExhaustedError, match="no IOMMU can remap it"):
            domain.map_memory(mem, windows=[(0, phys - 1)])
        assert domain.mappings() == []


def ram_above_4g() -> bool:
    """Whether the guest has RAM above 4 GiB (``uvdma vm run --memory 3G`` or more)."""
    for line in Path("/proc/iomem").read_text().splitlines():
        if line.strip().endswith(": System RAM"):
            last = int(line.split(":")[0].split("-")[1], 16)
            if last > U32:
                return True
    return False


def free_hugepages_where() -> list[int]:
    """The physical address of every free 2 MiB hugepage, in the order the kernel hands them
    out (each is taken and held until all are, then all go back)."""
    held: list[HugeMemory] = []
    try:
        with contextlib.suppress(UvdmaError):
            while len(held) < 4096:
                held.append(allocate(PAGE_2M, PAGE_2M, fallback=False))
        return [physical_address(m.vaddr) for m in held]
    finally:
        for m in held:
            m.close()


POOL = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


def pool() -> tuple[int, int]:
    """(nr_hugepages, free_hugepages) of the 2 MiB pool."""
    return int((POOL / "nr_hugepages").read_text()), int((POOL / "free_hugepages").read_text())


def pool_above_4g_only() -> None:
    """Make the 2 MiB pool afresh, as at boot, and check that placement must act: RAM above
    4 GiB and every free hugepage there (the kernel hands out hugepages from the highest
    memory first; a page an earlier test placed below 4 GiB would otherwise stay in the
    pool and meet a 32-bit mask by itself)."""
    if not ram_above_4g():
        pytest.skip("all RAM is below 4 GiB in this guest (tools/test gives it --memory 3G)")
    nr = POOL / "nr_hugepages"
    count = int(nr.read_text())
    nr.write_text("0")  # pages in use stay (as surplus) until they are freed
    nr.write_text(str(count))
    where = free_hugepages_where()
    assert where and all(p > U32 for p in where), (
        "free hugepages below 4 GiB right after the pool was made: a 32-bit mask would be "
        f"met without placement: {[hex(p) for p in where if p <= U32]}"
    )


@pytest.fixture
def above_4g_only(dev: VfioDevice) -> None:
    """A guest where placement must act (see :func:`pool_above_4g_only`)."""
    pool_above_4g_only()


@pytest.mark.backends("noiommu")
def test_a_32_bit_mask_is_met_by_growing_the_pool_until_pages_lie_below_4_gib(
    dev: VfioDevice, above_4g_only: None
) -> None:
    domain = dev.domain
    assert isinstance(domain, NoIommuContainer)
    before = pool()
    with pytest.raises(IovaExhaustedError, match=r"below 0xffffffff: \d+ free hugepage"):
        domain.alloc_below(PAGE_2M, U32, grow=False)  # every free page lies above 4 GiB
    assert pool() == before
    start = time.monotonic()
    with domain.alloc_below(PAGE_2M, U32) as mem:  # grows the pool for the search
        took = time.monotonic() - start
        phys = physical_address(mem.vaddr)
        assert phys + PAGE_2M - 1 <= U32  # pagemap: below 4 GiB
        assert pool() == (before[0], before[1] - 1)  # shrunk back; the page kept is one of it
        m = domain.map_memory(mem, windows=[(0, U32)])
        assert m.iova == phys
        out = nvme.identify_controller(dev, placement(mem.vaddr, m.iova))
        assert out[4:24].decode().strip() == "uvdma0000"  # the device reached it there
        nvme.disable(dev)
        domain.unmap(m)
    assert pool() == before
    print(f"alloc_below(2M, 4 GiB) grew the pool and found {phys:#x} in {took:.2f} s")


@pytest.mark.backends("noiommu")
def test_a_32_bit_mask_is_met_from_a_pool_with_pages_on_both_sides(
    dev: VfioDevice, above_4g_only: None
) -> None:
    domain = dev.domain
    assert isinstance(domain, NoIommuContainer)
    nr = Path("/proc/sys/vm/nr_hugepages")
    before = int(nr.read_text())
    above = memory_above(U32)
    assert above is not None
    nr.write_text(str(before + above // PAGE_2M + 64))  # more than fits above 4 GiB
    try:
        where = free_hugepages_where()
        assert any(p > U32 for p in where) and any(p + PAGE_2M - 1 <= U32 for p in where)
        grown = pool()
        with domain.alloc_below(PAGE_2M, U32, grow=False) as mem:  # found in the pool
            phys = physical_address(mem.vaddr)
            assert phys + PAGE_2M - 1 <= U32 and phys in where
            assert pool() == (grown[0], grown[1] - 1)  # nothing grown, only that page kept
            m = domain.map_memory(mem, windows=[(0, U32)])
            out = nvme.identify_controller(dev, placement(mem.vaddr, m.iova))
            assert out[4:24].decode().strip() == "uvdma0000"
            nvme.disable(dev)
            domain.unmap(m)
        with domain.alloc_below(PAGE_2M, U64) as mem:  # no limit: any page will do
            assert physical_address(mem.vaddr) in where
        assert pool() == grown
    finally:
        nr.write_text(str(before))
