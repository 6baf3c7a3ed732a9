"""`uvdma bind` and `uvdma unbind` against the real kernel: a device in use is never taken,
a device on another driver is never touched, and a held device goes back to its driver
(never left without one) whatever its holder and the caller do.

Runs in the QEMU test VM with the controllers bound to vfio-pci (``--bind``); the last
controller is given to the kernel's nvme driver and back by these tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from uvdma import pci
from uvdma.errors import UnbindPendingError
from uvdma.vfio import open_device

pytestmark = pytest.mark.vm

MNT = Path("/tmp/uvdma-bind-mnt")


def uvdma(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uvdma.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run(*cmd: str) -> str:
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout


def controller() -> pci.PciDevice:
    return pci.nvme_controllers()[-1]


def wait_for(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


def namespace(dev: pci.PciDevice) -> str:
    """/dev/nvmeXn1 of a controller on the nvme driver (once the driver made it)."""
    found: list[str] = []

    def look() -> bool:
        for ns in sorted((dev.path / "nvme").glob("nvme*/nvme*n1")):
            if Path("/dev", ns.name).exists():
                found.append(f"/dev/{ns.name}")
                return True
        return False

    wait_for(f"a namespace of {dev.address}", look)
    return found[0]


def mounted(path: Path) -> bool:
    return any(
        line.split()[4] == str(path)
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


class Holder:
    """A helper process from tests/support/holders.py; its lines arrive on ``lines``."""

    def __init__(self, kind: str, target: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.holders", kind, target],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        try:
            line = self.readline(120)
        except AssertionError:
            line = ""
        if line != "ready":
            self.kill()
            assert self.proc.stderr is not None
            ps = subprocess.run(
                ["ps", "-eo", "pid,ppid,stat,wchan:32,args"],
                check=False,
                capture_output=True,
                text=True,
            ).stdout
            raise AssertionError(
                f"holder {kind} did not start: {line!r} {self.proc.stderr.read()}\n{ps}"
            )

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        import selectors  # noqa: PLC0415

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"holder {self.pid} said nothing within {timeout} s")
        return self.proc.stdout.readline().strip()

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def on_nvme() -> Iterator[tuple[pci.PciDevice, str]]:
    """The last controller on the kernel's nvme driver, with its namespace; afterwards
    whatever the test left (mounts, swap, dm, holders) is undone and it is back on vfio-pci."""
    dev = controller()
    if dev.driver == "vfio-pci":
        assert pci.unbind(dev.address) == "nvme"
    ns = namespace(dev)
    try:
        yield dev, ns
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(["umount", "-R", str(MNT)], capture_output=True, check=False)
            subprocess.run(["swapoff", "-a"], capture_output=True, check=False)
            subprocess.run(["dmsetup", "remove_all"], capture_output=True, check=False)
        wait_for("the device back on a driver", lambda: dev.driver is not None)
        if dev.driver != "vfio-pci":
            pci.bind(dev.address, force=True)
        assert dev.driver == "vfio-pci"


@pytest.fixture
def on_vfio() -> Iterator[pci.PciDevice]:
    """The last controller on vfio-pci; afterwards back on vfio-pci, whatever happened."""
    dev = controller()
    if dev.driver != "vfio-pci":
        pci.bind(dev.address, force=True)
    try:
        yield dev
    finally:
        wait_for("the device back on a driver", lambda: dev.driver is not None, 120)
        if dev.driver != "vfio-pci":
            pci.bind(dev.address, force=True)
        assert dev.driver == "vfio-pci"


def write_mbr(disk: str) -> None:
    """One Linux partition from 1 MiB to the end (a hand-made MBR: no fdisk in the guest)."""
    sectors = int(Path(f"/sys/class/block/{Path(disk).name}/size").read_text())
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, sectors - 2048)
    with open(disk, "r+b") as f:
        f.seek(446)
        f.write(entry + bytes(48) + b"\x55\xaa")
    run("blockdev", "--rereadpt", disk)


# -- bind never takes a device in use -----------------------------------------------------------


@pytest.mark.parametrize("where", ["namespace", "partition"])
def test_bind_refuses_a_mounted_filesystem_and_the_data_survives(
    on_nvme: tuple[pci.PciDevice, str], where: str
) -> None:
    dev, ns = on_nvme
    target = ns
    if where == "partition":
        write_mbr(ns)
        target = f"{ns}p1"
        wait_for(target, lambda: Path(target).exists())
    run("mkfs.ext4", "-q", "-F", target)
    MNT.mkdir(exist_ok=True)
    run("mount", target, str(MNT))
    (MNT / "data").write_bytes(b"precious" * 1000)
    os.sync()
    r = uvdma("bind", str(dev.address))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{Path(target).name} is mounted on {MNT}" in r.stderr
    assert "--force" in r.stderr and "Traceback" not in r.stderr
    assert dev.driver == "nvme" and mounted(MNT)  # nothing changed
    assert (MNT / "data").read_bytes() == b"precious" * 1000
    (MNT / "more").write_bytes(b"still writable")  # the filesystem is healthy
    os.sync()
    run("umount", str(MNT))
    run("e2fsck", "-fn", target)  # and clean


def test_bind_refuses_swap_device_mapper_and_open_fds_naming_each(
    on_nvme: tuple[pci.PciDevice, str],
) -> None:
    dev, ns = on_nvme
    name = Path(ns).name
    run("mkswap", ns)
    run("swapon", ns)
    r = uvdma("bind", str(dev.address))
    assert r.returncode == 1 and f"{name} is in use as swap" in r.stderr, r.stderr
    run("swapoff", ns)
    run("modprobe", "dm_mod")
    run("dmsetup", "create", "uvdma-test", "--table", f"0 2048 linear {ns} 0")
    r = uvdma("bind", str(dev.address))
    assert r.returncode == 1 and "(device-mapper uvdma-test)" in r.stderr, r.stderr
    assert f"{name} is held by dm-" in r.stderr
    run("dmsetup", "remove", "uvdma-test")
    holder = Holder("open", ns)
    try:
        r = uvdma("bind", str(dev.address))
        assert r.returncode == 1, r.stderr
        assert f"{name} is open in pid {holder.pid} (python" in r.stderr
        assert dev.driver == "nvme"
        r = uvdma("bind", "--force", str(dev.address))  # unless --force
        assert r.returncode == 0 and "nvme -> vfio-pci" in r.stdout, r.stderr
        assert dev.driver == "vfio-pci"
    finally:
        holder.kill()


# -- unbind touches only vfio-pci ------------------------------------------------------------------


def test_unbind_refuses_a_device_on_nvme_and_leaves_its_filesystem_alone(
    on_nvme: tuple[pci.PciDevice, str],
) -> None:
    dev, ns = on_nvme
    run("mkfs.ext4", "-q", "-F", ns)
    MNT.mkdir(exist_ok=True)
    run("mount", ns, str(MNT))
    (MNT / "data").write_bytes(b"journal" * 1000)
    r = uvdma("unbind", str(dev.address))
    assert r.returncode == 1, r.stdout
    assert "it is bound to nvme, not vfio-pci" in r.stderr and "Nothing was changed" in r.stderr
    assert dev.driver == "nvme" and mounted(MNT)
    (MNT / "more").write_bytes(b"the journal did not abort")
    os.sync()
    assert (MNT / "data").read_bytes() == b"journal" * 1000
    run("umount", str(MNT))
    run("e2fsck", "-fn", ns)


# -- unbind of a held device ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "handler"])
def test_unbind_gets_a_device_back_from_a_uvdma_process(on_vfio: pci.PciDevice, kind: str) -> None:
    dev = on_vfio
    holder = Holder(kind, str(dev.address))
    start = time.monotonic()
    r = uvdma("unbind", str(dev.address), "--wait", "120")
    took = time.monotonic() - start
    rc, out, err = holder.finish()
    assert r.returncode == 0, r.stderr + out + err
    assert "vfio-pci -> nvme" in r.stdout
    assert dev.driver == "nvme"
    assert took < 60  # the holder was asked and let go: no 10 s rounds of the kernel's asking
    assert rc == 0, out + err  # the holder lived on: no crash
    lines = out.splitlines()
    assert "release requested: True" in lines
    assert "stale doorbell read: 0x0" in lines  # inert memory where BAR0 was
    if kind == "handler":
        assert "handler called in uvdma-req-" + str(dev.address) in lines
        assert "bar: ClosedError: bar(0): VfioDevice " + str(dev.address) + " is closed" in lines
    else:
        assert any(
            line.startswith("bar: DeviceReleasedError: bar(0): VfioDevice")
            and "the kernel asked for it back" in line
            for line in lines
        ), lines
        assert any(line.startswith("dma_alloc_coherent: DeviceReleasedError") for line in lines)
    assert lines[-1] == "closed"


def test_unbind_gets_a_device_back_from_this_very_process(on_vfio: pci.PciDevice) -> None:
    dev = on_vfio
    vd = open_device(dev.address)
    bar = vd.bar(0)
    assert pci.unbind(dev.address, wait=60) == "nvme"  # our own watcher let it go
    assert vd.release_requested and vd.closed
    assert bar.closed
    vd.close()


def test_a_holder_that_ignores_the_request_is_named_and_the_device_goes_back_after_it(
    on_vfio: pci.PciDevice,
) -> None:
    dev = on_vfio
    holder = Holder("raw", str(dev.address))
    start = time.monotonic()
    r = uvdma("unbind", str(dev.address), "--wait", "5")
    took = time.monotonic() - start
    assert r.returncode == 1, r.stdout + r.stderr
    assert 5 <= took < 60
    assert f"still held after 5 s by pid {holder.pid} (python" in r.stderr, r.stderr
    assert "goes back to nvme as soon as it does" in r.stderr
    assert "Traceback" not in r.stderr
    assert holder.proc.poll() is None  # nobody killed it
    holder.kill()
    wait_for("the device back on nvme", lambda: dev.driver == "nvme", 60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killing_unbind_while_it_waits_never_leaves_the_device_driverless(
    on_vfio: pci.PciDevice, sig: signal.Signals
) -> None:
    dev = on_vfio
    holder = Holder("raw", str(dev.address))
    try:
        unbind = subprocess.Popen(
            [sys.executable, "-m", "uvdma.cli", "unbind", str(dev.address), "--wait", "120"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert unbind.stderr is not None
        line = unbind.stderr.readline()  # it is waiting (python starts slowly under TCG)
        assert f"waiting for pid {holder.pid}" in line, line
        unbind.send_signal(sig)
        _out, err = unbind.communicate(timeout=30)
        assert unbind.returncode == 128 + sig, err
        assert "goes on in the background" in err and "Traceback" not in err
        assert dev.driver == "vfio-pci"  # still held: the kernel is still waiting
    finally:
        holder.kill()
    wait_for("the device back on nvme", lambda: dev.driver == "nvme", 60)


def test_a_holder_that_keeps_only_the_group_does_not_keep_the_device(
    on_vfio: pci.PciDevice,
) -> None:
    """Once the device fd is released, vfio-pci lets go and nvme takes the device, though
    the holder still has its group in a container (checked on Debian's 6.1: the group's DMA
    ownership does not stop the probe). The give-back finishes; it does not wait for the
    group."""
    dev = on_vfio
    holder = Holder("raw", str(dev.address))
    try:
        with pytest.raises(UnbindPendingError) as info:
            pci.unbind(dev.address, wait=3)
        assert [pid for pid, _comm in info.value.holders] == [holder.pid]
        holder.proc.send_signal(signal.SIGUSR1)  # the device fd goes, the group stays
        assert holder.readline(30) == "device fd closed"
        wait_for("the device back on nvme", lambda: dev.driver == "nvme", 60)
        namespace(dev)  # and nvme works: it found its namespace by DMA
        assert holder.proc.poll() is None
    finally:
        holder.kill()


def test_a_second_unbind_waits_for_the_first(on_vfio: pci.PciDevice) -> None:
    dev = on_vfio
    holder = Holder("raw", str(dev.address))
    try:
        first = uvdma("unbind", str(dev.address), "--wait", "2")
        assert first.returncode == 1
        second = uvdma("unbind", str(dev.address), "--wait", "2")
        assert second.returncode == 1
        assert "already under way" in second.stderr, second.stderr
    finally:
        holder.kill()
    wait_for("the device back on nvme", lambda: dev.driver == "nvme", 60)
