"""examples/nvme against exact values and a controller that misbehaves (fake kernel: BAR0 is
plain memory, so CSTS.RDY never follows CC.EN).  The driver on a real controller is proven
in tests/vm/test_nvme.py."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_kernel import FakeKernel
from tests.fake_sysfs import make_device
from uvdma import _sys, pci
from uvdma.dma import DmaDevice, dma_pool_create
from uvdma.vfio import VfioDevice, open_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "nvme"))
from nvme import CSTS, PAGE, Controller, NvmeError, QueuePair

BDF = "0000:00:09.0"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeKernel, VfioDevice]]:
    make_device(tmp_path, BDF, pci.NVME_CLASS, 9, "vfio-pci", cdev=0)
    k = FakeKernel()
    d = k.add_device(BDF, 9, 0)
    cap = ctypes.c_uint64.from_buffer(d.bar0, 0)
    cap.value = (cap.value & ~(0xFF << 24)) | (1 << 24)  # CAP.TO = 500 ms
    with _sys.use_kernel(k):
        vd = open_device(BDF, sysfs=tmp_path, backend="type1")
        yield k, vd
        vd.close()
        assert k.open_kinds() == [] and k.pinned == 0


class _Stub:
    """The parts of a Controller a QueuePair uses, for building PRPs."""

    def __init__(self, vd: VfioDevice) -> None:
        self.dma = DmaDevice(vd, coherent_pool="256K")
        self.dstrd = 0
        self.bar = vd.bar(0)
        self.prp_pool = dma_pool_create("prp", self.dma, PAGE, PAGE, 0)
        self._prp_owned: dict[tuple[int, int], list[tuple[int, int]]] = {}


def entries(vaddr: int, n: int) -> list[int]:
    return list((ctypes.c_uint64 * n).from_address(vaddr))


def test_prps_for_every_shape_of_transfer(fake: tuple[FakeKernel, VfioDevice]) -> None:
    stub = _Stub(fake[1])
    q = QueuePair(stub, 1, 8, None)  # type: ignore[arg-type]
    assert q._prps(0x10000, 512) == (0x10000, 0, [])  # fits the first page: PRP1 only
    assert q._prps(0x10200, 4096) == (0x10200, 0x11000, [])  # two pages: PRP2 is the second
    prp1, prp2, lists = q._prps(0x10000, 3 * PAGE)  # three pages: PRP2 points to a list
    assert prp1 == 0x10000 and len(lists) == 1 and prp2 == lists[0][1]
    assert entries(lists[0][0], 2) == [0x11000, 0x12000]
    stub.prp_pool.free(*lists[0])
    prp1, prp2, lists = q._prps(0x10000, 600 * PAGE)  # 599 more pages: a chained list
    first, second = lists
    assert prp2 == first[1]
    got = entries(first[0], 512)
    assert got[:511] == [0x11000 + i * PAGE for i in range(511)]
    assert got[511] == second[1]  # the last entry of a full list points to the next one
    assert entries(second[0], 88) == [0x11000 + i * PAGE for i in range(511, 599)]
    for vaddr, dma in lists:
        stub.prp_pool.free(vaddr, dma)
    q.free()
    stub.prp_pool.destroy()
    assert stub.dma.close() == []


def test_a_controller_that_never_becomes_ready(
    fake: tuple[FakeKernel, VfioDevice], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TimeoutError, match=r"CSTS\.RDY did not become 1 within CAP\.TO \(0\.5 s\)"):
        Controller(fake[1])
    assert "leaked" not in capsys.readouterr().err  # everything it took was given back


def test_fatal_status_is_a_clear_error(fake: tuple[FakeKernel, VfioDevice]) -> None:
    ctypes.c_uint32.from_address(fake[1].bar(0).addr + CSTS).value = 0x2  # CSTS.CFS
    with pytest.raises(NvmeError, match=r"fatal status \(CSTS\.CFS\)"):
        Controller(fake[1])
