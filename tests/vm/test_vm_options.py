"""The guest is what `uvdma vm run`'s options promised: throttled controllers are slow for
real (--nvme-iops), in PCI address order; the IOMMU mode (--iommu) and the kernel
(--kernel) are the ones asked for.

The throttle test reads through the kernel's own nvme driver with O_DIRECT, so it proves
QEMU's throttling and nothing of uvdma's; it needs a guest booted with at least one
throttled and one unthrottled controller, e.g. `uvdma vm run --nvme 3 --nvme-iops 0,0,2`.
"""

from __future__ import annotations

import functools
import gzip
import mmap
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from uvdma import pci

pytestmark = pytest.mark.vm

SYS_PCI = Path("/sys/bus/pci")


def iops_limits() -> list[int]:
    text = os.environ.get("UVDMA_VM_NVME_IOPS", "")
    return [int(n) for n in text.split(",")] if text else []


def test_one_iops_entry_per_controller() -> None:
    limits = iops_limits()
    assert len(limits) == int(os.environ["UVDMA_VM_NVME"])
    assert len(limits) == len(pci.nvme_controllers())


def wait_for(what: str, ready: Callable[[], bool], within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within:.0f} s")
        time.sleep(0.1)


def namespace_node(dev: pci.PciDevice) -> Path | None:
    """/dev/nvmeXn1 of a controller bound to the kernel's nvme driver."""
    for ctrl in (dev.path / "nvme").glob("nvme*"):
        for ns in ctrl.glob(f"{ctrl.name}n*"):
            node = Path("/dev") / ns.name
            if node.exists():
                return node
    return None


def has_namespace(dev: pci.PciDevice) -> bool:
    return namespace_node(dev) is not None


@pytest.fixture
def on_kernel_driver() -> Iterator[list[pci.PciDevice]]:
    """Every controller bound to the kernel's nvme driver; put back as found after."""
    controllers = pci.nvme_controllers()
    before = {d.address: d.driver for d in controllers}
    for dev in controllers:
        if dev.driver == "nvme":
            continue
        if dev.driver is not None:
            (dev.path / "driver/unbind").write_text(str(dev.address))
        (dev.path / "driver_override").write_text("\n")
        (SYS_PCI / "drivers/nvme/bind").write_text(str(dev.address))
        wait_for(f"{dev.address}'s namespace", functools.partial(has_namespace, dev))
    try:
        yield controllers
    finally:
        for dev in controllers:
            if before[dev.address] == "vfio-pci" and dev.driver != "vfio-pci":
                # By hand, as `uvdma bind --force` would: udev may still have the new
                # namespace open from its probe, and this is the test's own device.
                if dev.driver is not None:
                    (dev.path / "driver/unbind").write_text(str(dev.address))
                (dev.path / "driver_override").write_text("vfio-pci")
                (SYS_PCI / "drivers_probe").write_text(str(dev.address))
                assert dev.driver == "vfio-pci"


def serial(dev: pci.PciDevice) -> str:
    ctrl = next((dev.path / "nvme").glob("nvme*"))
    return (ctrl / "serial").read_text().strip()


def test_controllers_are_in_creation_order(on_kernel_driver: list[pci.PciDevice]) -> None:
    # --nvme-iops 0,0,1 means the third controller created, i.e. the third in PCI
    # address order: QEMU gives them slots in order; the serial says which one it is.
    ordered = sorted(on_kernel_driver, key=lambda d: d.address)
    assert [serial(d) for d in ordered] == [f"uvdma{i:04d}" for i in range(len(ordered))]


def timed_reads(node: Path, count: int) -> float:
    """Seconds for ``count`` 4 KiB O_DIRECT reads, one after the other, far apart."""
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    fd = os.open(node, os.O_RDONLY | os.O_DIRECT)
    try:
        t0 = time.monotonic()
        for i in range(count):
            assert os.preadv(fd, [buf], (i + 1) << 20) == 4096
        return time.monotonic() - t0
    finally:
        os.close(fd)
        buf.close()


def test_a_throttled_controller_is_slow_for_real(on_kernel_driver: list[pci.PciDevice]) -> None:
    limits = iops_limits()
    ordered = sorted(on_kernel_driver, key=lambda d: d.address)
    slow = [(d, n) for d, n in zip(ordered, limits, strict=True) if n]
    fast = [d for d, n in zip(ordered, limits, strict=True) if not n]
    if not slow or not fast:
        pytest.skip("needs a throttled and an unthrottled controller: --nvme-iops 0,0,2")
    dev, iops = slow[0]
    reads = 4
    # Let what the driver's probe read (partition table) drain from the bucket first.
    time.sleep(2.0 / iops + 0.5)
    fast_node, slow_node = namespace_node(fast[0]), namespace_node(dev)
    assert fast_node is not None and slow_node is not None
    t_fast = timed_reads(fast_node, reads)
    t_slow = timed_reads(slow_node, reads)
    # QEMU's leaky bucket lets about one I/O through per 1/iops s: (reads - 1) / iops at
    # least (a margin of 20% for the bucket's slack); unthrottled, far less.
    assert t_slow >= 0.8 * (reads - 1) / iops, (t_slow, t_fast)
    assert t_fast < t_slow / 4, (t_slow, t_fast)


def test_the_iommu_mode_is_the_one_asked_for() -> None:
    iommus = [p.name for p in Path("/sys/class/iommu").iterdir()]
    if os.environ["UVDMA_VM_IOMMU"] == "intel":
        assert iommus == ["dmar0"]
        return
    assert iommus == []  # no emulated IOMMU at all
    param = Path("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode")
    assert param.read_text().strip() == "Y"


def running_config() -> dict[str, str]:
    path = Path("/proc/config.gz")
    if not path.exists():
        return {}
    out = {}
    for line in gzip.decompress(path.read_bytes()).decode().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def test_the_kernel_is_the_one_asked_for() -> None:
    kernel = os.environ["UVDMA_VM_KERNEL"]
    ours = os.uname().release.endswith("-uvdma")
    if kernel in ("stock", "built"):
        assert ours == (kernel == "built"), (kernel, os.uname().release)
    if not ours:
        return
    config = running_config()
    for option in ("IOMMUFD", "VFIO_DEVICE_CDEV", "VFIO_NOIOMMU", "VFIO_CONTAINER"):
        assert config.get(f"CONFIG_{option}") == "y", option
    assert "CONFIG_IOMMUFD_VFIO_CONTAINER" not in config  # type1 is the real one
    assert Path("/dev/iommu").exists()
