"""The VFIO layer against the fake kernel: the iommufd backend (which the Debian guest
kernel cannot run), the argsz/capability protocol, and every refusal with nothing leaked.

What a real device does is proven in tests/vm/test_vfio.py.
"""

from __future__ import annotations

import errno
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from uvdma import _sys, pci
from uvdma._uapi import vfio as V  # noqa: N812
from uvdma.errors import (
    ClosedError,
    DeviceReleasedError,
    DomainInUseError,
    IovaExhaustedError,
    NoIommuWarning,
    PciError,
    UvdmaError,
    UvdmaOSError,
)
from uvdma.memory import hugepages
from uvdma.testing.fake_kernel import FakeKernel
from uvdma.testing.fake_sysfs import make_device
from uvdma.vfio import (
    DmaMapError,
    GroupNotViableError,
    IommufdDomain,
    Type1Container,
    VfioDevice,
    choose_backend,
    new_domain,
    open_device,
)
from uvdma.vfio import noiommu as noiommu_mod
from uvdma.vfio.device import BackendChoice, backend_choice
from uvdma.vfio.noiommu import NoIommuContainer

NVME = "0000:00:09.0"
NVME2 = "0000:00:0a.0"
MiB = 1 << 20
U32 = (1 << 32) - 1
REQ = V.PciIrq.VFIO_PCI_REQ_IRQ_INDEX


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
    m = dev.domain.map(0x7000_0000_0000, 2 * MiB, align=2 * MiB, windows=[(1 << 24, (1 << 32) - 1)])
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


def test_auto_prefers_iommufd_where_dev_iommu_and_the_cdev_exist_else_type1_saying_why(
    sysfs: Path, tmp_path: Path
) -> None:
    devfs = tmp_path / "dev"
    (devfs / "vfio").mkdir(parents=True)
    no_iommufd = backend_choice("auto", NVME, sysfs=sysfs, devfs=devfs)
    assert no_iommufd.backend == "type1"
    assert "no iommufd (CONFIG_IOMMUFD)" in no_iommufd.reason
    (devfs / "iommu").touch()
    no_cdev = backend_choice("auto", NVME, sysfs=sysfs, devfs=devfs)
    assert no_cdev.backend == "type1" and "has no vfio cdev" in no_cdev.reason
    (devfs / "vfio/devices").mkdir()
    (devfs / "vfio/devices/vfio0").touch()
    both = backend_choice("auto", NVME, sysfs=sysfs, devfs=devfs)
    assert both == BackendChoice("iommufd", f"{devfs}/iommu and {devfs}/vfio/devices/vfio0 exist")
    assert backend_choice("auto", sysfs=sysfs, devfs=devfs).backend == "iommufd"  # the kernel
    assert backend_choice("auto", NVME2, sysfs=sysfs, devfs=devfs).backend == "type1"  # no vfio1
    assert backend_choice("type1", NVME, sysfs=sysfs, devfs=devfs).backend == "type1"
    with pytest.raises(ValueError, match="auto, type1, iommufd, noiommu"):
        choose_backend("vfio")


def test_auto_picks_noiommu_for_a_device_in_a_noiommu_group(sysfs: Path, tmp_path: Path) -> None:
    (sysfs / "kernel/iommu_groups/9/name").write_text("vfio-noiommu\n")
    choice = backend_choice("auto", NVME, sysfs=sysfs, devfs=tmp_path / "dev")
    assert choice.backend == "noiommu" and "no IOMMU protects memory" in choice.reason


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
        with pytest.raises(
            UvdmaOSError,
            match=r"RLIMIT_MEMLOCK is 1048576 bytes and this process has already locked \d+ "
            r"bytes.*ulimit -l",
        ):
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


def test_intx_is_unmasked_on_request(fake: FakeKernel, sysfs: Path) -> None:
    with open_device(NVME, sysfs=sysfs, backend="type1") as dev:
        fds = dev.enable_irqs(1, index=0)  # INTx
        assert fake.irqs[(NVME, 0)] == fds
        dev.unmask_irq()
        assert fake.unmasked == [(NVME, 0)]


# -- use after close -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["type1", "iommufd"])
def test_every_method_after_close_is_a_clear_error_naming_the_device(
    fake: FakeKernel, sysfs: Path, backend: str
) -> None:
    dev = open_device(NVME, backend=backend, sysfs=sysfs)
    bar = dev.bar(0)
    doorbell = bar.reg32(0x1000)  # a driver keeps these
    dev.enable_irqs(1)
    dev.close()
    dev.close()  # a second close does nothing
    assert fake.open_kinds() == []
    calls = {
        "bar(0)": lambda: dev.bar(0),
        "region_info(0)": lambda: dev.region_info(0),
        "region_read(7)": lambda: dev.region_read(7, 0, 4),
        "region_write(7)": lambda: dev.region_write(7, 0, b"\0"),
        "config_read": lambda: dev.config_read(0, 2),
        "config_write": lambda: dev.config_write(4, 2, 6),
        "capabilities": dev.capabilities,
        "enable_bus_master": dev.enable_bus_master,
        "irq_info(2)": lambda: dev.irq_info(2),
        "enable_irqs(1": lambda: dev.enable_irqs(1),
        "wait_irq(0)": lambda: dev.wait_irq(0, 0.01),
        "unmask_irq(0)": dev.unmask_irq,
        "disable_irqs(2)": dev.disable_irqs,
        "reset": dev.reset,
    }
    for what, call in calls.items():
        with pytest.raises(ClosedError, match=r"VfioDevice 0000:00:09\.0 is closed") as info:
            call()
        assert what.split("(")[0] in str(info.value)
        assert not isinstance(info.value, DeviceReleasedError)
    with pytest.raises(ClosedError, match=r"Bar 0 of VfioDevice 0000:00:09\.0 is closed"):
        bar.read32(0)
    # the BAR was not simply unmapped: inert memory holds its place for stale pointers
    assert fake.retired == [bar.addr]
    doorbell.value = 1  # harmless


def test_a_domain_is_not_closed_while_its_devices_are_open(fake: FakeKernel, sysfs: Path) -> None:
    domain = new_domain("type1")
    a = open_device(NVME, domain=domain, sysfs=sysfs)
    m = domain.map(0x7000_0000_0000, 2 * MiB)
    with pytest.raises(DomainInUseError, match=r"VfioDevice\(0000:00:09\.0.*close them first"):
        domain.close()
    assert not domain.closed and domain.mappings() == [m]  # nothing changed
    assert a.bar(0).read32(0x08) == 0x00010400  # and the device still works
    a.close()
    domain.close()
    domain.close()
    assert fake.open_kinds() == []
    for call in (
        lambda: domain.map(0x7000_0000_0000, 4096),
        lambda: domain.unmap(m),
        lambda: domain.translate(m.iova + (1 << 30)),
        lambda: open_device(NVME, domain=domain, sysfs=sysfs),
    ):
        with pytest.raises(ClosedError, match=r"IommuDomain\(type1, 0 mappings\) is closed"):
            call()
    assert fake.open_kinds() == []


@pytest.mark.parametrize("backend", ["type1", "iommufd"])
def test_the_same_device_twice_in_one_process_says_so(
    fake: FakeKernel, sysfs: Path, backend: str
) -> None:
    with open_device(NVME, backend=backend, sysfs=sysfs) as dev:
        kinds = fake.open_kinds()
        with pytest.raises(UvdmaOSError, match="already open in this process") as info:
            open_device(NVME, backend=backend, sysfs=sysfs)
        assert info.value.errno == errno.EBUSY
        assert "another process" not in str(info.value)
        assert fake.open_kinds() == kinds  # the refusal opened nothing
        assert dev.bar(0).read32(0x08) == 0x00010400
    with open_device(NVME, backend=backend, sysfs=sysfs):  # once closed it opens again
        pass


def test_a_group_open_in_another_domain_of_this_process_says_so(
    fake: FakeKernel, sysfs: Path
) -> None:
    fake.add_device("0000:00:09.1", 9, 5)  # a second function in group 9
    make_device(sysfs, "0000:00:09.1", 0x010802, 9, "vfio-pci")
    with open_device(NVME, backend="type1", sysfs=sysfs) as dev:
        with pytest.raises(UvdmaOSError, match=r"group 9: it is already open in this process"):
            open_device("0000:00:09.1", backend="type1", sysfs=sysfs)
        with open_device("0000:00:09.1", domain=dev.domain, sysfs=sysfs) as other:
            assert other.group is dev.group  # the fix the message gives works


# -- the device request ----------------------------------------------------------------------


def finish(dev: VfioDevice) -> None:
    """Wait for the device's request watcher to finish what it started."""
    assert dev._watcher is not None
    dev._watcher.join(timeout=10)
    assert not dev._watcher.is_alive()


@pytest.mark.parametrize("backend", ["type1", "iommufd"])
def test_every_device_registers_the_request_and_close_stops_the_watcher(
    fake: FakeKernel, sysfs: Path, backend: str
) -> None:
    dev = open_device(NVME, backend=backend, sysfs=sysfs)
    assert len(fake.irqs[(NVME, REQ)]) == 1
    watcher = dev._watcher
    assert watcher is not None and watcher.is_alive() and watcher.daemon
    dev.close()
    assert not watcher.is_alive()  # woken through VFIO's loopback, not a timeout
    assert fake.open_kinds() == []
    assert not dev.release_requested


@pytest.mark.parametrize("backend", ["type1", "iommufd"])
def test_without_a_handler_uvdma_releases_the_device_so_the_unbind_completes(
    fake: FakeKernel, sysfs: Path, backend: str
) -> None:
    dev = open_device(NVME, backend=backend, sysfs=sysfs)
    bar = dev.bar(0)
    doorbell = bar.reg32(0x1000)
    irq = dev.enable_irqs(1)
    m = dev.domain.map(0x7000_0000_0000, 2 * MiB)
    assert fake.request(NVME)  # the kernel asks for it back (an unbind)
    finish(dev)
    assert dev.release_requested and dev.closed
    assert not fake.device_open(NVME)  # released: the unbind can complete
    if backend == "type1":
        assert "group" not in fake.open_kinds()  # left the container: DMA ownership ends
        assert fake.pinned == 0 and dev.domain.detached
    assert fake.retired == [bar.addr]  # BAR0 is inert memory now
    doorbell.value = 7  # a stale register pointer cannot crash
    assert irq[0] in fake.fds  # a thread may still wait on it: kept until close
    for call in (lambda: dev.bar(0), lambda: dev.config_read(0, 2), dev.reset):
        with pytest.raises(
            DeviceReleasedError, match=r"0000:00:09\.0: the kernel asked for it back"
        ):
            call()
    with pytest.raises(
        DeviceReleasedError, match=r"Bar 0 of VfioDevice 0000:00:09\.0: the kernel asked"
    ):
        bar.read32(0)
    if backend == "type1":
        with pytest.raises(DeviceReleasedError, match="lost its IOMMU"):
            dev.domain.map(0x7000_0020_0000, 2 * MiB)
    dev.domain.unmap(m)  # bookkeeping only: the kernel already dropped it
    dev.close()
    dev.close()
    assert fake.open_kinds() == []
    with open_device(NVME, backend=backend, sysfs=sysfs):  # once rebound it opens again
        pass


def test_a_release_handler_is_called_once_from_the_watcher_and_closes(
    fake: FakeKernel, sysfs: Path
) -> None:
    dev = open_device(NVME, backend="type1", sysfs=sysfs)
    seen: list[tuple[VfioDevice, str, bool]] = []

    def handler(d: VfioDevice) -> None:
        seen.append((d, threading.current_thread().name, d.bar(0).read32(0x08) == 0x00010400))
        d.close()

    dev.on_release_request(handler)
    fake.request(NVME)
    finish(dev)
    assert seen == [(dev, "uvdma-req-0000:00:09.0", True)]  # the device still worked in it
    assert dev.closed and dev.release_requested
    assert fake.open_kinds() == []
    with pytest.raises(ClosedError, match="is closed") as info:
        dev.bar(0)
    assert not isinstance(info.value, DeviceReleasedError)  # closed by the handler, not uvdma


@pytest.mark.parametrize("behaviour", ["returns", "raises"])
def test_a_handler_that_does_not_close_still_gets_the_device_released(
    fake: FakeKernel, sysfs: Path, behaviour: str
) -> None:
    dev = open_device(NVME, backend="type1", sysfs=sysfs)

    def handler(d: VfioDevice) -> None:
        if behaviour == "raises":
            raise RuntimeError("the handler's own bug")

    dev.on_release_request(handler)
    fake.request(NVME)
    finish(dev)
    assert dev.closed and not fake.device_open(NVME)
    with pytest.raises(DeviceReleasedError):
        dev.bar(0)
    dev.close()
    assert fake.open_kinds() == []


def test_setting_the_handler_to_none_restores_the_default(fake: FakeKernel, sysfs: Path) -> None:
    dev = open_device(NVME, backend="type1", sysfs=sysfs)
    called: list[VfioDevice] = []
    dev.on_release_request(called.append)
    dev.on_release_request(None)
    with pytest.raises(TypeError, match="callable or None"):
        dev.on_release_request(42)  # type: ignore[arg-type]
    fake.request(NVME)
    finish(dev)
    assert called == [] and dev.closed and not fake.device_open(NVME)
    dev.close()


def test_releasing_one_device_of_a_shared_domain_keeps_the_others(
    fake: FakeKernel, sysfs: Path
) -> None:
    with new_domain("type1") as domain:
        a = open_device(NVME, domain=domain, sysfs=sysfs)
        b = open_device(NVME2, domain=domain, sysfs=sysfs)
        m = domain.map(0x7000_0000_0000, 2 * MiB)
        fake.request(NVME)
        finish(a)
        assert a.closed and not b.closed
        assert isinstance(domain, Type1Container)
        assert [g.number for g in domain.groups] == [10]  # group 9 left, 10 stays
        assert not domain.detached and fake.pinned == 2 * MiB  # b's DMA still mapped
        assert b.bar(0).read32(0x08) == 0x00010400
        domain.unmap(m)
        a.close()
        b.close()
    assert fake.open_kinds() == []


def test_two_threads_use_a_device_while_a_third_closes_it(fake: FakeKernel, sysfs: Path) -> None:
    dev = open_device(NVME, backend="type1", sysfs=sysfs)
    bar = dev.bar(0)
    errors: list[BaseException] = []
    stop = threading.Event()

    def use(kind: str) -> None:
        while not stop.is_set():
            try:
                if kind == "bar":
                    bar.read32(0x08)
                else:
                    dev.config_read(0, 2)
            except UvdmaError as e:
                errors.append(e)
                return
            except BaseException as e:  # anything else is a failure
                errors.append(e)
                return

    threads = [threading.Thread(target=use, args=(k,)) for k in ("bar", "config")]
    for t in threads:
        t.start()
    dev.close()
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert all(isinstance(e, UvdmaError) for e in errors), errors
    assert fake.open_kinds() == []


def test_a_thread_waiting_for_an_interrupt_is_woken_by_close(fake: FakeKernel, sysfs: Path) -> None:
    dev = open_device(NVME, backend="type1", sysfs=sysfs)
    dev.enable_irqs(2)
    got: list[BaseException] = []

    def waiter() -> None:
        try:
            dev.wait_irq(1, 30.0)
        except BaseException as e:  # the test looks at what it was
            got.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    deadline = time.monotonic() + 10
    while dev._waiters == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    start = time.monotonic()
    dev.close()
    t.join(timeout=10)
    assert time.monotonic() - start < 5  # woken, not timed out
    assert len(got) == 1 and isinstance(got[0], ClosedError), got
    assert "wait_irq(1): VfioDevice 0000:00:09.0 is closed" in str(got[0])
    assert fake.open_kinds() == []  # its eventfd was closed once it was out


# -- iommufd: the cdev order and the options ------------------------------------------------


def test_iommufd_detaches_each_device_before_its_cdev_closes_and_shares_one_ioas(
    fake: FakeKernel, sysfs: Path
) -> None:
    with new_domain("iommufd") as domain:
        assert isinstance(domain, IommufdDomain)
        a = open_device(NVME, domain=domain, sysfs=sysfs)
        b = open_device(NVME2, domain=domain, sysfs=sysfs)
        m = domain.map(0x7000_0000_0000, 2 * MiB, iova=0x4000_0000)
        assert fake.ioas[domain.ioas_id] == {0x4000_0000: 2 * MiB}  # one IOAS, one mapping
        a.close()
        assert fake.detached == [NVME]  # b is still attached and its mapping still there
        assert fake.ioas[domain.ioas_id] == {0x4000_0000: 2 * MiB}
        b.close()
        assert fake.detached == [NVME, NVME2]
        domain.unmap(m)
    calls = [c for c in fake.calls if "DETACH" in c or "DESTROY" in c]
    assert calls == [
        "ioctl VFIO_DEVICE_DETACH_IOMMUFD_PT",
        "ioctl VFIO_DEVICE_DETACH_IOMMUFD_PT",
        "ioctl IOMMU_DESTROY",
    ]
    assert fake.open_kinds() == []


def test_iommufd_options_are_read_not_changed(fake: FakeKernel, sysfs: Path) -> None:
    with open_device(NVME, backend="iommufd", sysfs=sysfs) as dev:
        assert isinstance(dev.domain, IommufdDomain)
        assert dev.domain.options() == {"huge_pages": 1, "rlimit_mode": 0}


# -- no-IOMMU mode ---------------------------------------------------------------------------


@pytest.fixture
def noiommu(fake: FakeKernel, sysfs: Path) -> FakeKernel:
    fake.noiommu = True
    for group in (9, 10):
        (sysfs / "kernel/iommu_groups" / str(group) / "name").write_text("vfio-noiommu\n")
    return fake


def test_noiommu_warns_and_maps_at_the_physical_address(noiommu: FakeKernel, sysfs: Path) -> None:
    with pytest.warns(NoIommuWarning, match="no IOMMU protects memory"):
        dev = open_device(NVME, sysfs=sysfs)
    with dev:
        assert dev.backend == "noiommu" and isinstance(dev.domain, NoIommuContainer)
        assert "UNPROTECTED" in repr(dev.domain)
        assert "no IOMMU protects memory" in dev.backend_reason  # auto says why
        vaddr = 0x7000_1234_5000
        m = dev.domain.map(vaddr, 8192)
        assert m.iova == (vaddr >> 12 & 0xFFFFF) << 12  # what pagemap says
        assert dev.domain.translate(m.iova + 5) == vaddr + 5
        assert noiommu.mlocked == 8192  # locked: resident, never swapped
        assert not any("MAP_DMA" in c for c in noiommu.calls)  # no IOMMU to ask
        dev.domain.unmap(m)
        with pytest.raises(DmaMapError, match="not mapped in this domain"):
            dev.domain.unmap(m)
    assert noiommu.open_kinds() == []


def test_noiommu_refuses_what_it_cannot_honour_and_changes_nothing(
    noiommu: FakeKernel, sysfs: Path
) -> None:
    with pytest.warns(NoIommuWarning), open_device(NVME, sysfs=sysfs) as dev:
        vaddr = 0x7000_0000_0000  # physical 0x0 + offsets in the fake's pagemap
        high = 0x7000_8000_0000  # physical 0x8000_0000
        with pytest.raises(IovaExhaustedError, match=r"lies outside \[0x0, 0xffffff\]"):
            dev.domain.map(high, 4096, windows=[(0, (1 << 24) - 1)])
        with pytest.raises(DmaMapError, match="only"):
            dev.domain.map(vaddr + 4096, 4096, iova=0x10000)
        noiommu.physical = lambda v: 0x1000_0000 + (v - vaddr) * 3  # pages scattered
        with pytest.raises(DmaMapError, match="not physically contiguous"):
            dev.domain.map(vaddr, 8192)
        assert dev.domain.mappings() == []


def test_a_backend_that_does_not_fit_the_group_is_refused(noiommu: FakeKernel, sysfs: Path) -> None:
    with pytest.raises(PciError, match=r"no-IOMMU group .* use backend noiommu"):
        open_device(NVME, backend="type1", sysfs=sysfs)
    noiommu.noiommu = False
    (sysfs / "kernel/iommu_groups/9/name").unlink()
    with pytest.raises(PciError, match="it has an IOMMU"):
        open_device(NVME, backend="noiommu", sysfs=sysfs)
    assert noiommu.open_kinds() == []


def test_noiommu_alloc_below_finds_a_hugepage_under_the_limit(
    noiommu: FakeKernel, sysfs: Path
) -> None:
    placed: dict[int, int] = {}  # hugepage vaddr -> physical: high, high, then low

    def physical(vaddr: int) -> int:
        base = vaddr & ~(2 * MiB - 1)
        if base not in placed:
            placed[base] = [0x1_4000_0000, 0x1_2000_0000, 0x3000_0000][len(placed) % 3]
        return placed[base] + vaddr - base

    noiommu.physical = physical
    with pytest.warns(NoIommuWarning), open_device(NVME, sysfs=sysfs) as dev:
        domain = dev.domain
        assert isinstance(domain, NoIommuContainer)
        free = noiommu.free_hugepages[2 * MiB]
        mem = domain.alloc_below(2 * MiB, (1 << 32) - 1)
        assert physical(mem.vaddr) == 0x3000_0000
        assert noiommu.free_hugepages[2 * MiB] == free - 1  # the two high ones went back
        m = domain.map_memory(mem, windows=[(0, (1 << 32) - 1)])
        assert m.iova == 0x3000_0000
        domain.unmap(m)
        mem.close()
        placed.clear()
        noiommu.physical = lambda v: 0x2_0000_0000 + v % (2 * MiB)  # every page above 4 GiB
        with pytest.raises(IovaExhaustedError, match=r"the lowest at physical 0x200000000"):
            domain.alloc_below(2 * MiB, (1 << 32) - 1)
        assert noiommu.free_hugepages[2 * MiB] == free  # nothing kept


def test_opening_a_node_says_the_fix_by_errno_or_names_the_path() -> None:
    # one "open, or say the fix" (uvdma.vfio._ioctl.open_node) for the container, group,
    # iommufd and cdev opens; a callable fix is made only when the open fails
    from uvdma.vfio import _ioctl  # noqa: PLC0415

    k = FakeKernel()  # no cdevs
    k.iommufd = False
    made: list[str] = []

    def fix() -> str:
        made.append("fix")
        return "load the module"

    with _sys.use_kernel(k):
        fd = _ioctl.open_node("/dev/vfio/vfio", "opening the container", {errno.ENOENT: fix})
        assert made == []
        k.close(fd)
        with pytest.raises(UvdmaOSError, match=r"^opening iommufd: load the module") as info:
            _ioctl.open_node("/dev/iommu", "opening iommufd", {errno.ENOENT: fix})
        assert info.value.errno == errno.ENOENT and made == ["fix"]
        with pytest.raises(
            UvdmaOSError, match=r"opening vfio9: cannot open /dev/vfio/devices/vfio9"
        ):
            _ioctl.open_node("/dev/vfio/devices/vfio9", "opening vfio9", {})


def test_noiommu_alloc_below_refuses_what_cannot_be_one_physical_range(
    noiommu: FakeKernel, sysfs: Path
) -> None:
    with pytest.warns(NoIommuWarning), open_device(NVME, sysfs=sysfs) as dev:
        domain = dev.domain
        assert isinstance(domain, NoIommuContainer)
        free = noiommu.free_hugepages[2 * MiB]
        with pytest.raises(UvdmaError, match="larger than one hugepage"):
            domain.alloc_below(4 * MiB, (1 << 32) - 1)
        with pytest.raises(UvdmaError, match="the size must be positive"):
            domain.alloc_below(0, (1 << 32) - 1)
        noiommu.free_hugepages[2 * MiB] = 0
        with pytest.raises(IovaExhaustedError, match="no free hugepage at all"):
            domain.alloc_below(2 * MiB, (1 << 32) - 1)
        noiommu.free_hugepages[2 * MiB] = free
        assert noiommu.free_hugepages[2 * MiB] == free and domain.mappings() == []


def test_noiommu_places_the_dma_layers_memory_below_the_windows_top(
    noiommu: FakeKernel, sysfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the page allocator asks the domain for memory (IommuDomain.memory_for); with no IOMMU
    # the physical address is the DMA address, so up to a hugepage is placed by alloc_below
    with pytest.warns(NoIommuWarning), open_device(NVME, sysfs=sysfs) as dev:
        domain = dev.domain
        assert isinstance(domain, NoIommuContainer)
        asked: list[tuple[int, int]] = []

        def alloc_below(size: int, limit: int, *, tries: int | None = None) -> object:
            asked.append((size, limit))
            return "placed"

        monkeypatch.setattr(domain, "alloc_below", alloc_below)
        windows = [(1 << 24, (1 << 32) - 1), (0, (1 << 24) - 1)]
        assert domain.memory_for(2 * MiB, windows) == "placed"  # type: ignore[comparison-overlap]
        assert asked == [(2 * MiB, (1 << 32) - 1)]


# -- no-IOMMU review fixes: locks given back, one availability check, devfs honoured -----------


def test_noiommu_gives_back_the_lock_of_a_refused_map_and_of_an_unmap(
    noiommu: FakeKernel, sysfs: Path
) -> None:
    with pytest.warns(NoIommuWarning), open_device(NVME, sysfs=sysfs) as dev:
        domain = dev.domain
        vaddr = 0x7000_0010_0000  # physical 0x100000 in the fake's pagemap
        noiommu.physical = lambda v: 0x1000_0000 + (v - vaddr) * 3  # pages scattered
        with pytest.raises(DmaMapError, match="not physically contiguous"):
            domain.map(vaddr, 8192)
        assert noiommu.mlocked == 0  # refused: nothing stays locked
        noiommu.physical = None
        with pytest.raises(IovaExhaustedError, match="no IOMMU can remap it"):
            domain.map(vaddr + 0x10000, 4096, windows=[(0, 0xFFF)])
        assert noiommu.mlocked == 0
        m = domain.map(vaddr, 8192)
        assert noiommu.mlocked == 8192
        domain.unmap(m)
        assert noiommu.mlocked == 0  # the unmap gave the lock back
        assert noiommu.calls[-1] == f"munlock {vaddr:#x}+0x2000"
        m = domain.map(vaddr, 8192)
        noiommu.calls.clear()
        with pytest.raises(DmaMapError, match="overlaps"):  # the same physical page again
            domain.map(vaddr + 4096, 4096)
        assert not [c for c in noiommu.calls if c.startswith("munlock")]  # m's pages stay
        domain.unmap(m)
        assert noiommu.calls[-1] == f"munlock {vaddr:#x}+0x2000"


def test_noiommu_availability_is_one_check_that_auto_uses(
    sysfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    param = sysfs / "module/vfio/parameters/enable_unsafe_noiommu_mode"
    param.parent.mkdir(parents=True, exist_ok=True)
    param.write_text("Y\n")
    (sysfs / "class/iommu").mkdir(parents=True, exist_ok=True)
    assert noiommu_mod.available(sysfs)  # the mode is on and no IOMMU is registered
    assert backend_choice("auto", sysfs=sysfs, devfs=tmp_path / "dev").backend == "noiommu"
    (sysfs / "class/iommu/dmar0").mkdir()
    assert not noiommu_mod.available(sysfs)  # an IOMMU: devices get real groups
    param.write_text("N\n")
    assert not noiommu_mod.available(sysfs)
    # backend_choice asks noiommu.available, not a copy of its test
    monkeypatch.setattr(noiommu_mod, "available", lambda sysfs=None: True)
    assert backend_choice("auto", sysfs=sysfs, devfs=tmp_path / "dev").backend == "noiommu"


@pytest.mark.parametrize("backend", ["type1", "noiommu"])
def test_open_group_opens_the_node_in_the_devfs_given(
    fake: FakeKernel, sysfs: Path, tmp_path: Path, backend: str
) -> None:
    devfs = tmp_path / "dev"
    fake.noiommu = backend == "noiommu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoIommuWarning)
        domain = new_domain(backend, sysfs=sysfs)
    node = devfs / "vfio" / ("noiommu-9" if backend == "noiommu" else "9")
    with domain:
        assert isinstance(domain, Type1Container)
        with pytest.raises(UvdmaOSError, match=str(node)):  # the fake has no such node
            domain.open_group(9, sysfs, devfs)
        assert f"open {node}" in fake.calls
    if backend == "noiommu":
        (sysfs / "kernel/iommu_groups/9/name").write_text("vfio-noiommu\n")
    with pytest.raises(UvdmaOSError, match=str(node)), warnings.catch_warnings():
        warnings.simplefilter("ignore", NoIommuWarning)
        open_device(NVME, backend=backend, sysfs=sysfs, devfs=devfs)  # threaded through
    assert fake.open_kinds() == []


# -- no-IOMMU placement: the pool grown for the search, bounded, and shrunk back -----------------

ZONEINFO = """\
Node 0, zone      DMA
  per-node stats
      nr_inactive_anon 0
  pages free     3840
        boost    0
        min      21
        low      26
        high     31
        spanned  4095
        present  3998
        managed  3840
        protection: (0, 1920, 2880, 2880, 2880)
      nr_free_pages 3840
  pagesets
    cpu: 0
              count: 0
              high:  0
              batch: 1
  node_unreclaimable:  0
  start_pfn:           1
Node 0, zone    DMA32
  pages free     {dma32}
        boost    0
        min      100
        low      125
        high     150
        spanned  1044480
        present  520000
        managed  500000
  node_unreclaimable:  0
  start_pfn:           4096
Node 0, zone   Normal
  pages free     {normal}
        boost    0
        min      200
        low      256
        high     300
        spanned  262144
        present  262144
        managed  250000
  node_unreclaimable:  0
  start_pfn:           1048576
Node 0, zone  Movable
  pages free     0
        boost    0
        min      0
        low      0
        high     0
        spanned  0
        present  0
        managed  0
"""


@pytest.fixture
def pool(noiommu: FakeKernel, tmp_path: Path) -> dict[str, Path]:
    """A stand-in /proc (3 GiB guest: 2 GiB below 4 GiB, 1 GiB above) and 2 MiB pool."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "zoneinfo").write_text(ZONEINFO.format(dma32=400_000, normal=256 + 512 * 100))
    (proc / "meminfo").write_text(
        "MemTotal:        3000000 kB\nMemFree:         2000000 kB\nMemAvailable:    2400000 kB\n"
    )
    (proc / "self/status").write_text("VmLck:\t       0 kB\nCapEff:\t000001ffffffffff\n")
    huge = tmp_path / "hp/kernel/mm/hugepages/hugepages-2048kB"
    huge.mkdir(parents=True)
    (huge / "nr_hugepages").write_text(f"{noiommu.free_hugepages[2 * MiB]}\n")
    (huge / "free_hugepages").write_text(f"{noiommu.free_hugepages[2 * MiB]}\n")
    return {"proc": proc, "sysfs": tmp_path / "hp", "nr": huge / "nr_hugepages"}


def test_noiommu_alloc_below_grows_the_pool_to_reach_below_the_limit_and_shrinks_it_back(
    noiommu: FakeKernel, sysfs: Path, pool: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the 16 free pages lie above 4 GiB; pages the pool grows by come from below once the
    # 100 hugepages' worth free above 4 GiB is used up (the kernel's highest zone first)
    order: dict[int, int] = {}
    high_left = [16 + 100]

    def physical(vaddr: int) -> int:
        base = vaddr & ~(2 * MiB - 1)
        if base not in order:
            if high_left[0] > 0:
                high_left[0] -= 1
                order[base] = 0x1_0000_0000 + len(order) * 2 * MiB
            else:
                order[base] = 0x8000_0000 + len(order) * 2 * MiB
        return order[base] + vaddr - base

    asked: list[int] = []

    def reserve(page: int, count: int, sysfs: Path, **kw: object) -> hugepages.HugepagePool:
        assert page == 2 * MiB and kw["meminfo"] == pool["proc"] / "meminfo"
        current = int(pool["nr"].read_text())
        noiommu.free_hugepages[page] += count - current
        pool["nr"].write_text(f"{count}\n")
        asked.append(count)
        return hugepages.HugepagePool(page, count, noiommu.free_hugepages[page])

    noiommu.physical = physical
    monkeypatch.setattr(hugepages, "reserve_hugepages", reserve)
    with pytest.warns(NoIommuWarning), open_device(NVME, sysfs=sysfs) as dev:
        domain = dev.domain
        assert isinstance(domain, NoIommuContainer)
        domain.sysfs, domain.procfs = pool["sysfs"], pool["proc"]
        with pytest.raises(IovaExhaustedError, match=r"16 free hugepage\(s\)"):
            domain.alloc_below(2 * MiB, U32, grow=False)  # placement without growing fails
        assert asked == []
        with domain.alloc_below(2 * MiB, U32) as mem:
            phys = physical(mem.vaddr)
            assert phys + 2 * MiB - 1 <= U32  # below 4 GiB
            # grown by what lies above 4 GiB (100 pages), then by the margin (whose pages
            # the kernel hands out first), then shrunk back
            assert asked == [16 + 100, 16 + 100 + noiommu_mod.GROW_MARGIN, 16]
            assert int(pool["nr"].read_text()) == 16
            assert noiommu.free_hugepages[2 * MiB] == 15  # the one kept is one of the 16
            m = domain.map_memory(mem, windows=[(0, U32)])
            assert m.iova == phys
            domain.unmap(m)
        assert noiommu.free_hugepages[2 * MiB] == 16


def test_noiommu_alloc_below_does_not_grow_past_what_the_machine_can_spare(
    noiommu: FakeKernel, sysfs: Path, pool: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []
    monkeypatch.setattr(hugepages, "reserve_hugepages", lambda *a, **k: asked.append(a[1]))
    noiommu.physical = lambda v: 0x2_0000_0000 + v % (2 * MiB)  # every page above 4 GiB
    # 2 GiB free above 4 GiB: more than 2400000 kB available less a quarter of 3000000 kB
    (pool["proc"] / "zoneinfo").write_text(ZONEINFO.format(dma32=400_000, normal=524_544))
    with pytest.warns(NoIommuWarning), open_device(NVME, sysfs=sysfs) as dev:
        domain = dev.domain
        assert isinstance(domain, NoIommuContainer)
        domain.sysfs, domain.procfs = pool["sysfs"], pool["proc"]
        with pytest.raises(
            IovaExhaustedError,
            match=r"the pool was not grown: reaching below it means first taking the 2048 MiB "
            r"free above it, more than this machine can spare \(1610 MiB.*hugepages=N",
        ):
            domain.alloc_below(2 * MiB, U32)
        assert asked == []  # nothing grown
        assert noiommu.free_hugepages[2 * MiB] == 16  # every page probed went back
        (pool["proc"] / "zoneinfo").unlink()
        with pytest.raises(IovaExhaustedError, match="zoneinfo cannot say"):
            domain.alloc_below(2 * MiB, U32)
        assert asked == []


def test_zones_are_read_from_zoneinfo(tmp_path: Path) -> None:
    (tmp_path / "zoneinfo").write_text(ZONEINFO.format(dma32=1000, normal=5000))
    got = noiommu_mod.zones(tmp_path)
    assert [(z.name, z.start, z.end) for z in got] == [
        ("DMA", 4096, 4096 * 4096),
        ("DMA32", 4096 * 4096, (4096 + 1044480) * 4096),
        ("Normal", 1 << 32, (1 << 32) + 262144 * 4096),
    ]  # the empty Movable zone is left out
    assert got[2].free == 5000 * 4096 and got[2].spare == (5000 - 256) * 4096
    assert noiommu_mod.memory_above(U32, tmp_path) == (5000 - 256) * 4096
    assert noiommu_mod.memory_above((1 << 24) - 1, tmp_path) == (1000 - 125 + 5000 - 256) * 4096
    assert noiommu_mod.memory_above(U32, tmp_path / "nowhere") is None
