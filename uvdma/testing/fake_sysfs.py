"""A stand-in sysfs tree: PCI devices, their drivers, IOMMU groups and vfio cdevs."""

from __future__ import annotations

from pathlib import Path


def make_device(
    sysfs: Path,
    bdf: str,
    cls: int,
    group: int,
    driver: str | None,
    vendor: int = 0x1B36,
    cdev: int | None = None,
) -> None:
    """Add one PCI function (and its IOMMU group, driver and cdev) to the tree."""
    d = sysfs / "bus/pci/devices" / bdf
    d.mkdir(parents=True)
    (d / "vendor").write_text(f"{vendor:#06x}\n")
    (d / "device").write_text("0x0010\n")
    (d / "class").write_text(f"{cls:#08x}\n")
    (d / "driver_override").write_text("(null)\n")
    g = sysfs / "kernel/iommu_groups" / str(group) / "devices"
    g.mkdir(parents=True, exist_ok=True)
    (g / bdf).symlink_to(d)
    (d / "iommu_group").symlink_to(sysfs / "kernel/iommu_groups" / str(group))
    if driver:
        drv = sysfs / "bus/pci/drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        (d / "driver").symlink_to(drv)
    if cdev is not None:
        (d / "vfio-dev" / f"vfio{cdev}").mkdir(parents=True)


def add_block(
    parent: Path,
    name: str,
    devno: str,
    *,
    partition: bool = False,
    holders: dict[str, str] | None = None,
) -> Path:
    """A block device under ``parent`` (a PCI device, an NVMe controller, or a disk for a
    partition): ``dev``, ``subsystem -> class/block``, ``holders/`` (name -> dm name)."""
    sysfs = parent
    while not (sysfs / "bus").is_dir():  # the root of the stand-in tree
        sysfs = sysfs.parent
    d = parent / name
    d.mkdir(parents=True)
    (d / "dev").write_text(f"{devno}\n")
    (sysfs / "class/block").mkdir(parents=True, exist_ok=True)
    (d / "subsystem").symlink_to(sysfs / "class/block")
    if partition:
        (d / "partition").write_text("1\n")
    (d / "holders").mkdir()
    for holder, dm_name in (holders or {}).items():
        h = sysfs / "devices/virtual/block" / holder
        (h / "dm").mkdir(parents=True, exist_ok=True)
        (h / "dm/name").write_text(f"{dm_name}\n")
        (d / "holders" / holder).symlink_to(h)
    link = sysfs / "class/block" / name
    if not link.exists():
        link.symlink_to(d)
    return d


def add_process(procfs: Path, pid: int, comm: str, fds: dict[int, str]) -> None:
    """A process in a stand-in /proc: ``comm`` and ``fd/N -> target`` links."""
    p = procfs / str(pid)
    (p / "fd").mkdir(parents=True)
    (p / "comm").write_text(f"{comm}\n")
    for n, target in fds.items():
        (p / "fd" / str(n)).symlink_to(target)
