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
