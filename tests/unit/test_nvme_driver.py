"""examples/nvme against exact values and a controller that misbehaves (fake kernel: BAR0 is
plain memory, so CSTS.RDY never follows CC.EN).  The driver on a real controller is proven
in tests/vm/test_nvme.py."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from uvdma import _sys, pci
from uvdma.testing.fake_kernel import FakeKernel
from uvdma.testing.fake_sysfs import make_device
from uvdma.vfio import VfioDevice, open_device
from uvdma_nvme import CommandError, Controller, NvmeError, status_name
from uvdma_nvme.prp import PrpPlan, fill_prp_lists, plan_prps, prp_list_pages_needed
from uvdma_nvme.spec import PAGE, Reg
from uvdma_nvme.status import STATUS_NAMES

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


def lists_for(plan: PrpPlan) -> list[tuple[npt.NDArray[np.uint64], int]]:
    """Stand-in list pages: (entries, dma) with dma 0xA0000000 + i pages."""
    n = prp_list_pages_needed(plan.pages)
    return [(np.zeros(PAGE // 8, dtype=np.uint64), 0xA000_0000 + i * PAGE) for i in range(n)]


def test_prps_for_every_shape_of_transfer() -> None:
    # fits the first page: PRP1 only
    assert plan_prps(0x10000, 512) == PrpPlan(0x10000, 0, 0)
    assert fill_prp_lists(plan_prps(0x10000, 512), []) == 0
    assert plan_prps(0x10000, PAGE) == PrpPlan(0x10000, 0, 0)
    # two pages: PRP2 is the second page itself
    plan = plan_prps(0x10200, 4096)
    assert plan == PrpPlan(0x10200, 0x11000, 1) and prp_list_pages_needed(1) == 0
    assert fill_prp_lists(plan, []) == 0x11000
    # three pages: PRP2 points to a list of the other two
    plan = plan_prps(0x10000, 3 * PAGE)
    assert plan == PrpPlan(0x10000, 0x11000, 2)
    lists = lists_for(plan)
    assert fill_prp_lists(plan, lists) == 0xA000_0000
    assert list(lists[0][0][:3]) == [0x11000, 0x12000, 0]
    # an unaligned start touches one more page
    assert plan_prps(0x10008, 2 * PAGE) == PrpPlan(0x10008, 0x11000, 2)
    # exactly 512 more pages fit one list; 513 chain into a second
    assert prp_list_pages_needed(512) == 1 and prp_list_pages_needed(513) == 2
    assert prp_list_pages_needed(511 + 512) == 2 and prp_list_pages_needed(511 + 513) == 3


def test_a_chained_prp_list() -> None:
    plan = plan_prps(0x10000, 600 * PAGE)  # 599 more pages: 511 in the first list, 88 after
    lists = lists_for(plan)
    assert len(lists) == 2
    assert fill_prp_lists(plan, lists) == lists[0][1]
    first, second = lists[0][0], lists[1][0]
    assert [int(x) for x in first[:511]] == [0x11000 + i * PAGE for i in range(511)]
    assert int(first[511]) == lists[1][1]  # the last entry of a full list points to the next
    assert [int(x) for x in second[:88]] == [0x11000 + i * PAGE for i in range(511, 599)]
    assert not second[88:].any()


def test_every_status_of_the_generic_and_command_specific_tables_has_its_name() -> None:
    generic = [*range(0x00, 0x17), *range(0x18, 0x25), *range(0x80, 0x8A)]
    specific = [*range(0x00, 0x04), *range(0x05, 0x17), *range(0x18, 0x2E), *range(0x80, 0x84)]
    for sc in generic:
        assert (0, sc) in STATUS_NAMES, hex(sc)
    for sc in specific:
        assert (1, sc) in STATUS_NAMES, hex(sc)
    assert status_name(0, 0x0C) == "Command Sequence Error"  # the one the old table lacked
    assert status_name(1, 0x02) == "Invalid Queue Size"
    assert status_name(2, 0x81) == "Unrecovered Read Error"
    assert status_name(7, 0x01) == "Vendor Specific"
    assert status_name(0, 0x17) == "reserved status"
    e = CommandError("Create I/O SQ 1", 0, 0x0C)
    assert str(e) == "Create I/O SQ 1: Command Sequence Error (SCT 0x0, SC 0xc)"


def test_a_controller_that_never_becomes_ready(
    fake: tuple[FakeKernel, VfioDevice], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TimeoutError, match=r"CSTS\.RDY did not become 1 within CAP\.TO \(0\.5 s\)"):
        Controller(fake[1])
    assert "leaked" not in capsys.readouterr().err  # everything it took was given back


def test_fatal_status_is_a_clear_error(fake: tuple[FakeKernel, VfioDevice]) -> None:
    ctypes.c_uint32.from_address(fake[1].bar(0).addr + Reg.CSTS).value = 0x2  # CSTS.CFS
    with pytest.raises(NvmeError, match=r"fatal status \(CSTS\.CFS\)"):
        Controller(fake[1])


def test_bad_constructor_arguments_are_refused_before_anything_is_touched(
    fake: tuple[FakeKernel, VfioDevice],
) -> None:
    k = fake[0]
    before = len(k.calls)
    for kwargs, msg in (
        ({"admin_depth": 1}, "admin_depth must be 2..4096"),
        ({"command_timeout": 0}, "command_timeout must be a positive, finite number"),
        ({"command_timeout": float("inf")}, "command_timeout must be a positive, finite"),
        ({"command_timeout": "1"}, "command_timeout must be a positive, finite number"),
        ({"io_queues": 70000}, "io_queues must be 1..65535"),
    ):
        with pytest.raises(ValueError, match=msg):
            Controller(fake[1], **kwargs)
    assert k.calls[before:] == []


@pytest.mark.parametrize(
    "args",
    [["--blocks", "99999999999999999999"], ["--lba", "99999999999999999999"]],
)
def test_rw_refuses_a_range_past_the_namespace_in_one_line(args: list[str]) -> None:
    """On the software controller: checked against the namespace before the data pattern
    (that many LBAs of it) is made; one line, exit 1, no traceback."""
    script = Path(__file__).resolve().parents[2] / "examples" / "nvme" / "rw.py"
    r = subprocess.run(
        [sys.executable, str(script), "--device", "sim", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 1, r.stderr
    assert "run past the end of namespace 1" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("program", "args", "message"),
    [
        ("rw.py", ["--blocks", "-5"], "argument --blocks: -5 is not a whole number of at least 1"),
        ("rw.py", ["--lba", "1.5"], "argument --lba: '1.5' is not a whole number"),
        ("rw.py", ["--mask-bits", "7"], "a DMA mask is 24 to 64 bits wide"),
        ("perf.py", ["--qd", "0"], "argument --qd: 0 is not a whole number of at least 1"),
        ("perf.py", ["--seconds", "nan"], "argument --seconds: nan is not a number above 0"),
        ("perf.py", ["--count", "many"], "argument --count: 'many' is not a whole number"),
    ],
)
def test_program_arguments_are_checked_before_anything_is_opened(
    program: str, args: list[str], message: str
) -> None:
    script = Path(__file__).resolve().parents[2] / "examples" / "nvme" / program
    r = subprocess.run(
        [sys.executable, str(script), "--device", "0000:00:09.0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
