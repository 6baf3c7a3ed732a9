"""An NVMe Admin Identify driven by hand: the VM tier's proof that a device DMAs where we say.

Not a driver (that is examples/nvme/): the least that brings up the admin queues and
runs one command, with every structure placed in memory the caller mapped.  Register
offsets from the NVMe Base Specification 2.0, section 3.1 (controller registers).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass

from uvdma.vfio import Bar, VfioDevice

CAP, VS, CC, CSTS, AQA, ASQ, ACQ = 0x00, 0x08, 0x14, 0x1C, 0x24, 0x28, 0x30
DOORBELLS = 0x1000
ADMIN_IDENTIFY = 0x06
CNS_CONTROLLER = 0x01
QUEUE_ENTRIES = 2  # admin queues of two entries are enough for one command at a time


@dataclass(frozen=True)
class Placement:
    """Where the admin queues and the data buffer live: (virtual address, IOVA) pairs."""

    sq: tuple[int, int]
    cq: tuple[int, int]
    data: tuple[int, int]


def wait_ready(bar: Bar, ready: bool, timeout: float) -> None:
    """Wait for CSTS.RDY (NVMe 2.0, 3.1.4.6); TimeoutError names the bit."""
    deadline = time.monotonic() + timeout
    while bool(bar.read32(CSTS) & 1) != ready:
        if bar.read32(CSTS) & 2:
            raise RuntimeError("CSTS.CFS: controller fatal status")
        if time.monotonic() > deadline:
            raise TimeoutError(f"CSTS.RDY did not become {int(ready)} within {timeout} s")
        time.sleep(0.001)


def enable(dev: VfioDevice, where: Placement) -> Bar:
    """Disable the controller, point the admin queues at ``where``, enable it."""
    bar = dev.bar(0)
    cap = bar.read64(CAP)
    timeout = max(((cap >> 24) & 0xFF) * 0.5, 1.0)  # CAP.TO in 500 ms units
    dev.enable_bus_master()
    bar.write32(CC, 0)
    wait_ready(bar, False, timeout)
    ctypes.memset(where.sq[0], 0, 64 * QUEUE_ENTRIES)
    ctypes.memset(where.cq[0], 0, 16 * QUEUE_ENTRIES)
    bar.write32(AQA, ((QUEUE_ENTRIES - 1) << 16) | (QUEUE_ENTRIES - 1))
    bar.write64(ASQ, where.sq[1])
    bar.write64(ACQ, where.cq[1])
    # CC: IOCQES=4 (16 B), IOSQES=6 (64 B), MPS=0 (4 KiB), CSS=0 (NVM), EN=1
    bar.write32(CC, (4 << 20) | (6 << 16) | 1)
    wait_ready(bar, True, timeout)
    return bar


def identify_controller(dev: VfioDevice, where: Placement, timeout: float = 10.0) -> bytes:
    """Run Identify Controller with the 4 KiB result DMA'd to ``where.data``; returns it."""
    bar = enable(dev, where)
    ctypes.memset(where.data[0], 0xA5, 4096)  # so a DMA that never happened shows
    sqe = (ctypes.c_uint32 * 16).from_address(where.sq[0])
    sqe[0] = ADMIN_IDENTIFY | (0x1234 << 16)  # CDW0: opcode, command identifier
    sqe[1] = 0  # NSID
    sqe[6] = where.data[1] & 0xFFFFFFFF  # PRP1
    sqe[7] = where.data[1] >> 32
    sqe[10] = CNS_CONTROLLER
    bar.write32(DOORBELLS, 1)  # admin SQ tail doorbell: one entry
    cqe = (ctypes.c_uint32 * 4).from_address(where.cq[0])
    deadline = time.monotonic() + timeout
    while not cqe[3] & (1 << 16):  # phase tag flips to 1 when the entry is posted
        if time.monotonic() > deadline:
            raise TimeoutError("Identify: no completion (phase bit) within the timeout")
        time.sleep(0.0005)
    status = cqe[3] >> 17
    if (cqe[3] & 0xFFFF) != 0x1234 or status:
        raise RuntimeError(f"Identify failed: cid {cqe[3] & 0xFFFF:#x}, status {status:#x}")
    bar.write32(DOORBELLS + 4, 1)  # admin CQ head doorbell (DSTRD 0)
    return ctypes.string_at(where.data[0], 4096)


def disable(dev: VfioDevice) -> None:
    """CC.EN=0 so the controller stops using the queues before their memory goes."""
    bar = dev.bar(0)
    bar.write32(CC, 0)
    wait_ready(bar, False, 10.0)
