"""Parsing the IOMMU faults the kernel logs (Intel DMAR and AMD-Vi lines), from a stand-in log."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from uvdma.errors import UvdmaOSError
from uvdma.pci import PciAddress
from uvdma.vfio.faults import IommuFaultLog

NVME = PciAddress.parse("0000:00:09.0")


def test_faults_for_this_device_only_and_only_new_ones(tmp_path: Path) -> None:
    log = tmp_path / "kmsg"
    log.write_text(
        "6,1,1,-;DMAR: [DMA Write NO_PASID] Request device [00:09.0] fault addr 0x1000 [fault reason 0x05] old\n"
    )
    with IommuFaultLog(NVME, str(log)) as faults:
        assert faults.faults() == []  # what was logged before opening does not count
        with log.open("a") as f:
            f.write(
                "3,2,2,-;DMAR: [DMA Write NO_PASID] Request device [00:09.0] fault addr 0x140043000 [fault reason 0x05] PTE Write access is not set\n"
            )
            f.write(
                "3,3,3,-;DMAR: [DMA Read NO_PASID] Request device [00:0a.0] fault addr 0x2000 [fault reason 0x06] PTE Read access is not set\n"
            )
            f.write(
                "3,4,4,-;AMD-Vi: Event logged [IO_PAGE_FAULT device=0000:00:09.0 domain=0x0001 address=0xfeed000 flags=0x0020]\n"
            )
            f.write("6,5,5,-;nvme nvme0: pci function 0000:00:09.0\n")
        got = faults.faults()
    assert [(f.iova, f.kind) for f in got] == [(0x140043000, "Write"), (0xFEED000, "")]
    assert got[0].reason == "05 PTE Write access is not set"


def test_without_access_to_the_log_the_error_says_run_as_root(tmp_path: Path) -> None:
    missing = IommuFaultLog(NVME, str(tmp_path / "nope"))
    with pytest.raises(UvdmaOSError, match="run as root"):
        missing.faults()
    missing.close()


def test_waiting_gives_a_late_fault_its_moment(tmp_path: Path) -> None:
    log = tmp_path / "kmsg"
    log.write_text("")
    with IommuFaultLog(NVME, str(log)) as faults:
        t0 = time.monotonic()
        assert faults.faults(wait=0.05) == []
        assert time.monotonic() - t0 >= 0.05

        def late() -> None:
            time.sleep(0.1)
            with log.open("a") as f:
                f.write(
                    "3,2,2,-;DMAR: [DMA Write NO_PASID] Request device [00:09.0] fault addr 0x5000 [fault reason 0x05] PTE Write access is not set\n"
                )

        threading.Thread(target=late).start()
        assert [f.iova for f in faults.faults(wait=5)] == [0x5000]
