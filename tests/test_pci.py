"""uvdma.pci against a stand-in sysfs tree: parsing, discovery, and the refusals.

That binding really works is proven in the VM tier (tests/vm/test_guest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fake_sysfs import make_device
from uvdma import pci
from uvdma.errors import PciError


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    make_device(tmp_path, "0000:00:09.0", pci.NVME_CLASS, 9, "nvme")
    make_device(tmp_path, "0000:01:00.0", 0x020000, 14, "vfio-pci", vendor=0x8086)
    make_device(tmp_path, "0000:01:00.1", 0x020000, 14, "ixgbe", vendor=0x8086)
    (tmp_path / "bus/pci/drivers_probe").write_text("")
    return tmp_path


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("0000:01:00.0", "0000:01:00.0"),
        ("01:00.1", "0000:01:00.1"),
        ("  0001:ff:1f.7 ", "0001:ff:1f.7"),
        ("00:0A.0", "0000:00:0a.0"),
    ],
)
def test_addresses_parse_and_normalise(text: str, want: str) -> None:
    assert str(pci.PciAddress.parse(text)) == want


@pytest.mark.parametrize("text", ["", "01:00", "0000:01:00.8", "00:20.0", "zz:00.0", "1:2:3:4.0"])
def test_malformed_addresses_say_how_to_write_one(text: str) -> None:
    with pytest.raises(PciError, match=r"DDDD:BB:DD\.F"):
        pci.PciAddress.parse(text)


def test_discovery_reads_sysfs(sysfs: Path) -> None:
    devices = pci.list_devices(sysfs)
    assert [str(d) for d in devices] == ["0000:00:09.0", "0000:01:00.0", "0000:01:00.1"]
    nvme = pci.nvme_controllers(sysfs)
    assert [(str(d), d.driver, d.iommu_group, d.vendor) for d in nvme] == [
        ("0000:00:09.0", "nvme", 9, 0x1B36)
    ]
    assert [str(d) for d in pci.group_devices(14, sysfs)] == ["0000:01:00.0", "0000:01:00.1"]


def test_absent_device_is_a_clear_error(sysfs: Path) -> None:
    with pytest.raises(PciError, match=r"no PCI device at 0000:05:00\.0.*uvdma list"):
        pci.device("05:00.0", sysfs)


def test_bind_refuses_when_vfio_pci_is_not_loaded(tmp_path: Path) -> None:
    make_device(tmp_path, "0000:00:09.0", pci.NVME_CLASS, 9, "nvme")
    with pytest.raises(PciError, match="modprobe vfio-pci"):
        pci.bind("00:09.0", tmp_path)
    assert (tmp_path / "bus/pci/devices/0000:00:09.0/driver_override").read_text() == "(null)\n"


def test_bind_refuses_a_group_that_is_not_viable_and_changes_nothing(sysfs: Path) -> None:
    with pytest.raises(PciError) as info:
        pci.bind("0000:01:00.0", sysfs)
    assert "IOMMU group 14 is not viable: bind 0000:01:00.1 (ixgbe) to vfio-pci too" in str(
        info.value
    )
    assert (sysfs / "bus/pci/devices/0000:01:00.0/driver_override").read_text() == "(null)\n"
    assert (sysfs / "bus/pci/drivers_probe").read_text() == ""


def test_bind_refuses_a_device_without_an_iommu_group(sysfs: Path) -> None:
    (sysfs / "bus/pci/devices/0000:00:09.0/iommu_group").unlink()
    with pytest.raises(PciError, match=r"no IOMMU group.*intel_iommu=on"):
        pci.bind("00:09.0", sysfs)


def test_group_blockers_ignore_viable_drivers(sysfs: Path) -> None:
    assert [str(d) for d in pci.group_blockers(14, sysfs)] == ["0000:01:00.1"]
    assert pci.group_blockers(9, sysfs) == [pci.device("00:09.0", sysfs)]
    assert pci.group_blockers(9, sysfs, besides=pci.PciAddress.parse("00:09.0")) == []
