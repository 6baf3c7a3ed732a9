"""The VFIO layer against the fake kernel: the iommufd backend (which the Debian guest
kernel cannot run), the argsz/capability protocol, and every refusal with nothing leaked.

What a real device does is proven in tests/vm/test_vfio.py.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_kernel import FakeKernel
from tests.fake_sysfs import make_device
from uvdma import _sys, pci
from uvdma.errors import PciError, UvdmaOSError
from uvdma.memory.iova import Zone
from uvdma.vfio import (
    DmaMapError,
    GroupNotViableError,
    IommufdDomain,
    Type1Container,
    choose_backend,
    new_domain,
    open_device,
)

NVME = "0000:00:09.0"
NVME2 = "0000:00:0a.0"
MiB = 1 << 20


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    make_device(tmp_path, NVME, pci.NVME_CLASS, 9, "vfio-pci", cdev=0)
    make_device(tmp_path, NVME2, pci.NVME_CLASS, 10, "vfio-pci", cdev=1)
    make_device(tmp_path, "0000:01:00.0", 0x020000, 14, "vfio-pci", cdev=2)
    make_device(tmp_path, "0000:01:00.1", 0x020000, 14, "ixgbe")
    return tmp_path


@pytest.fixture
def fake() -> Iterator[FakeKernel]:
    k = FakeKernel()
    k.add_device(NVME, 9, 0)
    k.add_device(NVME2, 10, 1)
    k.add_device("0000:01:00.0", 14, 2)
    k.viable[14] = False
    with _sys.use_kernel(k):
        yield k


@pytest.mark.parametrize("backend", ["type1", "iommufd"])
def test_open_map_and_close_leave_nothing_open(fake: FakeKernel, sysfs: Path, backend: str) -> None:
    dev = open_device(NVME, backend=backend, sysfs=sysfs)
    assert dev.backend == backend
    assert dev.bar(0).read32(0x08) == 0x00010400  # VS through the BAR mapping
    assert dev.bar(0).read64(0) & 0xFFFF == 2047
    assert dev.capabilities() == {0x11: 0x40}
    m = dev.domain.map(0x7000_0000_0000, 2 * MiB, zone=Zone.DMA32, align=2 * MiB)
    assert m.iova >= (1 << 24) and m.iova + m.size <= 1 << 32
    assert fake.pinned == 2 * MiB
    dev.close()
    assert fake.open_kinds() == []
    assert fake.pinned == 0


def test_type1_info_grows_argsz_and_reads_the_capability_chain(
    fake: FakeKernel, sysfs: Path
) -> None:
    with open_device(NVME, backend="type1", sysfs=sysfs) as dev:
        domain = dev.domain
        assert isinstance(domain, Type1Container)
        info = domain.info()
        assert info.iova_ranges == [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]
        assert info.dma_avail == 65535
        assert info.page_sizes == 0x40201000
        assert fake.calls.count("ioctl VFIO_IOMMU_GET_INFO") == 2  # asked, grew, asked again
        domain.map(0x7000_0000_0000, 4096)
        assert domain.mappings_left() == 65534


def test_iommufd_ranges_grow_on_emsgsize_and_the_ioas_is_destroyed(
    fake: FakeKernel, sysfs: Path
) -> None:
    dev = open_device(NVME, backend="iommufd", sysfs=sysfs)
    domain = dev.domain
    assert isinstance(domain, IommufdDomain)
    assert domain.iova_ranges() == [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]
    assert domain.min_page_size() == 4096
    domain.map(0x7000_0000_0000, 4096, iova=0x10000)
    dev.close()
    assert fake.ioas == {}  # IOMMU_DESTROY ran
    assert "ioctl IOMMU_DESTROY" in fake.calls


def test_auto_backend_prefers_iommufd_when_the_kernel_has_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("uvdma.vfio.iommufd.available", lambda: True)
    assert choose_backend() == "iommufd"
    monkeypatch.setattr("uvdma.vfio.iommufd.available", lambda: False)
    assert choose_backend() == "type1"
    with pytest.raises(ValueError, match="auto, type1 or iommufd"):
        choose_backend("vfio")


@pytest.mark.parametrize("backend", ["type1", "iommufd"])
def test_two_devices_share_one_domain(fake: FakeKernel, sysfs: Path, backend: str) -> None:
    with new_domain(backend) as domain:
        a = open_device(NVME, domain=domain, sysfs=sysfs)
        b = open_device(NVME2, domain=domain, sysfs=sysfs)
        m = domain.map(0x7000_0000_0000, 2 * MiB)
        assert a.domain is b.domain is domain
        if isinstance(domain, Type1Container):
            assert [g.number for g in domain.groups] == [9, 10]
        a.close()
        b.close()
        assert domain.mappings() == [m]  # the shared domain outlives its devices
    assert fake.open_kinds() == []


# -- refusals --------------------------------------------------------------------------


def test_group_not_viable_names_the_device_to_bind(fake: FakeKernel, sysfs: Path) -> None:
    with pytest.raises(GroupNotViableError) as info:
        open_device("0000:01:00.0", backend="type1", sysfs=sysfs)
    assert "group 14 is not viable: bind 0000:01:00.1 (ixgbe) to vfio-pci too" in str(info.value)
    assert fake.open_kinds() == []


def test_device_not_bound_to_vfio_pci(fake: FakeKernel, sysfs: Path) -> None:
    with pytest.raises(PciError, match=r"bound to ixgbe, not vfio-pci: `uvdma bind 0000:01:00\.1`"):
        open_device("0000:01:00.1", sysfs=sysfs)
    assert fake.open_kinds() == []


def test_missing_group_node_says_to_bind(fake: FakeKernel, sysfs: Path) -> None:
    del fake.viable[9]
    with pytest.raises(UvdmaOSError, match=r"/dev/vfio/9 does not exist; bind") as info:
        open_device(NVME, backend="type1", sysfs=sysfs)
    assert info.value.errno == errno.ENOENT
    assert fake.open_kinds() == []


def test_no_iommufd_says_to_use_type1(fake: FakeKernel, sysfs: Path) -> None:
    fake.iommufd = False
    with pytest.raises(UvdmaOSError, match="no iommufd; use the type1 backend"):
        open_device(NVME, backend="iommufd", sysfs=sysfs)
    assert fake.open_kinds() == []


@pytest.mark.parametrize("backend", ["type1", "iommufd"])
def test_overlap_misalignment_and_unknown_unmap(
    fake: FakeKernel, sysfs: Path, backend: str
) -> None:
    with open_device(NVME, backend=backend, sysfs=sysfs) as dev:
        d = dev.domain
        m = d.map(0x7000_0000_0000, 2 * MiB, iova=0x4000_0000)
        with pytest.raises(DmaMapError, match=r"overlaps DmaMapping\(iova=1073741824"):
            d.map(0x7000_0020_0000, 2 * MiB, iova=0x4010_0000)
        with pytest.raises(DmaMapError, match="multiples of the IOMMU page size"):
            d.map(0x7000_0000_0100, 4096)
        with pytest.raises(DmaMapError, match="not mapped in this domain"):
            d.unmap(type(m)(0x9000_0000, 0x7000_0000_0000, 4096))
        assert d.mappings() == [m]
        assert fake.pinned == 2 * MiB


def test_mapping_limit_reached(fake: FakeKernel, sysfs: Path) -> None:
    fake.dma_entry_limit = 3
    with open_device(NVME, backend="type1", sysfs=sysfs) as dev:
        maps = [dev.domain.map(0x7000_0000_0000 + k * 4096, 4096) for k in range(3)]
        assert dev.domain.mappings_left() == 0
        free_before = dev.domain.iova.free_bytes()
        with pytest.raises(UvdmaOSError, match=r"limit of mappings.*dma_entry_limit") as info:
            dev.domain.map(0x7000_0000_4000, 4096)
        assert info.value.errno == errno.ENOSPC
        assert dev.domain.mappings() == maps
        assert dev.domain.iova.free_bytes() == free_before  # the IOVA went back


@pytest.mark.parametrize("backend", ["type1", "iommufd"])
def test_low_memlock_limit_names_the_fix(fake: FakeKernel, sysfs: Path, backend: str) -> None:
    fake.privileged = False
    fake.memlock = 1 * MiB
    with open_device(NVME, backend=backend, sysfs=sysfs) as dev:
        with pytest.raises(UvdmaOSError, match=r"RLIMIT_MEMLOCK \(1048576 bytes\).*ulimit -l"):
            dev.domain.map(0x7000_0000_0000, 2 * MiB)
        assert dev.domain.mappings() == []
        dev.domain.map(0x7000_0000_0000, 512 * 1024)  # within the limit it works


def test_msix_vectors_and_timed_wait(fake: FakeKernel, sysfs: Path) -> None:
    with open_device(NVME, sysfs=sysfs, backend="type1") as dev:
        with pytest.raises(ValueError, match="offers 4 VFIO_PCI_MSIX_IRQ_INDEX vectors, not 5"):
            dev.enable_irqs(5)
        fds = dev.enable_irqs(2)
        assert fake.irqs[(NVME, 2)] == fds
        with pytest.raises(TimeoutError, match=r"vector 1 within 0\.01 s"):
            dev.wait_irq(1, 0.01)
        fake.signal(fds[1])
        fake.signal(fds[1])
        assert dev.wait_irq(1, 0.01) == 2
    assert (NVME, 2) not in fake.irqs  # close turned them off
    assert fake.open_kinds() == []


def test_bar_access_is_bounded_and_aligned(fake: FakeKernel, sysfs: Path) -> None:
    with open_device(NVME, sysfs=sysfs, backend="type1") as dev:
        bar = dev.bar(0)
        bar.write32(0x14, 0x460001)
        assert bar.read32(0x14) == 0x460001
        for off, width in ((0x2, 4), (bar.size - 4, 8), (-8, 8)):
            with pytest.raises(ValueError, match="aligned and inside"):
                (bar.read32 if width == 4 else bar.read64)(off)
        with pytest.raises(Exception, match="has no BAR2"):
            dev.bar(2)


def test_bus_master_and_reset(fake: FakeKernel, sysfs: Path) -> None:
    with open_device(NVME, sysfs=sysfs, backend="type1") as dev:
        dev.enable_bus_master()
        assert dev.config_read(0x04, 2) & 0x6 == 0x6
        dev.reset()
        assert "ioctl VFIO_DEVICE_RESET" in fake.calls


def test_mapped_memory_cannot_be_freed_until_unmapped(fake: FakeKernel, sysfs: Path) -> None:
    from uvdma.memory import allocate  # noqa: PLC0415

    with open_device(NVME, sysfs=sysfs, backend="type1") as dev:
        mem = allocate(2 * MiB)
        m = dev.domain.map_memory(mem, zone=Zone.DMA)
        assert m.iova % (2 * MiB) == 0 and m.iova + m.size <= 1 << 24
        with pytest.raises(Exception, match="still mapped for DMA"):
            mem.close()
        dev.domain.unmap(m)
        mem.close()


def test_intx_is_unmasked_on_request(fake: FakeKernel, sysfs: Path) -> None:
    with open_device(NVME, sysfs=sysfs, backend="type1") as dev:
        fds = dev.enable_irqs(1, index=0)  # INTx
        assert fake.irqs[(NVME, 0)] == fds
        dev.unmask_irq()
        assert fake.unmasked == [(NVME, 0)]
