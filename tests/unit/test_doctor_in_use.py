"""`uvdma doctor BDF` says when a device's block devices are in use (`bind` would refuse)."""

from __future__ import annotations

from pathlib import Path

from uvdma import doctor, pci
from uvdma.testing.fake_sysfs import add_block, make_device

BDF = "0000:01:00.0"


def test_doctor_names_what_uses_a_device_before_bind_would(tmp_path: Path) -> None:
    sysfs, devfs, procfs = tmp_path / "sys", tmp_path / "dev", tmp_path / "proc"
    make_device(sysfs, BDF, pci.NVME_CLASS, 14, "nvme")
    ctrl = sysfs / "bus/pci/devices" / BDF / "nvme/nvme0"
    ctrl.mkdir(parents=True)
    add_block(ctrl, "nvme0n1", "259:1")
    (procfs / "self").mkdir(parents=True)
    (procfs / "self/mountinfo").write_text("70 23 259:1 / /home rw - ext4 /dev/nvme0n1 rw\n")
    devfs.mkdir()
    checks = doctor.run_checks(BDF, sysfs=sysfs, devfs=devfs, procfs=procfs)
    failed = {c.what: c.fix for c in checks if c.status == "fail"}
    what = f"{BDF} is bound to nvme and in use: nvme0n1 is mounted on /home"
    assert what in failed
    assert failed[what].startswith("stop using it (unmount")
    (procfs / "self/mountinfo").write_text("")
    checks = doctor.run_checks(BDF, sysfs=sysfs, devfs=devfs, procfs=procfs)
    assert f"{BDF} is bound to nvme" in {c.what for c in checks if c.status == "fail"}
