"""uvdma.pci against a stand-in sysfs tree: parsing, discovery, and the refusals.

That binding really works is proven in the VM tier (tests/vm/test_guest.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from uvdma import pci
from uvdma.errors import DeviceInUseError, PciError
from uvdma.testing.fake_sysfs import add_block, add_process, make_device


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


# -- bind never takes a device in use ---------------------------------------------------------

BDF = "0000:00:09.0"


@pytest.fixture
def nvme_tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(sysfs, procfs, devfs): an NVMe controller bound to nvme with one namespace and a
    partition, vfio-pci loaded, and nothing using them yet."""
    sysfs, procfs, devfs = tmp_path / "sys", tmp_path / "proc", tmp_path / "dev"
    make_device(sysfs, BDF, pci.NVME_CLASS, 9, "nvme")
    (sysfs / "bus/pci/drivers/vfio-pci").mkdir(parents=True)
    (sysfs / "bus/pci/drivers_probe").write_text("")
    ctrl = sysfs / "bus/pci/devices" / BDF / "nvme/nvme0"
    ctrl.mkdir(parents=True)
    ns = add_block(ctrl, "nvme0n1", "259:1")
    add_block(ns, "nvme0n1p1", "259:2", partition=True)
    (procfs / "self").mkdir(parents=True)
    (procfs / "self/mountinfo").write_text(
        "23 1 0:21 / / ro,relatime - 9p /dev/root ro\n22 23 0:20 / /proc rw,nosuid - proc proc rw\n"
    )
    (procfs / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")
    devfs.mkdir()
    return sysfs, procfs, devfs


def untouched(sysfs: Path) -> bool:
    d = sysfs / "bus/pci/devices" / BDF
    return (d / "driver_override").read_text() == "(null)\n" and (
        sysfs / "bus/pci/drivers_probe"
    ).read_text() == ""


def test_block_devices_of_a_controller_are_its_namespaces_and_partitions(
    nvme_tree: tuple[Path, Path, Path],
) -> None:
    sysfs, _, _ = nvme_tree
    got = pci.block_devices(BDF, sysfs)
    assert [(b.name, b.devno) for b in got] == [("nvme0n1", (259, 1)), ("nvme0n1p1", (259, 2))]


def test_a_native_multipath_head_counts_as_the_controllers(tmp_path: Path) -> None:
    sysfs = tmp_path
    make_device(sysfs, BDF, pci.NVME_CLASS, 9, "nvme")
    ctrl = sysfs / "bus/pci/devices" / BDF / "nvme/nvme0"
    ctrl.mkdir(parents=True)
    add_block(ctrl, "nvme0c0n1", "259:0")  # the hidden path
    head = add_block(sysfs / "devices/virtual/nvme-subsystem/nvme-subsys0", "nvme0n1", "259:1")
    add_block(head, "nvme0n1p1", "259:2", partition=True)
    names = [b.name for b in pci.block_devices(BDF, sysfs)]
    assert names == ["nvme0c0n1", "nvme0n1", "nvme0n1p1"]


@pytest.mark.parametrize(
    ("use", "said"),
    [
        ("mount", "nvme0n1p1 is mounted on /srv/my data"),
        ("mount-by-name", "nvme0n1 is mounted on /mnt"),
        (
            "other-namespace",
            "nvme0n1 is mounted on /data (in the mount namespace of pid 77 (containerd))",
        ),
        ("swap", "nvme0n1p1 is in use as swap"),
        ("dm", "nvme0n1 is held by dm-0 (device-mapper vg-root)"),
        ("open", "nvme0n1 is open in pid 4242 (dd)"),
    ],
)
def test_bind_refuses_a_device_in_use_naming_the_use_and_changes_nothing(
    nvme_tree: tuple[Path, Path, Path], use: str, said: str
) -> None:
    sysfs, procfs, devfs = nvme_tree
    ns = sysfs / "bus/pci/devices" / BDF / "nvme/nvme0/nvme0n1"
    mountinfo = procfs / "self/mountinfo"
    if use == "mount":
        mountinfo.write_text(
            mountinfo.read_text() + "70 23 259:2 / /srv/my\\040data rw - ext4 /dev/nvme0n1p1 rw\n"
        )
    elif use == "mount-by-name":  # btrfs and friends show an anonymous 0:N: go by source
        mountinfo.write_text(
            mountinfo.read_text() + "70 23 0:45 / /mnt rw - btrfs /dev/nvme0n1 rw\n"
        )
    elif use == "other-namespace":
        (procfs / "self/ns").mkdir()
        (procfs / "self/ns/mnt").symlink_to("mnt:[4026531841]")
        add_process(procfs, 77, "containerd", {})
        (procfs / "77/ns").mkdir()
        (procfs / "77/ns/mnt").symlink_to("mnt:[4026532000]")
        (procfs / "77/mountinfo").write_text("90 80 259:1 / /data rw - xfs /dev/nvme0n1 rw\n")
    elif use == "swap":
        (procfs / "swaps").write_text(
            (procfs / "swaps").read_text() + "/dev/nvme0n1p1  partition\t65532\t0\t-2\n"
        )
    elif use == "dm":
        (ns / "holders").rmdir()
        (ns / "holders").mkdir()
        h = sysfs / "devices/virtual/block/dm-0"
        (h / "dm").mkdir(parents=True)
        (h / "dm/name").write_text("vg-root\n")
        (h / "dm/uuid").write_text("CRYPT-xyz\n")
        (ns / "holders/dm-0").symlink_to(h)
    elif use == "open":
        add_process(procfs, 4242, "dd", {0: "/dev/null", 3: "/dev/nvme0n1"})
    with pytest.raises(DeviceInUseError) as info:
        pci.bind(BDF, sysfs, procfs=procfs, devfs=devfs, settle=0)
    assert said in info.value.users
    assert said in str(info.value)
    assert "--force" in str(info.value) and "Nothing was changed" in str(info.value)
    assert untouched(sysfs)
    assert pci.device(BDF, sysfs).driver == "nvme"


def test_lvm_and_md_holders_are_named(nvme_tree: tuple[Path, Path, Path]) -> None:
    sysfs, procfs, devfs = nvme_tree
    part = sysfs / "bus/pci/devices" / BDF / "nvme/nvme0/nvme0n1/nvme0n1p1"
    h = sysfs / "devices/virtual/block/dm-3"
    (h / "dm").mkdir(parents=True)
    (h / "dm/name").write_text("vg0-lv0\n")
    (h / "dm/uuid").write_text("LVM-abcdef\n")
    (part / "holders/dm-3").symlink_to(h)
    md = sysfs / "devices/virtual/block/md127"
    md.mkdir(parents=True)
    (part / "holders/md127").symlink_to(md)
    users = pci.block_device_users(
        pci.block_devices(BDF, sysfs), sysfs=sysfs, procfs=procfs, devfs=devfs
    )
    assert users == [
        "nvme0n1p1 is held by dm-3 (LVM vg0-lv0)",
        "nvme0n1p1 is held by md127 (md RAID)",
    ]


def test_bind_of_a_device_nothing_uses_goes_ahead(nvme_tree: tuple[Path, Path, Path]) -> None:
    sysfs, procfs, devfs = nvme_tree
    add_process(procfs, 10, "bash", {0: "/dev/pts/0", 1: "/dev/nvme1n1"})  # another disk
    # the stand-in tree cannot really rebind: the driver link stays, and bind says so
    with pytest.raises(PciError, match="bound to nvme after probing"):
        pci.bind(BDF, sysfs, procfs=procfs, devfs=devfs)
    d = sysfs / "bus/pci/devices" / BDF
    assert (d / "driver_override").read_text() == "vfio-pci"  # it went ahead


def test_bind_force_takes_a_mounted_device(nvme_tree: tuple[Path, Path, Path]) -> None:
    sysfs, procfs, devfs = nvme_tree
    mountinfo = procfs / "self/mountinfo"
    mountinfo.write_text(mountinfo.read_text() + "70 23 259:1 / /mnt rw - ext4 /dev/nvme0n1 rw\n")
    with pytest.raises(PciError, match="bound to nvme after probing"):
        pci.bind(BDF, sysfs, procfs=procfs, devfs=devfs, force=True)
    assert (sysfs / "bus/pci/devices" / BDF / "driver_override").read_text() == "vfio-pci"


# -- unbind acts only on vfio-pci ---------------------------------------------------------------


@pytest.mark.parametrize("driver", ["nvme", None])
def test_unbind_refuses_a_device_not_bound_to_vfio_pci_and_changes_nothing(
    tmp_path: Path, driver: str | None
) -> None:
    make_device(tmp_path, BDF, pci.NVME_CLASS, 9, driver)
    (tmp_path / "bus/pci/drivers_probe").write_text("")
    with pytest.raises(PciError) as info:
        pci.unbind(BDF, tmp_path)
    text = str(info.value)
    assert f"it is bound to {driver or 'no driver'}, not vfio-pci" in text
    assert "Nothing was changed" in text
    assert untouched(tmp_path)
    if driver:
        assert not (tmp_path / "bus/pci/drivers" / driver / "unbind").exists()


def test_holders_of_a_vfio_device_are_named(tmp_path: Path) -> None:
    sysfs, procfs = tmp_path / "sys", tmp_path / "proc"
    make_device(sysfs, BDF, pci.NVME_CLASS, 9, "vfio-pci")
    procfs.mkdir()
    # a VFIO device fd the kernel attributes to its device (fdinfo, kernels since 6.8)
    add_process(procfs, 300, "python3", {0: "/dev/null", 7: "anon_inode:[vfio-device]"})
    (procfs / "300/fdinfo").mkdir()
    (procfs / "300/fdinfo/7").write_text(
        f"pos:\t0\nflags:\t02000002\nvfio-device-syspath: /sys/devices/pci0000:00/{BDF}\n"
    )
    # another process with a VFIO device fd of another device, and one with nothing
    add_process(procfs, 301, "qemu", {4: "anon_inode:[vfio-device]"})
    (procfs / "301/fdinfo").mkdir()
    (procfs / "301/fdinfo/4").write_text(
        "vfio-device-syspath: /sys/devices/pci0000:00/0000:00:0a.0\n"
    )
    add_process(procfs, 302, "bash", {0: "/dev/null"})
    assert pci.device_holders(BDF, sysfs, procfs=procfs, rdevs=[]) == [(300, "python3")]


class SysfsKernel(threading.Thread):
    """Plays the kernel's part of a stand-in sysfs: a BDF written to a driver's ``unbind``
    drops the device's driver link, to its ``bind`` (or to ``drivers_probe``, for the
    driver named by ``driver_override`` or ``probes_to``) makes it."""

    def __init__(self, sysfs: Path, bdf: str, probes_to: str | None = "nvme") -> None:
        super().__init__(daemon=True)
        self.sysfs, self.bdf, self.probes_to = sysfs, bdf, probes_to
        self.stop = threading.Event()
        self.seen: list[str] = []

    def _take(self, f: Path) -> bool:
        try:
            got = f.read_text().strip() == self.bdf
        except OSError:
            return False
        if got:
            f.write_text("")
            self.seen.append(f"{f.parent.name}/{f.name}")
        return got

    def run(self) -> None:
        dev = self.sysfs / "bus/pci/devices" / self.bdf
        drivers = self.sysfs / "bus/pci/drivers"
        while not self.stop.wait(0.005):
            for drv in drivers.iterdir():
                if self._take(drv / "unbind") and (dev / "driver").is_symlink():
                    (dev / "driver").unlink()
                if self._take(drv / "bind") and not (dev / "driver").is_symlink():
                    (dev / "driver").symlink_to(drv)
            if self._take(self.sysfs / "bus/pci/drivers_probe"):
                override = (dev / "driver_override").read_text().strip()
                want = override if override not in ("", "(null)") else self.probes_to
                if want and not (dev / "driver").is_symlink():
                    (dev / "driver").symlink_to(drivers / want)


@pytest.fixture
def vfio_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A device on vfio-pci that bind took from nvme, with a stand-in kernel behind sysfs."""
    sysfs = tmp_path / "sys"
    make_device(sysfs, BDF, pci.NVME_CLASS, 9, "vfio-pci")
    for drv in ("vfio-pci", "nvme"):
        (sysfs / "bus/pci/drivers" / drv).mkdir(parents=True, exist_ok=True)
        for f in ("bind", "unbind"):
            (sysfs / "bus/pci/drivers" / drv / f).write_text("")
    (sysfs / "bus/pci/drivers_probe").write_text("")
    (sysfs / "bus/pci/devices" / BDF / "driver_override").write_text("vfio-pci\n")
    monkeypatch.setattr(pci, "STATE_DIR", tmp_path / "state")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / BDF).write_text("nvme")  # what bind remembered
    yield sysfs


def test_unbind_gives_the_device_back_through_the_detached_child(vfio_tree: Path) -> None:
    kernel = SysfsKernel(vfio_tree, BDF)
    kernel.start()
    try:
        lines: list[str] = []
        assert pci.unbind(BDF, vfio_tree, wait=60, progress=lines.append) == "nvme"
    finally:
        kernel.stop.set()
    d = vfio_tree / "bus/pci/devices" / BDF
    assert (d / "driver_override").read_text() == "\n"  # cleared, so nvme may probe it
    assert kernel.seen[0] == "vfio-pci/unbind"
    assert not (pci.STATE_DIR / BDF).exists()  # forgotten once it is back
    job = json.loads((pci.STATE_DIR / "unbinding" / f"{BDF}.json").read_text())
    assert job["done"] and job["driver"] == "nvme" and job["pid"] != os.getpid()


def test_an_unbind_cut_short_is_finished_by_the_next(vfio_tree: Path) -> None:
    d = vfio_tree / "bus/pci/devices" / BDF
    (d / "driver").unlink()  # vfio-pci let go, then the give-back child was killed
    (d / "driver_override").write_text("\n")
    jobs = pci.STATE_DIR / "unbinding"
    jobs.mkdir()
    (jobs / f"{BDF}.json").write_text(json.dumps({"pid": 999999999, "phase": "probing"}))
    kernel = SysfsKernel(vfio_tree, BDF, probes_to=None)  # only nvme's bind takes it
    kernel.start()
    try:
        lines: list[str] = []
        assert pci.unbind(BDF, vfio_tree, wait=60, progress=lines.append) == "nvme"
    finally:
        kernel.stop.set()
    assert "nvme/bind" in kernel.seen
    assert any("cut short" in line for line in lines)


def test_a_driver_that_will_not_take_the_device_back_is_said(vfio_tree: Path) -> None:
    (vfio_tree / "bus/pci/drivers/nvme/bind").unlink()  # the previous driver is gone
    kernel = SysfsKernel(vfio_tree, BDF, probes_to=None)
    kernel.start()
    try:
        with pytest.raises(PciError, match=r"nvme did not take the device back.*see dmesg"):
            pci.unbind(BDF, vfio_tree, wait=60)
    finally:
        kernel.stop.set()


def test_a_process_that_closes_the_device_soon_does_not_stop_bind(
    nvme_tree: tuple[Path, Path, Path],
) -> None:
    """udev's workers open every new block device for a moment: bind gives them time."""
    sysfs, procfs, devfs = nvme_tree
    add_process(procfs, 462, "(udev-worker)", {9: "/dev/nvme0n1"})
    threading.Timer(0.3, (procfs / "462/fd/9").unlink).start()
    with pytest.raises(PciError, match="bound to nvme after probing"):  # it went ahead
        pci.bind(BDF, sysfs, procfs=procfs, devfs=devfs, settle=10)
    # a mount is no passing use: refused at once
    mountinfo = procfs / "self/mountinfo"
    mountinfo.write_text(mountinfo.read_text() + "70 23 259:1 / /mnt rw - ext4 /dev/nvme0n1 rw\n")
    (sysfs / "bus/pci/devices" / BDF / "driver_override").write_text("(null)\n")
    start = time.monotonic()
    with pytest.raises(DeviceInUseError):
        pci.bind(BDF, sysfs, procfs=procfs, devfs=devfs, settle=10)
    assert time.monotonic() - start < 5
