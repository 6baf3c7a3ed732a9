"""The guest is what we claim: an active IOMMU, NVMe controllers in their own groups,
binding to vfio-pci gives /dev/vfio/<group>, and the hugepages we asked for.

Runs inside the QEMU test VM (``tools/test`` boots it); skipped elsewhere.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from uvdma import pci

pytestmark = pytest.mark.vm


def test_an_iommu_is_active() -> None:
    # The emulated VT-d registers as an IOMMU (dmar0) and puts devices into groups.
    iommus = list(Path("/sys/class/iommu").iterdir())
    assert [p.name for p in iommus] == ["dmar0"]
    groups = list(Path("/sys/kernel/iommu_groups").iterdir())
    assert groups, "no IOMMU groups: the IOMMU is not translating"
    assert all(d.iommu_group is not None for d in pci.list_devices())


def test_each_nvme_controller_sits_alone_in_its_own_group() -> None:
    controllers = pci.nvme_controllers()
    assert len(controllers) == int(os.environ["UVDMA_VM_NVME"])
    groups = [d.iommu_group for d in controllers]
    assert None not in groups
    assert len(set(groups)) == len(groups)
    for dev, group in zip(controllers, groups, strict=True):
        assert group is not None
        assert [d.address for d in pci.group_devices(group)] == [dev.address]


def test_controllers_came_up_bound_to_vfio_pci() -> None:
    assert os.environ["UVDMA_VM_BOUND"] == "1", "tools/test runs the VM tier with --bind"
    for dev in pci.nvme_controllers():
        assert dev.driver == "vfio-pci"
        assert dev.iommu_group is not None
        node = pci.vfio_group_path(dev.iommu_group)
        assert stat.S_ISCHR(node.stat().st_mode)


def test_unbind_gives_the_device_back_and_bind_makes_the_group_node() -> None:
    dev = pci.nvme_controllers()[-1]
    group = dev.iommu_group
    assert group is not None
    node = pci.vfio_group_path(group)
    try:
        assert pci.unbind(dev.address) == "nvme"
        assert dev.driver == "nvme"
        assert not node.exists()
        assert pci.bind(dev.address) == "nvme"
        assert dev.driver == "vfio-pci"
        assert stat.S_ISCHR(node.stat().st_mode)
    finally:
        if dev.driver != "vfio-pci":
            pci.bind(dev.address)


def test_hugepages_are_reserved() -> None:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    size_kb = {"2M": 2048, "1G": 1048576}[os.environ["UVDMA_VM_HUGEPAGE_SIZE"]]
    assert int(meminfo["Hugepagesize"].split()[0]) == size_kb
    assert int(meminfo["HugePages_Total"]) == int(os.environ["UVDMA_VM_HUGEPAGES"])
