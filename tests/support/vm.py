"""Helpers shared by the VM tests."""

from __future__ import annotations

import subprocess
import time

from uvdma import pci
from uvdma.errors import DeviceInUseError


def bind_back(bdf: str) -> None:
    """Bind a controller to vfio-pci again once udev has finished with the namespace the
    kernel's nvme driver just announced (bind refuses a device whose block devices are open,
    and udev opens a new one for a moment)."""
    subprocess.run(["udevadm", "settle", "--timeout=30"], check=False, timeout=60)
    deadline = time.monotonic() + 30
    while True:
        try:
            pci.bind(bdf)
            return
        except DeviceInUseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
