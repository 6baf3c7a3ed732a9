"""Processes that hold a device, for the VM tests of ``uvdma unbind`` (tests/vm/test_bind.py).

    python -m tests.support.holders plain BDF     # a VfioDevice, default handling of the request
    python -m tests.support.holders handler BDF   # a VfioDevice with a release handler
    python -m tests.support.holders raw BDF       # container, group and device fd by hand: no
                                             # request channel, so it never lets go by itself
    python -m tests.support.holders open PATH     # a file (a block device) held open

Each prints ``ready`` once it holds the device, then what happens to it, one line each.
The raw holder closes its device fd on SIGUSR1 and its group and container on SIGUSR2.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from types import FrameType

from uvdma import _sys, pci
from uvdma._uapi import vfio as V  # noqa: N812
from uvdma.dma import DmaBuffer, DmaDevice, dma_alloc_coherent
from uvdma.errors import UvdmaError
from uvdma.vfio import VfioDevice, open_device


def say(line: str) -> None:
    print(line, flush=True)


def vfio_device(bdf: str, with_handler: bool) -> int:
    dev = open_device(bdf)
    bar = dev.bar(0)
    assert bar.read32(0x08) == 0x00010400  # NVMe VS 1.4
    doorbell = bar.reg32(0x1000)  # a driver keeps these
    dev.enable_irqs(1)
    dma = DmaDevice(dev)
    buf = DmaBuffer(dma, 4096)
    memory = buf.array()
    if with_handler:

        def handler(d: VfioDevice) -> None:
            say(f"handler called in {threading.current_thread().name}")
            buf.free()
            dma.close()
            d.close()
            say("handler closed the device")

        dev.on_release_request(handler)
    say("ready")
    deadline = time.monotonic() + 300
    while not dev.release_requested and time.monotonic() < deadline:
        doorbell.value = 0  # keep using the device as a driver would
        time.sleep(0.01)
    while not dev.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    say(f"release requested: {dev.release_requested}")
    doorbell.value = 0  # a stale register pointer: must not crash
    say(f"stale doorbell read: {doorbell.value:#x}")
    memory[:16] = 7  # DMA memory stays until close
    for name, call in (
        ("bar", lambda: dev.bar(0)),
        ("config", lambda: dev.config_read(0, 2)),
        ("dma_alloc_coherent", lambda: dma_alloc_coherent(dma, 4096)),
    ):
        try:
            call()
            say(f"{name}: worked")
        except UvdmaError as e:
            say(f"{name}: {type(e).__name__}: {e}")
    if not with_handler:
        buf.free()
        dma.close()
    dev.close()
    say("closed")
    return 0


def raw(bdf: str) -> int:
    """The device held the way a program that knows nothing of the request holds it."""
    k = _sys.LinuxKernel()
    group = pci.device(bdf).iommu_group
    container = k.open("/dev/vfio/vfio", os.O_RDWR)
    gfd = k.open(f"/dev/vfio/{group}", os.O_RDWR)
    k.ioctl(gfd, V.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(container))
    k.ioctl(container, V.VFIO_SET_IOMMU, int(V.IommuType.VFIO_TYPE1v2_IOMMU))
    dfd = k.ioctl(gfd, V.VFIO_GROUP_GET_DEVICE_FD, ctypes.create_string_buffer(bdf.encode()))

    def let_device_go(signum: int, frame: FrameType | None) -> None:
        os.close(dfd)
        say("device fd closed")

    def let_group_go(signum: int, frame: FrameType | None) -> None:
        os.close(gfd)
        os.close(container)
        say("group closed")

    signal.signal(signal.SIGUSR1, let_device_go)
    signal.signal(signal.SIGUSR2, let_group_go)
    say("ready")
    while True:
        time.sleep(1)


def hold_open(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    say("ready")
    time.sleep(3600)
    os.close(fd)
    return 0


def main(argv: list[str]) -> int:
    kind, target = argv
    if kind in ("plain", "handler"):
        return vfio_device(target, kind == "handler")
    if kind == "raw":
        return raw(target)
    if kind == "open":
        return hold_open(target)
    raise SystemExit(f"unknown holder {kind}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
