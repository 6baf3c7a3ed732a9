"""Issue 10 on the software controller (uvdma_nvme.sim): the batch API and reap's list, the
checks kept on the fast path, PRP lists, worker processes (--jobs), and perf.py's and
rw.py's output.  Driver logic only; the same claims against QEMU's controller are in
tests/vm/test_nvme.py.  Timing goals are a benchmark (uvdma_nvme.bench), never asserted."""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from uvdma.dma import DMA_TO_DEVICE, DmaBuffer, dma_map_single, dma_unmap_single
from uvdma.testing.fake_kernel import FakeKernel
from uvdma.vfio import open_device
from uvdma_nvme import (
    IO_READ,
    IO_WRITE,
    CommandTimeoutError,
    Controller,
    NvmeError,
    pattern,
)
from uvdma_nvme.jobs import run_jobs
from uvdma_nvme.prp import PRP_ENTRIES, fill_run
from uvdma_nvme.queue import QueuePair
from uvdma_nvme.sim import BDF, NvmeSim, SimConfig, SimNamespace, sim_controller

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "nvme"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[FakeKernel, NvmeSim, Controller]]:
    cfg = SimConfig(namespaces=(SimNamespace(1, 1 << 16, 512),), queues=8)
    with sim_controller(tmp_path, cfg) as (k, sim):
        ctrl = Controller(open_device(BDF, sysfs=tmp_path, backend="type1"), command_timeout=0.3)
        try:
            yield k, sim, ctrl
        finally:
            ctrl.close()
            assert k.open_kinds() == [] and k.pinned == 0  # everything given back


def test_a_batch_rings_the_doorbell_once_and_reap_returns_what_completed(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=64)[0]
    with DmaBuffer(ctrl.dma, 8 * 4096) as buf:
        view = np.frombuffer(buf.cpu, dtype=np.uint8)
        data = pattern(512, 100, 64)
        view[:] = data
        sim.reset_cost()
        writes = q.io_batch(
            IO_WRITE, ns, [(100 + 8 * i, 8, buf.dma + 4096 * i) for i in range(8)], "w"
        )
        assert sim.sq_doorbell_writes == 1  # eight commands, one doorbell write
        assert sim.io_commands == 8 and q.outstanding == 8
        got = q.reap()
        assert sorted(r.cid for r in got) == sorted(r.cid for r in writes)
        assert all(r.done and r.status == 0 for r in got)
        assert sim.cq_doorbell_writes == 1  # one reap, one CQ head doorbell
        q.release_all(got)
        assert q.outstanding == 0
        assert q.reap() == []  # nothing new: an empty list
        assert bytes(sim.namespace_data()[100 * 512 : 164 * 512]) == data.tobytes()
        view[:] = 0
        reads = q.io_batch(
            IO_READ, ns, [(100 + 8 * i, 8, buf.dma + 4096 * i) for i in range(8)], "r"
        )
        got = q.reap()
        assert {r.cid for r in got} == {r.cid for r in reads}
        for r in got:
            assert q.result(r) == 0
        q.release_all(got)
        assert np.array_equal(view, data)


def test_a_batch_that_cannot_all_go_submits_none(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=4)[0]  # 3 commands at most
    with DmaBuffer(ctrl.dma, 4 * 4096) as buf:
        sim.reset_cost()
        good = [(8 * i, 8, buf.dma + 4096 * i) for i in range(3)]
        with pytest.raises(NvmeError, match="outside namespace 1"):
            q.io_batch(IO_READ, ns, [*good[:2], (ns.blocks, 8, buf.dma)], "r")
        with pytest.raises(NvmeError, match="MDTS"):
            q.io_batch(IO_READ, ns, [*good[:2], (0, 1 << 12, buf.dma)], "r")
        with pytest.raises(NvmeError, match="not mapped"):
            q.io_batch(IO_READ, ns, [*good[:2], (0, 8, 0xDEAD0000)], "r")
        with pytest.raises(NvmeError, match="must be an integer"):
            q.io_batch(IO_READ, ns, [*good[:2], (1.5, 8, buf.dma)], "r")  # type: ignore[list-item]
        with pytest.raises(NvmeError, match=r"queue \d+ is full.*4 more asked"):
            q.io_batch(IO_READ, ns, [*good, (0, 8, buf.dma)], "r")
        assert sim.sq_doorbell_writes == 0 and sim.io_commands == 0 and q.outstanding == 0
        q.release_all(q.io_batch(IO_READ, ns, good, "r") and q.reap())  # all three fit
        assert q.outstanding == 0


def test_a_batch_over_two_mappings_and_numpy_integers_goes_whole_with_one_doorbell(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    """The one-pass checks remember one mapping: commands in another, and numpy LBAs, take
    the full checks and are then submitted together, not one by one."""
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=16)[0]
    other = mmap.mmap(-1, 2 * 4096)
    other[:] = pattern(512, 40, 16).tobytes()
    with DmaBuffer(ctrl.dma, 2 * 4096) as buf:
        np.frombuffer(buf.cpu, dtype=np.uint8)[:] = pattern(512, 20, 16)
        far = dma_map_single(ctrl.dma, other, DMA_TO_DEVICE)
        try:
            sim.reset_cost()
            cmds = [
                (np.int64(20), 8, buf.dma),
                (40, np.uint32(8), far),
                (28, 8, buf.dma + 4096),
                (48, 8, far + 4096),
            ]
            reqs = q.io_batch(IO_WRITE, ns, cmds, "w")
            assert len(reqs) == 4 and sim.sq_doorbell_writes == 1
            got = q.reap()
            assert all(q.result(r) == 0 for r in got) and len(got) == 4
            q.release_all(got)
        finally:
            dma_unmap_single(ctrl.dma, far, 2 * 4096, DMA_TO_DEVICE)
    data = sim.namespace_data()
    assert bytes(data[20 * 512 : 36 * 512]) == pattern(512, 20, 16).tobytes()
    assert bytes(data[40 * 512 : 56 * 512]) == pattern(512, 40, 16).tobytes()


def test_a_batch_whose_mappings_keep_changing_is_refused_and_submits_nothing(
    rig: tuple[FakeKernel, NvmeSim, Controller], monkeypatch: pytest.MonkeyPatch
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=8)[0]
    with DmaBuffer(ctrl.dma, 4096) as buf:
        check = q._check_io

        def unmap_meanwhile(*a: Any) -> tuple[int, int, int, int]:
            q._domain.unmaps += 1  # as if another thread unmapped something each time
            return check(*a)

        monkeypatch.setattr(q, "_check_io", unmap_meanwhile)
        sim.reset_cost()
        with pytest.raises(NvmeError, match="mappings changed under every one of 100"):
            q.io_batch(IO_READ, ns, [(0, 8, buf.dma), (8, 8, buf.dma)], "r")
        assert sim.sq_doorbell_writes == 0 and q.outstanding == 0


def test_a_dma_address_that_is_no_plain_int_is_checked_in_full(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    """A numpy address whose end wraps past 2**64 looked inside the remembered mapping;
    one whose PRP2 overflows a 64-bit field raised struct.error and lost the slot in io();
    a float was a TypeError.  Each is now a clear error that changes nothing."""
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=8)[0]
    with DmaBuffer(ctrl.dma, 4096) as buf:
        q.complete(q.io(IO_READ, ns, 0, 8, buf.dma, "prime"))  # a mapping remembered
        sim.reset_cost()
        bad: list[Any] = [np.uint64(2**64 - 512), np.int64(2**63 - 512), 1.5, True]
        for dma in bad:
            for _ in range(3):
                with pytest.raises(NvmeError, match=r"not mapped|DMA address must be"):
                    q.io(IO_READ, ns, 0, 8, dma, "r")
                with pytest.raises(NvmeError, match=r"not mapped|DMA address must be"):
                    q.io_batch(IO_READ, ns, [(0, 8, buf.dma), (8, 8, dma)], "r")
        assert sim.sq_doorbell_writes == 0 and q.outstanding == 0
        assert sorted(q._free) == list(range(len(q._requests)))  # no slot lost
        q.release_all(q.io_batch(IO_READ, ns, [(0, 8, np.uint64(buf.dma))], "r") and q.reap())


def test_a_transfer_over_a_hole_between_mappings_is_refused_and_adjacent_ones_are_one_run(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    """Both ends mapped used to be enough: a 12 KiB write over IOVAs X, X+4K (not mapped)
    and X+8K went to the device.  Now each mapping must follow the last; adjacent mappings
    are remembered as one run, so buffers side by side do not make every I/O look again."""
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=8)[0]
    domain = ctrl.vfio.domain
    mem = mmap.mmap(-1, 3 * 4096)
    mem[:] = pattern(512, 64, 24).tobytes()
    base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    iova = 0x70_0000_0000
    first = domain.map(base, 4096, iova)
    last = domain.map(base + 8192, 4096, iova + 8192)
    middle = None
    try:
        sim.reset_cost()
        with pytest.raises(NvmeError, match="not mapped"):
            q.io(IO_WRITE, ns, 64, 24, iova, "w")
        with pytest.raises(NvmeError, match="not mapped"):
            q.io_batch(IO_WRITE, ns, [(64, 24, iova)], "w")
        assert sim.sq_doorbell_writes == 0 and q.outstanding == 0
        middle = domain.map(base + 4096, 4096, iova + 4096)
        q.complete(q.io(IO_WRITE, ns, 64, 24, iova, "w"))
        assert q._map[:2] == (iova, iova + 3 * 4096)  # one run of three mappings
        assert bytes(sim.namespace_data()[64 * 512 : 88 * 512]) == bytes(mem)
    finally:
        for m in (first, middle, last):
            if m is not None:
                domain.unmap(m)
        del base
        mem.close()


def test_io_batch_takes_any_iterable(rig: tuple[FakeKernel, NvmeSim, Controller]) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=8)[0]
    with DmaBuffer(ctrl.dma, 2 * 4096) as buf:
        sim.reset_cost()
        # numpy LBAs send the batch through the full checks: the generator is read twice
        cmds = ((np.int64(8 * i), 8, buf.dma + 4096 * i) for i in range(2))
        reqs = q.io_batch(IO_READ, ns, cmds, "gen")
        assert len(reqs) == 2 and sim.sq_doorbell_writes == 1
        q.release_all(q.reap())


def test_a_ctrl_c_inside_submit_or_reap_keeps_neither_the_lock_nor_a_slot(
    rig: tuple[FakeKernel, NvmeSim, Controller], monkeypatch: pytest.MonkeyPatch
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=8)[0]
    with DmaBuffer(ctrl.dma, 4 * 4096) as buf:

        def interrupted(*a: Any) -> int:
            raise KeyboardInterrupt

        sim.reset_cost()
        with monkeypatch.context() as m:
            m.setattr(q, "_prp2", interrupted)  # a 16 KiB transfer needs a PRP list
            with pytest.raises(KeyboardInterrupt):
                q.io(IO_READ, ns, 0, 32, buf.dma, "r")
            with pytest.raises(KeyboardInterrupt):
                q.io_batch(IO_READ, ns, [(0, 8, buf.dma), (8, 32, buf.dma)], "r")
        assert not q._lock.locked() and q.outstanding == 0 and sim.sq_doorbell_writes == 0
        assert all(r.state == 0 for r in q._requests)
        reqs = q.io_batch(IO_READ, ns, [(8 * i, 8, buf.dma + 4096 * i) for i in range(3)], "r")
        cqe = q._cqe

        class CtrlCOnTheSecondEntry:
            reads = 0

            def __getitem__(self, i: int) -> int:
                self.reads += 1
                if self.reads == 3:  # DW3 of the first entry, its next, then Ctrl-C
                    raise KeyboardInterrupt
                return int(cqe[i])

        q._cqe = CtrlCOnTheSecondEntry()  # type: ignore[assignment]
        with pytest.raises(KeyboardInterrupt):
            q.reap()
        q._cqe = cqe
        assert not q._lock.locked()
        got = q.reap()  # the head had not moved: every completion is found again
        assert sorted(r.cid for r in got) == sorted(r.cid for r in reqs)
        q.release_all(got)
        assert q.outstanding == 0


def test_perf_batch_n_submits_n_at_a_time_when_completions_trickle_in(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    """A drive that completes one command per poll: --batch 4 still submits in fours (it
    sent nearly every I/O alone with io() when one buffer was idle)."""
    _k, sim, ctrl = rig
    perf = _perf_module()
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=9)[0]
    bufs = [DmaBuffer(ctrl.dma, 4096) for _ in range(8)]
    sizes: list[int] = []

    class OneAtATime:
        def __init__(self) -> None:
            self.stash: list[Any] = []

        def io(self, *a: Any) -> Any:
            sizes.append(1)
            return q.io(*a)

        def io_batch(self, op: int, ns_: Any, cmds: Any, what: str) -> Any:
            sizes.append(len(cmds))
            return q.io_batch(op, ns_, cmds, what)

        def reap(self) -> list[Any]:
            self.stash += q.reap()
            return [self.stash.pop(0)] if self.stash else []

        def __getattr__(self, name: str) -> Any:
            return getattr(q, name)

    args = perf.argparse.Namespace(
        rw="randread", bs=4096, qd=8, batch=4, count=200, seconds=5.0, interrupts=False
    )
    try:
        out = perf.run(args, ctrl, OneAtATime(), ns, bufs, sim, 1, 0, ns.blocks - 8, None)
    finally:
        for b in bufs:
            b.free()
    assert out["ios"] == 200 and set(sizes) == {4} and sum(sizes) == 200


def test_release_all_refuses_what_is_still_in_flight(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=8)[0]
    with DmaBuffer(ctrl.dma, 4096) as buf:
        sim.hold(q.qid)
        held = q.io(IO_READ, ns, 0, 8, buf.dma, "held")
        assert q.reap() == []
        with pytest.raises(NvmeError, match="not a finished request"):
            q.release_all([held])
        assert q.outstanding == 1  # nothing given back
        sim.release(q.qid)
        sim.complete()
        assert q.reap() == [held]
        q.release_all([held])
        assert q.outstanding == 0


def test_the_mapped_range_check_holds_after_an_unmap(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=8)[0]
    mem = mmap.mmap(-1, 1 << 16)
    vaddr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    domain = ctrl.vfio.domain
    m = domain.map(vaddr, 1 << 16)
    try:
        q.complete(q.io(IO_READ, ns, 0, 8, m.iova, "ok"))  # mapped: accepted (remembered)
        q.complete(q.io(IO_READ, ns, 0, 8, m.iova + 8192, "ok"))
        with pytest.raises(NvmeError, match="not mapped"):  # past the mapping's end
            q.io(IO_READ, ns, 0, 16, m.iova + (1 << 16) - 4096, "past the end")
    finally:
        domain.unmap(m)
    sim.reset_cost()
    with pytest.raises(NvmeError, match="not mapped"):
        q.io(IO_READ, ns, 0, 8, m.iova, "after the unmap")
    assert q.outstanding == 0 and sim.sq_doorbell_writes == 0
    del vaddr
    with contextlib.suppress(BufferError):
        mem.close()


def test_a_remembered_mapping_is_forgotten_at_the_next_unmap(
    rig: tuple[FakeKernel, NvmeSim, Controller], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The domain counts its unmaps (IommuDomain.unmaps) and finds the mapping an IOVA lies
    in (mapping_at): the driver trusts the mapping it found until the next unmap, and asks
    again after it."""
    _k, sim, ctrl = rig
    domain = ctrl.vfio.domain
    calls = {"mapping_at": 0, "translate": 0}
    real_mapping_at, real_translate = domain.mapping_at, domain.translate

    def mapping_at(iova: int) -> Any:
        calls["mapping_at"] += 1
        return real_mapping_at(iova)

    def translate(iova: int) -> int | None:
        calls["translate"] += 1
        return real_translate(iova)

    monkeypatch.setattr(domain, "mapping_at", mapping_at)
    monkeypatch.setattr(domain, "translate", translate)
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=8)[0]
    mem = mmap.mmap(-1, 1 << 16)
    vaddr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    m = domain.map(vaddr, 1 << 16)
    for off in (0, 4096, 8192, 0):
        q.complete(q.io(IO_READ, ns, 0, 8, m.iova + off, "in the mapping"))
    assert calls["mapping_at"] == 1 and calls["translate"] == 0  # found once, then trusted
    if domain.translate(m.iova + (1 << 16)) is None:  # nothing mapped right after it
        with pytest.raises(NvmeError, match="not mapped"):  # past its end: asked, refused
            q.io(IO_READ, ns, 0, 16, m.iova + (1 << 16) - 4096, "past the end")
    domain.unmap(domain.map(vaddr, 4096))  # any unmap: the next I/O asks again
    calls["mapping_at"] = 1
    q.complete(q.io(IO_READ, ns, 0, 8, m.iova, "asked again"))
    assert calls["mapping_at"] == 2
    domain.unmap(m)
    sim.reset_cost()
    with pytest.raises(NvmeError, match="not mapped"):
        q.io(IO_READ, ns, 0, 8, m.iova, "after its unmap")
    assert q.outstanding == 0 and sim.sq_doorbell_writes == 0
    with contextlib.suppress(BufferError):
        mem.close()


def test_every_fast_path_check_stays(rig: tuple[FakeKernel, NvmeSim, Controller]) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=3)[0]
    with DmaBuffer(ctrl.dma, 8192) as buf:
        sim.reset_cost()
        for args, match in (
            ((-1, 8), "outside namespace"),
            ((ns.blocks - 4, 8), "outside namespace"),
            ((0, 0), "outside namespace"),
            ((True, 8), "must be an integer"),
            (("0", 8), "must be an integer"),
            ((0, 1 << 12), "MDTS"),
        ):
            with pytest.raises(NvmeError, match=match):
                q.io(IO_READ, ns, args[0], args[1], buf.dma, "bad")  # type: ignore[arg-type]
        assert sim.sq_doorbell_writes == 0 and q.outstanding == 0
        sim.hold(q.qid)
        a = q.io(IO_READ, ns, np.int64(0), 8, buf.dma, "numpy LBA")
        b = q.io(IO_READ, ns, 8, 8, buf.dma + 4096, "b")
        with pytest.raises(NvmeError, match="is full"):
            q.io(IO_READ, ns, 16, 8, buf.dma, "c")
        sim.release(q.qid)
        sim.complete()
        q.release_all(q.reap())
        assert a.state == b.state == 0


def test_prp_runs_by_exact_value() -> None:
    entries = np.zeros(PRP_ENTRIES, dtype=np.uint64)
    scratch = np.zeros((), dtype=np.uint64)
    # one integer's bytes up to 48 entries, numpy above; a first address with its top bit
    # set shows no field carries into the next
    for first in (0xA000_0000_0000, 1 << 63 | 0x1000):
        for n in (1, 3, 8, 47, 48, 49, 100, PRP_ENTRIES):
            for raw in (None, entries.data.cast("B")):  # the bytes view, or made here
                entries[:] = 7
                fill_run(entries, first, n, scratch if n % 2 else None, raw)
                assert entries[:n].tolist() == [first + 4096 * i for i in range(n)]
                assert (entries[n:] == 7).all()  # nothing past the run


def test_transfers_with_prp_lists_on_the_fast_path(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=8)[0]
    with DmaBuffer(ctrl.dma, 1 << 17) as buf:
        view = np.frombuffer(buf.cpu, dtype=np.uint8)
        # the same request each time (depth 8, one at a time): from its second transfer with
        # a list on, the list page it holds is refilled in place, over a longer list's entries
        sizes = ((0, 8192), (512, 8192), (0, 3 * 4096), (0, 1 << 17), (2048, 1 << 16))
        cids = set()
        for off, size in (*sizes, (4096, 5 * 4096), (3584, 3 * 4096)):
            data = pattern(512, 7, size // 512, seed=off + size)
            view[off : off + size] = data
            w = q.io(IO_WRITE, ns, 7, size // 512, buf.dma + off, "w")
            q.complete(w)
            assert bytes(sim.namespace_data()[7 * 512 : 7 * 512 + size]) == data.tobytes()
            view[:] = 0
            r = q.io(IO_READ, ns, 7, size // 512, buf.dma + off, "r")
            q.complete(r)
            assert np.array_equal(view[off : off + size], data)
            cids |= {w.cid, r.cid}
        assert len(cids) == 1  # one request, its list page refilled each time


def test_what_is_not_a_request_is_refused_by_name(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, _sim, ctrl = rig
    q = ctrl.create_io_queues(1, depth=4)[0]
    calls: dict[str, Any] = {
        "complete": q.complete,
        "wait": q.wait,
        "result": q.result,
        "release": q.release,
        "release_all": lambda r: q.release_all([r]),
    }
    for name, call in calls.items():
        for bad in (None, 3, "cid 1"):
            with pytest.raises(NvmeError, match=rf"^{name}: .* is not a Request: pass what io"):
                call(bad)
    assert q.outstanding == 0


def test_prp2_refilled_in_place_lists_every_page(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    """PRP2 for transfers of 2 to 1100 pages after the first, at three offsets, each asked
    twice of one request: the second time the list page it holds is refilled in place (up to
    512 entries) over a longer list's entries.  What the lists hold, walked as the device
    walks them, is every page of the transfer."""
    _k, _sim, ctrl = rig
    q = ctrl.create_io_queues(1, depth=4)[0]
    req = q._requests[0]

    def walk(prp2: int, entries: int) -> list[int]:
        pages = {dma: view for view, dma, _vaddr, _raw in req.lists}
        got: list[int] = []
        while len(got) < entries:
            view, left = pages[prp2], entries - len(got)
            if left <= PRP_ENTRIES:
                got += view[:left].tolist()
            else:  # the last entry chains to the next list page
                got += view[: PRP_ENTRIES - 1].tolist()
                prp2 = int(view[PRP_ENTRIES - 1])
        return got

    base = 0x40_0000_0000  # PRP2 is arithmetic: whether it is mapped is io()'s check
    for off in (0, 512, 4092):
        for entries in (1100, 2, 3, 48, 49, 50, 511, 512, 513, 48, 512):
            dma = base + off
            length = (4096 - off) + 4096 * entries - 4  # ends inside its last page
            for _ in range(2):
                prp2 = q._prp2(req, dma, length)
                second = base + 4096
                want = [second + 4096 * i for i in range(entries)]
                got = [prp2] if entries == 1 else walk(prp2, entries)
                assert got == want, (off, entries)


# -- worker processes ---------------------------------------------------------------------
def test_workers_each_drive_their_own_queue(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    queues = ctrl.create_io_queues(3, depth=8)
    bufs = [DmaBuffer(ctrl.dma, 1 << 16) for _ in queues]

    def work(i: int, q: QueuePair) -> dict[str, Any]:
        data = pattern(512, 1000 * i, 128, seed=i)
        np.frombuffer(bufs[i].cpu, dtype=np.uint8)[:] = data
        q.write(ns, 1000 * i, bufs[i])
        refused = []
        for what, call in (
            ("admin", ctrl.identify_controller),
            ("queues", lambda: ctrl.create_io_queues(1)),
            ("another's queue", queues[(i + 1) % 3].reap),
            ("alloc", lambda: q.read(ns, 0, np.zeros(512, dtype=np.uint8))),
            ("reset", lambda: ctrl.reset("a worker tries")),
        ):
            try:
                call()
            except NvmeError as e:
                refused.append((what, str(e)))
        return {"pid": os.getpid(), "refused": refused}

    jobs = run_jobs(ctrl, queues, work, max_bytes=1 << 16)
    assert [j.ok for j in jobs] == [True] * 3, [j.error for j in jobs]
    assert len({j.pid for j in jobs} | {os.getpid()}) == 4
    for j in jobs:
        assert j.result is not None
        refused = dict(j.result["refused"])
        assert set(refused) == {"admin", "queues", "another's queue", "alloc", "reset"}
        assert "admin queue" in refused["admin"]
        assert "handed to" in refused["another's queue"]
        assert "cannot be allocated in a worker" in refused["alloc"]
    # the parent: what the workers wrote is on the medium; their queues are theirs
    for i in range(3):
        want = pattern(512, 1000 * i, 128, seed=i).tobytes()
        assert bytes(sim.namespace_data()[1000 * i * 512 : (1000 * i + 128) * 512]) == want
    with pytest.raises(NvmeError, match="handed to worker process"):
        queues[0].reap()
    q = ctrl.create_io_queues(1)[0]  # the parent still runs the controller
    back = np.zeros(128 * 512, dtype=np.uint8)
    q.read(ns, 2000, back)
    assert back.tobytes() == pattern(512, 2000, 128, seed=2).tobytes()
    for b in bufs:
        b.free()


def test_a_worker_killed_takes_nothing_down(rig: tuple[FakeKernel, NvmeSim, Controller]) -> None:
    _k, _sim, ctrl = rig
    ns = ctrl.namespace(1)
    queues = ctrl.create_io_queues(3, depth=8)
    bufs = [DmaBuffer(ctrl.dma, 4096) for _ in queues]

    def work(i: int, q: QueuePair) -> dict[str, Any]:
        for n in range(200):
            q.complete(q.io(IO_READ, ns, 8 * n, 8, bufs[i].dma, "r"))
            if i == 1 and n == 50:
                os.kill(os.getpid(), signal.SIGKILL)
        return {"done": 200}

    jobs = run_jobs(ctrl, queues, work, max_bytes=4096)
    assert [j.ok for j in jobs] == [True, False, True]
    assert jobs[1].signal == signal.SIGKILL and "SIGKILL" in (jobs[1].error or "")
    assert jobs[0].result == jobs[2].result == {"done": 200}
    q = ctrl.create_io_queues(1)[0]
    q.read(ns, 0, np.zeros(4096, dtype=np.uint8))  # the controller is fine
    for b in bufs:
        b.free()


def test_a_worker_timeout_keeps_the_command_and_its_memory(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    queues = ctrl.create_io_queues(1, depth=8)
    buf = DmaBuffer(ctrl.dma, 4096)

    def work(_i: int, q: QueuePair) -> dict[str, Any]:
        sim.hold(q.qid)  # this process's copy of the controller holds the command
        req = q.io(IO_READ, ns, 0, 8, buf.dma, "a slow read")
        try:
            q.complete(req, timeout=0.2)
        except CommandTimeoutError as e:
            msg = str(e)
        outstanding = q.outstanding
        sim.complete()  # the device finishes it after all
        q.reap()
        return {"msg": msg, "outstanding": outstanding, "after": q.outstanding}

    (job,) = run_jobs(ctrl, queues, work, max_bytes=4096)
    assert job.ok, job.error
    assert job.result is not None
    assert "cannot abort or reset" in job.result["msg"]
    assert job.result["outstanding"] == 1  # not given back while the device may use it
    assert job.result["after"] == 0  # its completion frees the slot
    assert ctrl.resets == []  # nobody reset the controller
    buf.free()


# -- the programs -------------------------------------------------------------------------
def _program(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--device", "sim", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_perf_json_on_the_software_controller() -> None:
    p = _program("perf.py", "--qd", "8", "--count", "20000", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["ios"] == 20000 and r["iops"] > 0 and r["qd"] == 8
    assert r["anchor_ns"] > 0 and r["driver_ns_per_io"] > 0 and r["device_ns_per_io"] > 0
    assert r["driver_x_anchor"] == pytest.approx(r["driver_ns_per_io"] / r["anchor_ns"], 0.01)
    assert 7.0 <= r["mean_qd"] <= 8.0  # full depth in flight (Little's law)
    assert set(r["lat_us"]) == {"p50", "p99", "p999", "mean"}
    assert "\r" not in p.stderr  # stderr is not a terminal either


def test_perf_batch_and_jobs() -> None:
    p = _program(
        "perf.py", "--qd", "16", "--batch", "8", "--count", "8000", "--jobs", "2", "--json"
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert [j["job"] for j in r["jobs"]] == [0, 1]
    assert all(j["ios"] == 8000 and j["iops"] > 0 and j["driver_ns_per_io"] > 0 for j in r["jobs"])
    assert len({j["pid"] for j in r["jobs"]}) == 2
    assert r["ios"] == 16000 and r["iops"] == pytest.approx(sum(j["iops"] for j in r["jobs"]), 0.01)
    assert r["batch"] == 8 and r["mean_qd"] > 16  # two jobs of 16


def test_perf_resubmits_what_each_reap_freed_with_one_doorbell_write() -> None:
    """By default the completions of a pass go back with one doorbell write (the software
    controller completes a command in the doorbell write, so each pass frees all 8);
    --batch 1 writes the doorbell once per I/O."""
    p = _program("perf.py", "--qd", "8", "--count", "8000", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["ios"] == 8000 and r["batch"] == 0
    assert r["doorbells"] <= 8000 // 8 + 8  # one per pass of 8 (and the first fill)
    p = _program("perf.py", "--qd", "8", "--count", "2000", "--batch", "1", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["doorbells"] == 2000


def test_identify_on_the_software_controller() -> None:
    p = _program("identify.py")
    assert p.returncode == 0, p.stderr
    assert "controller sim: uvdma software NVMe controller" in p.stdout
    assert "namespace 1:" in p.stdout and "health:" in p.stdout


def test_perf_progress_in_a_log_is_one_line_a_second() -> None:
    p = _program("perf.py", "--qd", "4", "--seconds", "3.5")
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stdout
    lines = p.stdout.splitlines()
    progress = [ln for ln in lines if ln.startswith("randread qd 4:") and " s, " in ln]
    assert 3 <= len(progress) <= 4, lines
    assert "IOPS" in lines[-4] and "mean queue depth achieved" in p.stdout


def test_perf_refuses_a_batch_deeper_than_the_queue() -> None:
    p = _program("perf.py", "--qd", "4", "--batch", "8")
    assert p.returncode == 2 and "--batch 8: at most --qd" in p.stderr
    assert "Traceback" not in p.stderr


def test_rw_jobs_each_write_their_range_and_all_verify() -> None:
    p = _program("rw.py", "--blocks", "300", "--jobs", "3", "--lba", "10")
    assert p.returncode == 0, p.stderr
    assert "job 2 (pid" in p.stdout and "LBAs 610..909 verified" in p.stdout
    assert "verified: 3 jobs x 300 LBAs" in p.stdout


def _perf_module() -> Any:
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("perf_under_test", EXAMPLES / "perf.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_perf_waits_out_a_slow_command_and_counts_everything_it_reaped(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    """Nothing completes for a whole command timeout: perf's loop waits for its oldest
    command through the driver (recovery if need be); when the device answers after all,
    every command that wait reaped is counted, and the loop ends."""
    _k, sim, ctrl = rig
    perf = _perf_module()
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=5)[0]
    bufs = [DmaBuffer(ctrl.dma, 4096) for _ in range(4)]
    args = perf.argparse.Namespace(
        rw="randread", bs=4096, qd=4, batch=0, count=4, seconds=5.0, interrupts=False
    )
    ctrl.command_timeout = 3.0
    sim.hold(q.qid)
    timer = sim.complete_after(4.0)  # after perf's 3 s, inside the driver's wait (to 6 s)
    try:
        out = perf.run(args, ctrl, q, ns, bufs, sim, 1, 0, ns.blocks - 8, None)
    finally:
        timer.join()
        for b in bufs:
            b.free()
    assert out["ios"] == 4 and q.outstanding == 0
    assert len(out["_lat_ns"]) == 4 and min(out["_lat_ns"]) >= 3.9e9
    assert ctrl.resets == []


def test_perf_stops_at_its_count_mid_batch() -> None:
    """--count reached while idle buffers still make whole batches: the loop stops
    submitting (it used to spin on empty batches for ever)."""
    p = _program("perf.py", "--qd", "64", "--batch", "16", "--count", "40", "--json", timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ios"] == 40


def test_the_benchmark_refuses_a_run_count_it_cannot_make() -> None:
    for bad in (["--runs", "0"], ["--runs", "101"], ["--ios", "0"]):
        p = subprocess.run(
            [sys.executable, "-m", "uvdma_nvme.bench", *bad],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert p.returncode == 2 and p.stdout == "", bad  # refused before measuring
        assert "--ios must be at least 1 and --runs 1..100" in p.stderr
        assert "Traceback" not in p.stderr


def test_the_benchmark_measures_every_row() -> None:
    """A smoke run of ``python -m uvdma_nvme.bench`` (figures are never asserted: only that
    each row is measured, and the floor's stand-in really completed its I/Os)."""
    p = subprocess.run(
        [sys.executable, "-m", "uvdma_nvme.bench", "--ios", "3000", "--runs", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    rows = {k for k, v in r.items() if isinstance(v, dict)}
    assert rows == {
        "driver_qd1_4k",
        "driver_qd32_4k",
        "io_qd32_4k",
        "batch32_4k",
        "floor_batch32",
        "own_qd32_4k",
        "own_io_qd32_4k",
        "prp_per_page_64k",
        "prp_per_page_128k",
        "prp_per_page_256k",
        "prp_per_page_1024k",
    }
    assert all(r[k]["ns"] > 0 and r[k]["x_anchor"] > 0 for k in rows) and r["anchor_ns"] > 0
