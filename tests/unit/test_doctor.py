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


def test_every_kernel_gets_a_backend_and_a_mode_line(tmp_path: Path) -> None:
    sysfs, devfs = tree(tmp_path, iommu=True, vfio=True, free_2m=64)
    whats = [c.what for c in doctor.run_checks(sysfs=sysfs, devfs=devfs)]
    why = f"no {devfs}/iommu: this kernel has no iommufd (CONFIG_IOMMUFD), so type1"
    assert f"backend: type1 ({why})" in whats
    assert "mode: IOMMU-protected (DMA only where uvdma maps memory)" in whats
    (devfs / "iommu").write_text("")
    (devfs / "vfio/devices").mkdir()
    whats = [c.what for c in doctor.run_checks(sysfs=sysfs, devfs=devfs)]
    assert f"backend: iommufd ({devfs}/iommu and vfio cdevs ({devfs}/vfio/devices) exist)" in whats


def test_no_iommu_mode_is_a_warning_that_says_unprotected_not_a_failure(tmp_path: Path) -> None:
    sysfs, devfs = tree(tmp_path, iommu=False, vfio=True, free_2m=64)
    param = sysfs / "module/vfio/parameters/enable_unsafe_noiommu_mode"
    param.parent.mkdir(parents=True)
    param.write_text("Y\n")
    (sysfs / "bus/pci/devices/0000:01:00.0/iommu_group").unlink()  # none until vfio-pci binds
    checks = doctor.run_checks("01:00.0", sysfs=sysfs, devfs=devfs)
    assert not any(c.what == "no IOMMU is active" for c in by_status(checks, "fail"))
    warns = [c.what for c in by_status(checks, "warn")]
    assert any("unsafe no-IOMMU mode is on" in w and "unprotected" in w for w in warns)
    assert any(w.startswith("mode: no-IOMMU, UNPROTECTED") for w in warns)
    assert any("no IOMMU group yet: in no-IOMMU mode vfio-pci makes one" in w for w in warns)
    assert any(c.what.startswith("backend: noiommu (") for c in checks)
