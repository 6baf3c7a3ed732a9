"""VFIO against the real kernel in the guest: registers, DMA into each zone, MSI-X,
a shared container, and the faults a user meets (each leaving things working)."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import nvme_by_hand as nvme
from uvdma import pci
from uvdma.dma import DmaDomain
from uvdma.dma.zones import Zone, zone_windows
from uvdma.errors import (
    HugepagesUnavailableError,
    IovaExhaustedError,
    PciError,
    UvdmaOSError,
)
from uvdma.memory import HugeMemory, allocate
from uvdma.memory.hugepages import PAGE_1G, PAGE_2M
from uvdma.vfio import DmaMapError, Type1Container, VfioDevice, new_domain, open_device

pytestmark = pytest.mark.vm

MiB = 1 << 20


def controllers() -> list[pci.PciDevice]:
    return pci.nvme_controllers()


@pytest.fixture
def dev() -> Iterator[VfioDevice]:
    with open_device(controllers()[0].address) as d:
        yield d


def open_fds() -> set[str]:
    """What this process has open (the directory listing's own fd comes and goes)."""
    out: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            continue
    return out


@pytest.mark.backends("type1")
def test_backend_is_type1_in_the_debian_guest(dev: VfioDevice) -> None:
    # No CONFIG_IOMMUFD in Debian's kernels: auto picks type1 (see docs/vfio.md).
    assert not Path("/dev/iommu").exists()
    assert dev.backend == "type1"
    assert isinstance(dev.domain, Type1Container)


def test_cap_and_vs_read_through_bar0(dev: VfioDevice) -> None:
    bar = dev.bar(0)
    cap = bar.read64(nvme.CAP)
    assert cap & 0xFFFF == 2047  # MQES: QEMU's default 2048-entry queues
    assert (cap >> 32) & 0xF == 0  # DSTRD
    assert (cap >> 37) & 1  # CSS: NVM command set
    assert bar.read32(nvme.VS) == 0x00010400  # NVMe 1.4
    assert bar.size >= 16 * 1024
    with pytest.raises(ValueError, match="aligned and inside"):
        bar.read32(bar.size)


def test_config_space_and_capabilities(dev: VfioDevice) -> None:
    assert dev.config_read(0x00, 2) == 0x1B36  # vendor: Red Hat (QEMU)
    assert dev.config_read(0x0A, 2) == 0x0108  # class: NVM controller
    caps = dev.capabilities()
    assert 0x11 in caps  # MSI-X
    msix_table_size = (dev.config_read(caps[0x11] + 2, 2) & 0x7FF) + 1
    assert dev.irq_info(2).count == msix_table_size


@pytest.mark.backends("type1")
def test_iommu_reports_ranges_without_the_msi_window(dev: VfioDevice) -> None:
    domain = dev.domain
    assert isinstance(domain, Type1Container)
    info = domain.info()
    assert info.page_sizes & 4096
    for start, last in info.iova_ranges:
        assert last < 0xFEE00000 or start > 0xFEEFFFFF
    assert info.dma_avail is not None and info.dma_avail > 60000
    assert domain.iova.ranges[0][0] == 4096  # page 0 never handed out


@pytest.mark.parametrize("zone", [Zone.DMA, Zone.DMA32, Zone.NORMAL])
def test_device_dmas_into_memory_mapped_in_each_zone(dev: VfioDevice, zone: Zone) -> None:
    with allocate(PAGE_2M) as mem:
        mapping = dev.domain.map(mem.vaddr, mem.size, windows=zone_windows(zone), align=PAGE_2M)
        try:
            assert mapping.iova + mapping.size - 1 <= zone.last
            if zone is not Zone.DMA:
                assert mapping.iova >= zone.start  # the zone's own window, not a fallback
            v, i = mem.vaddr, mapping.iova
            data = nvme.identify_controller(
                dev, nvme.Placement(sq=(v, i), cq=(v + 4096, i + 4096), data=(v + 8192, i + 8192))
            )
            assert data[0:2] == b"\x36\x1b"  # VID
            assert data[4:24].decode().strip().startswith("uvdma")  # SN from `uvdma vm run`
            assert data[24:64].decode().strip() == "QEMU NVMe Ctrl"
            nvme.disable(dev)
        finally:
            dev.domain.unmap(mapping)


def test_msix_eventfd_fires_for_the_completion(dev: VfioDevice) -> None:
    fds = dev.enable_irqs(1)
    assert len(fds) == 1
    with pytest.raises(TimeoutError, match="vector 0"):
        dev.wait_irq(0, 0.05)  # nothing yet
    with allocate(PAGE_2M) as mem:
        m = dev.domain.map(mem.vaddr, mem.size)
        v, i = mem.vaddr, m.iova
        nvme.identify_controller(
            dev, nvme.Placement((v, i), (v + 4096, i + 4096), (v + 8192, i + 8192))
        )
        assert dev.wait_irq(0, 5.0) >= 1
        nvme.disable(dev)
        dev.domain.unmap(m)
    dev.disable_irqs()


@pytest.mark.backends("type1")
def test_two_controllers_in_two_groups_share_one_container() -> None:
    a, b = controllers()[:2]
    assert a.iommu_group != b.iommu_group
    with new_domain("type1") as domain:
        assert isinstance(domain, Type1Container)
        with (
            allocate(PAGE_2M) as mem,
            open_device(a.address, domain=domain) as da,
            open_device(b.address, domain=domain) as db,
        ):
            assert {g.number for g in domain.groups} == {a.iommu_group, b.iommu_group}
            m = domain.map(mem.vaddr, mem.size, windows=zone_windows(Zone.DMA32))
            v, i = mem.vaddr, m.iova
            # one mapping serves both devices: each DMAs its own Identify data into it
            for k, d in enumerate((da, db)):
                base = k * 64 * 1024
                out = nvme.identify_controller(
                    d,
                    nvme.Placement(
                        (v + base, i + base),
                        (v + base + 4096, i + base + 4096),
                        (v + base + 8192, i + base + 8192),
                    ),
                )
                assert out[4:24].decode().strip() == f"uvdma{k:04d}"
                nvme.disable(d)
            domain.unmap(m)


# -- faults: a clear error, nothing leaked, what was there still works ----------------------


def test_device_not_bound_to_vfio_pci_is_refused() -> None:
    target = controllers()[-1]
    pci.unbind(target.address)
    try:
        before = open_fds()
        with pytest.raises(PciError, match=r"bound to nvme, not vfio-pci: `uvdma bind"):
            open_device(target.address)
        assert open_fds() == before
    finally:
        pci.bind(target.address)


def test_absent_and_malformed_addresses() -> None:
    with pytest.raises(PciError, match=r"no PCI device at 0000:00:1e\.0"):
        open_device("00:1e.0")
    with pytest.raises(PciError, match="not a PCI address"):
        open_device("nvme0")


def test_overlapping_map_and_unknown_unmap_are_refused(dev: VfioDevice) -> None:
    with allocate(2 * PAGE_2M) as mem:
        m = dev.domain.map(mem.vaddr, PAGE_2M)
        with pytest.raises(DmaMapError, match="overlaps"):
            dev.domain.map(mem.vaddr + PAGE_2M, PAGE_2M, iova=m.iova + 4096)
        other = dev.domain.map(mem.vaddr + PAGE_2M, PAGE_2M)
        dev.domain.unmap(other)
        with pytest.raises(DmaMapError, match="not mapped in this domain"):
            dev.domain.unmap(other)
        assert dev.domain.mappings() == [m]
        dev.domain.unmap(m)


def test_a_dma_domain_unmaps_its_memory_before_freeing_it(dev: VfioDevice) -> None:
    # the memory layer knows nothing of IOMMUs; the DMA domain, which maps, unmaps first
    with DmaDomain(dev.domain, coherent_pool="128K"):
        mapped = dev.domain.mappings()
        assert mapped and all(m.iova % PAGE_2M == 0 for m in mapped)
    assert dev.domain.mappings() == []  # the real kernel accepted every UNMAP_DMA
    assert not dev.domain.closed  # the IOMMU domain is its owner's to close


def test_zone_dma_runs_out_cleanly(dev: VfioDevice) -> None:
    held: list[tuple[HugeMemory, object]] = []
    with allocate(16 * MiB) as mem:
        with pytest.raises(IovaExhaustedError, match=r"in \[0x0, 0xffffff\]"):
            for k in range(8):  # 16 MiB zone, page 0 reserved: only 7 aligned 2 MiB blocks
                held.append(
                    (
                        mem,
                        dev.domain.map(
                            mem.vaddr + k * PAGE_2M,
                            PAGE_2M,
                            windows=zone_windows(Zone.DMA),
                            align=PAGE_2M,
                        ),
                    )
                )
        assert len(held) == 7
        for _, m in held:
            dev.domain.unmap(m)  # type: ignore[arg-type]
        assert dev.domain.mappings() == []
        again = dev.domain.map(mem.vaddr, PAGE_2M, windows=zone_windows(Zone.DMA), align=PAGE_2M)
        assert again.iova == PAGE_2M  # reused after unmap
        dev.domain.unmap(again)


@pytest.mark.backends("type1")
def test_mapping_limit_is_a_clear_error() -> None:
    limit = Path("/sys/module/vfio_iommu_type1/parameters/dma_entry_limit")
    saved = limit.read_text()
    limit.write_text("4")
    try:
        with open_device(controllers()[0].address) as dev, allocate(PAGE_2M) as mem:
            maps = [dev.domain.map(mem.vaddr + k * 4096, 4096) for k in range(4)]
            assert dev.domain.mappings_left() == 0
            with pytest.raises(UvdmaOSError, match="limit of mappings") as info:
                dev.domain.map(mem.vaddr + 4 * 4096, 4096)
            assert info.value.errno == errno.ENOSPC
            assert dev.domain.mappings() == maps  # the refused one left nothing behind
            for m in maps:
                dev.domain.unmap(m)
    finally:
        limit.write_text(saved)


def test_closing_a_device_releases_everything() -> None:
    before = open_fds()
    dev = open_device(controllers()[0].address)
    dev.bar(0)
    dev.enable_irqs(1)
    mem = allocate(PAGE_2M)
    dev.domain.map(mem.vaddr, mem.size)
    dev.close()  # unmaps DMA, closes eventfds, BAR, device, group, container
    dev.close()  # idempotent
    mem.close()
    assert open_fds() == before
    with open_device(controllers()[0].address) as again:  # and the device opens again
        assert again.bar(0).read32(nvme.VS) == 0x00010400


def test_hugepages_are_used_and_1g_without_reservation_is_refused() -> None:
    with allocate(PAGE_2M) as mem:
        assert mem.page_size == PAGE_2M and mem.source.startswith("memfd 2M")
        ctypes.memset(mem.vaddr, 1, 16)
    with pytest.raises(HugepagesUnavailableError, match="uvdma hugepages --size 1G"):
        allocate(PAGE_1G, PAGE_1G, fallback=False)


def test_the_readme_example_runs() -> None:
    from uvdma.genalloc import GenPool  # noqa: PLC0415 - as the README writes it

    bdf = str(controllers()[0].address)
    with open_device(bdf) as dev, allocate(2 << 20) as mem:
        assert dev.bar(0).read64(0) & 0xFFFF == 2047
        dev.enable_bus_master()
        m = dev.domain.map_memory(mem, windows=zone_windows(Zone.DMA32))
        pool = GenPool(12)
        pool.add_virt(mem.vaddr, m.iova, mem.size)
        got = pool.dma_zalloc_align(64 << 10, 64 << 10)
        assert got is not None
        vaddr, iova = got
        assert iova % (64 << 10) == 0 and iova < 1 << 32
        assert dev.domain.translate(iova) == vaddr
        pool.free(vaddr, 64 << 10)
        dev.domain.unmap(m)


# -- use after close, from several threads: errors, never a crash ---------------------------------

CLOSE_UNDER_THREADS = """
import threading, time
from uvdma import pci
from uvdma.dma import GFP_ATOMIC, DmaBuffer, DmaDevice, dma_alloc_coherent
from uvdma.errors import ClosedError
from uvdma.vfio import open_device

dev = open_device(pci.nvme_controllers()[0].address)
bar = dev.bar(0)
kept = bar.reg32(0x08)  # VS, as a driver keeps its doorbells
dma = DmaDevice(dev, coherent_pool="128K")
buf = DmaBuffer(dma, 8192)
stop = threading.Event()
seen = {}

def use(name, call):
    n = 0
    while not stop.is_set():
        try:
            call()
            n += 1
        except ClosedError as e:
            seen[name] = f"{n} then ClosedError: {e}"
            return
    seen[name] = f"{n} and never closed"

calls = {
    "read32": lambda: bar.read32(0x1C),
    "config": lambda: dev.config_read(0, 2),
    "atomic": lambda: dma_alloc_coherent(dma, 4096, GFP_ATOMIC),
    "kept": lambda: kept.value,
}
threads = [threading.Thread(target=use, args=item) for item in calls.items()]
for t in threads:
    t.start()
time.sleep(1.0)
dev.close()
time.sleep(0.2)
stop.set()
for t in threads:
    t.join()
for name in calls:
    print(f"{name}: {seen[name]}", flush=True)
print(f"kept after close: {kept.value:#x}", flush=True)
later = {
    "cpu": lambda: buf.cpu,
    "atomic again": lambda: dma_alloc_coherent(dma, 4096, GFP_ATOMIC),
}
for name, call in later.items():
    try:
        call()
        print(f"{name}: worked", flush=True)
    except ClosedError as e:
        print(f"{name}: ClosedError: {e}", flush=True)
"""


def test_closing_a_device_under_busy_threads_gives_them_errors_never_a_crash() -> None:
    r = subprocess.run(
        [sys.executable, "-c", CLOSE_UNDER_THREADS],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr  # not -11 (SIGSEGV)
    out = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    bdf = str(controllers()[0].address)
    assert "then ClosedError: " in out["read32"] and f"Bar 0 of VfioDevice {bdf}" in out["read32"]
    assert "then ClosedError: " in out["config"]  # from config_read or the region_read in it
    assert f"VfioDevice {bdf} is closed" in out["config"]
    assert "then ClosedError: dma_alloc_coherent" in out["atomic"]
    assert out["kept"].endswith("and never closed")  # a kept register object keeps reading ...
    assert out["kept after close"] == "0x0"  # ... inert memory, not the unmapped BAR
    assert out["cpu"].startswith("ClosedError: ")
    assert out["atomic again"].startswith("ClosedError: ")
