"""``uvdma doctor [BDF]``: is this machine ready for uvdma, and if not, what to do.

Every check reports ok, warn or fail; a failing check says its fix.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from uvdma import _sys, pci
from uvdma.errors import NoIommuWarning, UvdmaError
from uvdma.memory.hugepages import HugepagePool, hugepage_pools, size_name
from uvdma.vfio import open_device
from uvdma.vfio.device import BackendChoice, backend_choice

DEFAULT_NEED = 64 << 20  # bytes of DMA memory a typical program pins


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    status: str  # "ok", "warn", "fail"
    what: str
    fix: str = ""


def _iommu(sysfs: Path) -> Iterator[Check]:
    units = sorted(p.name for p in (sysfs / "class/iommu").glob("*"))
    groups = list((sysfs / "kernel/iommu_groups").glob("*"))
    if units and groups:
        yield Check("ok", f"IOMMU active: {', '.join(units)}, {len(groups)} groups")
    elif pci.noiommu_mode(sysfs):
        yield Check(
            "warn",
            "no IOMMU is active; VFIO's unsafe no-IOMMU mode is on: devices given to user space "
            "can DMA anywhere in memory (unprotected)",
            "enable VT-d/AMD-Vi in the firmware and intel_iommu=on (or amd_iommu=on) where "
            "the machine has an IOMMU",
        )
    else:
        yield Check(
            "fail",
            "no IOMMU is active",
            "enable VT-d/AMD-Vi in the firmware and add intel_iommu=on (or amd_iommu=on) "
            "to the kernel command line",
        )


def _vfio(sysfs: Path, devfs: Path) -> Iterator[Check]:
    if (sysfs / "bus/pci/drivers/vfio-pci").is_dir():
        yield Check("ok", "vfio-pci is loaded")
    else:
        yield Check("fail", "vfio-pci is not loaded", "modprobe vfio-pci")
    node = devfs / "vfio/vfio"
    if not node.exists():
        yield Check("fail", f"{node} is missing", "modprobe vfio-pci")
    elif os.access(node, os.R_OK | os.W_OK):
        yield Check("ok", f"{node} is usable")
    else:
        yield Check("fail", f"{node} is not readable and writable by you", "run as root")
    yield from _backend(backend_choice("auto", sysfs=sysfs, devfs=devfs))


def _backend(choice: BackendChoice, who: str = "") -> Iterator[Check]:
    """The backend ``auto`` picks and the protection mode it gives, each on a line."""
    yield Check("ok", f"{who}backend: {choice.backend} ({choice.reason})")
    if choice.backend == "noiommu":
        yield Check(
            "warn",
            f"{who}mode: no-IOMMU, UNPROTECTED: DMA addresses are physical and nothing stops "
            "a stray DMA",
            "use a machine (or VM) with an IOMMU for anything but testing",
        )
    else:
        yield Check("ok", f"{who}mode: IOMMU-protected (DMA only where uvdma maps memory)")


def _hugepages(pools: dict[int, HugepagePool]) -> Iterator[Check]:
    if not pools:
        yield Check("warn", "this kernel reports no hugepage sizes", "")
        return
    for size in sorted(pools):
        p = pools[size]
        line = f"hugepages {size_name(size)}: {p.total} reserved, {p.free} free"
        if size == 2 << 20 and p.free == 0:
            yield Check(
                "warn",
                line + " (DMA memory will fall back to 4 KiB pages)",
                "uvdma hugepages --size 2M --count 64 (as root)",
            )
        else:
            yield Check("ok", line)


def _memlock(need: int) -> Iterator[Check]:
    limit = _sys.kernel().memlock_limit()
    if os.geteuid() == 0:
        yield Check("ok", "running as root: CAP_IPC_LOCK lifts RLIMIT_MEMLOCK")
    elif limit == -1 or limit >= need:
        shown = "unlimited" if limit == -1 else f"{limit} bytes"
        yield Check("ok", f"RLIMIT_MEMLOCK {shown} covers {need} bytes of DMA memory")
    else:
        yield Check(
            "fail",
            f"RLIMIT_MEMLOCK is {limit} bytes; pinning {need} bytes of DMA memory needs more",
            "`ulimit -l unlimited`, or memlock in /etc/security/limits.conf",
        )


def _device(address: str, sysfs: Path, devfs: Path, procfs: Path) -> Iterator[Check]:
    try:
        dev = pci.device(address, sysfs)
    except UvdmaError as e:
        yield Check("fail", str(e))
        return
    group = dev.iommu_group
    yield Check(
        "ok", f"{dev.address}: {dev.vendor:04x}:{dev.device:04x} class {dev.class_code:06x}"
    )
    if dev.driver == pci.VFIO_PCI:
        yield Check("ok", f"{dev.address} is bound to vfio-pci")
    else:
        users = []
        if dev.driver is not None:
            users = pci.block_device_users(
                pci.block_devices(dev.address, sysfs), sysfs=sysfs, procfs=procfs, devfs=devfs
            )
        if users:
            yield Check(
                "fail",
                f"{dev.address} is bound to {dev.driver} and in use: {'; '.join(users)}",
                "stop using it (unmount, swapoff, remove the device-mapper/md/LVM devices on "
                f"top, close it), then uvdma bind {dev.address}",
            )
        else:
            yield Check(
                "fail",
                f"{dev.address} is bound to {dev.driver or 'no driver'}",
                f"uvdma bind {dev.address}",
            )
    if group is None:
        if pci.noiommu_mode(sysfs):
            yield Check(
                "warn",
                f"{dev.address} has no IOMMU group yet: in no-IOMMU mode vfio-pci makes one "
                "when it binds (unprotected)",
                f"uvdma bind {dev.address}",
            )
        else:
            yield Check(
                "fail", f"{dev.address} has no IOMMU group", "turn the IOMMU on (see above)"
            )
        return
    blockers = pci.group_blockers(group, sysfs, besides=dev.address)
    if blockers:
        names = ", ".join(f"{d.address} ({d.driver})" for d in blockers)
        yield Check("fail", f"IOMMU group {group} is not viable", f"bind {names} to vfio-pci too")
    else:
        yield Check("ok", f"IOMMU group {group} is viable")
    node = pci.vfio_group_path(group, devfs)
    if dev.driver == pci.VFIO_PCI:
        if not node.exists():
            yield Check("fail", f"{node} is missing", "check dmesg for vfio errors")
        elif not os.access(node, os.R_OK | os.W_OK):
            yield Check("fail", f"no access to {node}", f"run as root, or chown {node}")
        else:
            yield Check("ok", f"{node} is usable")
    reserved = sysfs / "kernel/iommu_groups" / str(group) / "reserved_regions"
    if reserved.exists():
        for line in reserved.read_text().splitlines():
            start, end, kind = line.split()[:3]
            yield Check(
                "ok", f"group {group} reserved IOVA {start}-{end} ({kind}): uvdma avoids it"
            )
    yield from _backend(
        backend_choice("auto", dev.address, sysfs=sysfs, devfs=devfs), f"{dev.address} "
    )
    yield from _iova(dev)


def _iova(dev: pci.PciDevice) -> Iterator[Check]:
    if dev.driver != pci.VFIO_PCI:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoIommuWarning)  # said above, as a check
            vd = open_device(dev.address)
        with vd:
            if vd.backend == "noiommu":
                yield Check(
                    "warn",
                    f"{dev.address} opens with no IOMMU: DMA addresses are physical "
                    "(/proc/self/pagemap), the device is unprotected",
                )
                return
            ranges = vd.domain.iova_ranges()
            top = max(last for _start, last in ranges)
            shown = ", ".join(f"{s:#x}-{e:#x}" for s, e in ranges)
            yield Check("ok", f"usable IOVA ranges ({vd.backend}): {shown}")
            yield Check("ok", f"IOVA address width: {top.bit_length()} bits")
    except UvdmaError as e:
        yield Check("fail", f"opening {dev.address} through VFIO: {e}")


def run_checks(
    address: str | None = None,
    *,
    need: int = DEFAULT_NEED,
    sysfs: Path = pci.SYSFS,
    devfs: Path = pci.DEVFS,
    procfs: Path = pci.PROCFS,
) -> list[Check]:
    """Every check, in the order a person fixes things."""
    checks = [*_iommu(sysfs), *_vfio(sysfs, devfs)]
    checks += [*_hugepages(hugepage_pools(sysfs)), *_memlock(need)]
    if address is not None:
        checks += list(_device(address, sysfs, devfs, procfs))
    return checks


def main(address: str | None = None) -> int:
    """Print the report; exit code 1 when any check failed."""
    checks = run_checks(address)
    marks = {"ok": "  ok ", "warn": " warn", "fail": " FAIL"}
    for c in checks:
        print(f"[{marks[c.status]}] {c.what}")
        if c.fix:
            print(f"         fix: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    print(f"\n{failed} problem(s) found" if failed else "\nready for uvdma")
    return 1 if failed else 0
