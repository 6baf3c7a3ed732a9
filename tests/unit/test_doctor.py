"""`uvdma doctor` on stand-in sysfs/dev trees: each problem reported with its fix."""

from __future__ import annotations

from pathlib import Path

from uvdma import doctor, pci
from uvdma.testing.fake_sysfs import make_device


def tree(tmp_path: Path, *, iommu: bool, vfio: bool, free_2m: int) -> tuple[Path, Path]:
    sysfs, devfs = tmp_path / "sys", tmp_path / "dev"
    make_device(sysfs, "0000:01:00.0", pci.NVME_CLASS, 14, "nvme")
    make_device(sysfs, "0000:01:00.1", 0x020000, 14, "ixgbe")
    if iommu:
        (sysfs / "class/iommu/dmar0").mkdir(parents=True)
    else:
        for p in sorted((sysfs / "kernel/iommu_groups").rglob("*"), reverse=True):
            p.unlink() if p.is_symlink() else p.rmdir()
    if vfio:
        (sysfs / "bus/pci/drivers/vfio-pci").mkdir(parents=True)
        (devfs / "vfio").mkdir(parents=True)
        (devfs / "vfio/vfio").write_text("")
    h = sysfs / "kernel/mm/hugepages/hugepages-2048kB"
    h.mkdir(parents=True)
    (h / "nr_hugepages").write_text(str(free_2m))
    (h / "free_hugepages").write_text(str(free_2m))
    return sysfs, devfs


def by_status(checks: list[doctor.Check], status: str) -> list[doctor.Check]:
    return [c for c in checks if c.status == status]


def test_a_bare_machine_gets_every_fix(tmp_path: Path) -> None:
    sysfs, devfs = tree(tmp_path, iommu=False, vfio=False, free_2m=0)
    checks = doctor.run_checks(sysfs=sysfs, devfs=devfs)
    fixes = {c.what: c.fix for c in by_status(checks, "fail")}
    assert "intel_iommu=on" in fixes["no IOMMU is active"]
    assert fixes["vfio-pci is not loaded"] == "modprobe vfio-pci"
    warn = by_status(checks, "warn")[0]
    assert "fall back to 4 KiB pages" in warn.what
    assert warn.fix == "uvdma hugepages --size 2M --count 64 (as root)"


def test_a_device_in_a_shared_group_is_told_what_to_bind(tmp_path: Path) -> None:
    sysfs, devfs = tree(tmp_path, iommu=True, vfio=True, free_2m=64)
    checks = doctor.run_checks("01:00.0", sysfs=sysfs, devfs=devfs)
    fails = {c.what: c.fix for c in by_status(checks, "fail")}
    assert fails["0000:01:00.0 is bound to nvme"] == "uvdma bind 0000:01:00.0"
    assert fails["IOMMU group 14 is not viable"] == "bind 0000:01:00.1 (ixgbe) to vfio-pci too"
    assert any(c.what.startswith("hugepages 2M: 64 reserved, 64 free") for c in checks)


def test_an_absent_device_is_one_clear_failure(tmp_path: Path) -> None:
    sysfs, devfs = tree(tmp_path, iommu=True, vfio=True, free_2m=64)
    checks = doctor.run_checks("05:00.0", sysfs=sysfs, devfs=devfs)
    assert [c.what for c in by_status(checks, "fail")] == [
        "no PCI device at 0000:05:00.0: see `uvdma list` or `lspci -D` for what exists"
    ]
