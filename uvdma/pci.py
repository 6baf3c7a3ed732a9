"""PCI devices through sysfs: addresses, discovery, IOMMU groups, driver binding.

Binding follows Documentation/driver-api/vfio.rst: set ``driver_override`` to
``vfio-pci``, unbind from the current driver, and ask the PCI core to probe again
(``/sys/bus/pci/drivers_probe``); the group's character device
``/dev/vfio/<group>`` then appears.  A group is usable by VFIO only when every
device in it is bound to vfio-pci, to pci-stub, to no driver, or is a bridge
(pcieport); :func:`bind` refuses up front, naming the devices, when it is not.

Every function takes a ``sysfs`` root (default ``/sys``) so tests can point it at
a stand-in tree.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from uvdma.errors import PciError

SYSFS = Path("/sys")
DEVFS = Path("/dev")
#: Where bind() remembers each device's previous driver, for unbind() to restore.
STATE_DIR = Path(os.environ.get("UVDMA_STATE_DIR", "/run/uvdma/bound"))
NVME_CLASS = 0x010802  # PCI class 01h (mass storage), 08h (NVM), 02h (NVM Express)
VFIO_PCI = "vfio-pci"
#: Drivers that leave an IOMMU group viable for VFIO (drivers/vfio/group.c and vfio-pci).
VIABLE_DRIVERS = frozenset({VFIO_PCI, "pci-stub", "pcieport"})

_BDF = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):"
    r"(?P<dev>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])$"
)


@dataclass(frozen=True, order=True)
class PciAddress:
    """A PCI function address, ``DDDD:BB:DD.F``."""

    domain: int
    bus: int
    device: int
    function: int

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """Parse ``0000:01:00.0`` or ``01:00.0`` (domain 0)."""
        m = _BDF.match(text.strip())
        if not m or int(m["dev"], 16) > 0x1F:
            raise PciError(
                f"{text!r} is not a PCI address: write DDDD:BB:DD.F or BB:DD.F, "
                "e.g. 0000:01:00.0 (see `uvdma list` or `lspci -D`)"
            )
        return cls(int(m["domain"] or "0", 16), int(m["bus"], 16), int(m["dev"], 16), int(m["fn"]))

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function}"


@dataclass(frozen=True)
class PciDevice:
    """One PCI function as sysfs shows it."""

    address: PciAddress
    sysfs: Path = SYSFS

    @property
    def path(self) -> Path:
        """``/sys/bus/pci/devices/<address>``."""
        return self.sysfs / "bus/pci/devices" / str(self.address)

    def _read_hex(self, name: str) -> int:
        return int((self.path / name).read_text().strip(), 16)

    @property
    def vendor(self) -> int:
        """PCI vendor ID."""
        return self._read_hex("vendor")

    @property
    def device(self) -> int:
        """PCI device ID."""
        return self._read_hex("device")

    @property
    def class_code(self) -> int:
        """24-bit class code (base class, subclass, programming interface)."""
        return self._read_hex("class")

    @property
    def driver(self) -> str | None:
        """Name of the bound driver, or None."""
        link = self.path / "driver"
        return Path(link.readlink()).name if link.is_symlink() else None

    @property
    def iommu_group(self) -> int | None:
        """The IOMMU group number, or None when no IOMMU translates for the device."""
        link = self.path / "iommu_group"
        return int(Path(link.readlink()).name) if link.is_symlink() else None

    def __str__(self) -> str:
        return str(self.address)


def device(address: str | PciAddress, sysfs: Path = SYSFS) -> PciDevice:
    """The device at ``address``; a clear error when it is malformed or absent."""
    addr = address if isinstance(address, PciAddress) else PciAddress.parse(address)
    dev = PciDevice(addr, sysfs)
    if not dev.path.exists():
        raise PciError(f"no PCI device at {addr}: see `uvdma list` or `lspci -D` for what exists")
    return dev


def list_devices(sysfs: Path = SYSFS) -> list[PciDevice]:
    """Every PCI function, in address order."""
    root = sysfs / "bus/pci/devices"
    if not root.is_dir():
        return []
    return sorted(
        (PciDevice(PciAddress.parse(p.name), sysfs) for p in root.iterdir()),
        key=lambda d: d.address,
    )


def group_devices(group: int, sysfs: Path = SYSFS) -> list[PciDevice]:
    """The devices in IOMMU group ``group``."""
    root = sysfs / "kernel/iommu_groups" / str(group) / "devices"
    return sorted(
        (PciDevice(PciAddress.parse(p.name), sysfs) for p in root.iterdir()),
        key=lambda d: d.address,
    )


def group_blockers(
    group: int, sysfs: Path = SYSFS, *, besides: PciAddress | None = None
) -> list[PciDevice]:
    """Devices that make ``group`` not viable for VFIO (bound to another driver)."""
    return [
        d
        for d in group_devices(group, sysfs)
        if d.address != besides and d.driver is not None and d.driver not in VIABLE_DRIVERS
    ]


def _write(path: Path, value: str, what: str) -> None:
    try:
        path.write_text(value)
    except PermissionError as e:
        raise PciError(f"{what}: permission denied writing {path}; run as root") from e
    except OSError as e:
        if e.errno == errno.ENODEV and path.name == "drivers_probe":
            return  # no driver wanted the device: that is an answer, not a failure
        raise PciError(f"{what}: writing {value.strip()!r} to {path} failed: {e}") from e


def bind(address: str | PciAddress, sysfs: Path = SYSFS) -> str | None:
    """Bind a device to vfio-pci; returns the driver it had (None if none).

    Refuses, changing nothing, when vfio-pci is not loaded, when the device has no
    IOMMU group, or when another device in its group keeps the group from being viable.
    """
    dev = device(address, sysfs)
    what = f"bind {dev.address} to {VFIO_PCI}"
    if not (sysfs / "bus/pci/drivers" / VFIO_PCI).is_dir():
        raise PciError(f"{what}: the vfio-pci driver is not loaded; run `modprobe vfio-pci`")
    group = dev.iommu_group
    if group is None:
        raise PciError(
            f"{what}: the device has no IOMMU group, so no IOMMU protects it; "
            "enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line)"
        )
    blockers = group_blockers(group, sysfs, besides=dev.address)
    if blockers:
        names = ", ".join(f"{d.address} ({d.driver})" for d in blockers)
        raise PciError(
            f"{what}: IOMMU group {group} is not viable: bind {names} to vfio-pci too, "
            "or unbind them from their drivers"
        )
    previous = dev.driver
    if previous == VFIO_PCI:
        return previous
    _remember(dev.address, previous)
    _write(dev.path / "driver_override", VFIO_PCI, what)
    if previous is not None:
        _write(dev.path / "driver/unbind", str(dev.address), what)
    _write(sysfs / "bus/pci/drivers_probe", str(dev.address), what)
    if dev.driver != VFIO_PCI:
        raise PciError(f"{what}: the device is bound to {dev.driver} after probing; see dmesg")
    return previous


def unbind(address: str | PciAddress, sysfs: Path = SYSFS) -> str | None:
    """Release a device from vfio-pci and give it back to the driver it had before
    :func:`bind` (or, if that is not known, to whichever driver the kernel picks).

    Returns the driver it is bound to afterwards (None if no driver claimed it).
    """
    dev = device(address, sysfs)
    what = f"unbind {dev.address}"
    previous = _recall(dev.address)
    _write(dev.path / "driver_override", "\n", what)
    if dev.driver is not None:
        _write(dev.path / "driver/unbind", str(dev.address), what)
    _write(sysfs / "bus/pci/drivers_probe", str(dev.address), what)
    if previous and dev.driver != previous:
        bind_file = sysfs / "bus/pci/drivers" / previous / "bind"
        if bind_file.exists():
            if dev.driver is not None:
                _write(dev.path / "driver/unbind", str(dev.address), what)
            _write(bind_file, str(dev.address), what)
    _forget(dev.address)
    return dev.driver


def _remember(address: PciAddress, driver: str | None) -> None:
    try:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        (STATE_DIR / str(address)).write_text(driver or "")
    except OSError:
        pass  # best effort: unbind then lets the kernel choose


def _recall(address: PciAddress) -> str | None:
    try:
        return (STATE_DIR / str(address)).read_text().strip() or None
    except OSError:
        return None


def _forget(address: PciAddress) -> None:
    with contextlib.suppress(OSError):
        (STATE_DIR / str(address)).unlink()


def vfio_group_path(group: int, devfs: Path = DEVFS) -> Path:
    """The VFIO group character device, ``/dev/vfio/<group>``."""
    return devfs / "vfio" / str(group)


def nvme_controllers(sysfs: Path = SYSFS) -> list[PciDevice]:
    """Every NVMe controller (class 0x010802)."""
    return [d for d in list_devices(sysfs) if d.class_code == NVME_CLASS]


def _bind_nvme_main() -> int:
    """``python -m uvdma.pci bind-nvme``: the test guest's set-up step."""
    subprocess.run(["modprobe", VFIO_PCI], check=False)
    controllers = nvme_controllers()
    if not controllers:
        print("uvdma: no NVMe controller to bind", file=sys.stderr)
        return 1
    for dev in controllers:
        previous = bind(dev.address)
        print(
            f"uvdma: {dev.address} (group {dev.iommu_group}) bound to {VFIO_PCI}"
            f" (was {previous or 'unbound'})"
        )
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["bind-nvme"]:
        sys.exit(_bind_nvme_main())
    print("usage: python -m uvdma.pci bind-nvme", file=sys.stderr)
    sys.exit(2)
