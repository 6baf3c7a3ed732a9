"""IOMMU faults the kernel logged for a device.

When the IOMMU blocks a DMA (an IOVA that is not mapped, or mapped without the
permission), the device may still report success (QEMU 7.2's NVMe does); the kernel's
IOMMU driver logs the fault.  VFIO's type1 backend has no channel for faults, so this
reads them where the kernel puts them: the kernel log (/dev/kmsg, root), lines of Intel's
``DMAR: [DMA Write NO_PASID] Request device [00:09.0] fault addr 0x... [fault reason
0x05] ...`` or AMD's ``AMD-Vi: Event logged [IO_PAGE_FAULT device=0000:00:09.0 ...
address=0x...]``.  Only faults logged after the log is opened are reported.
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass

from uvdma.errors import UvdmaOSError
from uvdma.pci import PciAddress

_INTEL = re.compile(
    r"DMAR: \[DMA (?P<kind>Read|Write)[^\]]*\] Request device \[(?P<dev>[0-9a-f:.]+)\] "
    r"(?:PASID \w+ )?fault addr (?:0x)?(?P<addr>[0-9a-f]+)"
    r"(?: \[fault reason (?:0x)?(?P<reason>[0-9a-f]+)\] (?P<text>.*))?",
    re.IGNORECASE,
)
_AMD = re.compile(
    r"AMD-Vi: Event logged \[IO_PAGE_FAULT device=(?P<dev>[0-9a-f:.]+) "
    r".*address=(?:0x)?(?P<addr>[0-9a-f]+)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class IommuFault:
    """One logged fault: the IOVA, whether the device read or wrote, and the reason."""

    iova: int
    kind: str  # "Read", "Write" or "" when the log does not say
    reason: str


def _same_device(logged: str, address: PciAddress) -> bool:
    text = logged if logged.count(":") == 2 else f"{address.domain:04x}:{logged}"
    try:
        return PciAddress.parse(text) == address
    except Exception:
        return False


class IommuFaultLog:
    """Faults logged for one device from now on. Use as a context manager or close()."""

    def __init__(self, address: PciAddress, path: str = "/dev/kmsg") -> None:
        self.address = address
        self.path = path
        self._fd: int | None = None
        self.error: OSError | None = None
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as e:  # no permission: report it when faults are asked for
            self.error = e

    def faults(self, wait: float = 0.0) -> list[IommuFault]:
        """Faults for this device logged since the last call (or since opening).

        The kernel logs a fault from the IOMMU's fault interrupt, which may come after the
        device has already reported the command done: ``wait`` seconds are given for the
        first fault to arrive.
        """
        deadline = time.monotonic() + wait
        while True:
            got = self._read()
            if got or time.monotonic() >= deadline:
                return got
            time.sleep(0.01)

    def _read(self) -> list[IommuFault]:
        if self._fd is None:
            err = self.error.errno if self.error and self.error.errno else errno.EACCES
            raise UvdmaOSError(err, f"reading IOMMU faults from {self.path}: run as root")
        out: list[IommuFault] = []
        while True:
            try:
                record = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # records were overwritten: keep reading
                    continue
                raise
            if not record:
                break
            # /dev/kmsg gives one record a read ("prio,seq,time,flags;message"); a plain
            # file gives many lines: take them one by one either way.
            for line in record.decode(errors="replace").splitlines():
                fault = self._parse(line.split(";", 1)[-1].strip())
                if fault is not None:
                    out.append(fault)
        return out

    def _parse(self, message: str) -> IommuFault | None:
        m = _INTEL.search(message)
        if m and _same_device(m["dev"], self.address):
            reason = f"{m['reason'] or ''} {m['text'] or ''}".strip()
            return IommuFault(int(m["addr"], 16), m["kind"].title(), reason)
        m = _AMD.search(message)
        if m and _same_device(m["dev"], self.address):
            return IommuFault(int(m["addr"], 16), "", "IO_PAGE_FAULT")
        return None

    def close(self) -> None:
        """Close the log. Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> IommuFaultLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
