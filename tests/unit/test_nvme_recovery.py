"""The NVMe driver's command lifecycle on the software controller (examples/nvme/uvdma_nvme/sim.py):
timeouts, Abort both ways, resets, CSTS.CFS, surprise removal, threads, Ctrl-C, the device
request and use after close.  Driver logic only: the same claims against QEMU's controller
and the real kernel are in tests/vm/test_nvme_faults.py."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from uvdma.dma import DmaBuffer
from uvdma.testing.fake_kernel import FakeKernel
from uvdma.vfio import open_device
from uvdma_nvme import (
    IO_READ,
    CommandTimeoutError,
    Controller,
    ControllerClosedError,
    ControllerGoneError,
    ControllerResetError,
    NvmeError,
    pattern,
)
from uvdma_nvme.sim import BDF, NvmeSim, SimConfig, SimNamespace, sim_controller

FILL = 0xA5


@pytest.fixture
def rig(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[FakeKernel, NvmeSim, Controller]]:
    cfg: SimConfig = getattr(request, "param", SimConfig())
    with sim_controller(tmp_path, cfg) as (k, sim):
        ctrl = Controller(open_device(BDF, sysfs=tmp_path, backend="type1"), command_timeout=0.2)
        try:
            yield k, sim, ctrl
        finally:
            ctrl.close()
            assert k.open_kinds() == [] and k.pinned == 0  # everything given back


def small(**kw: Any) -> SimConfig:
    return SimConfig(namespaces=(SimNamespace(1, 1 << 16, 512),), **kw)


def roundtrip(q: Any, ns: Any, lba: int) -> None:
    data = pattern(ns.lba_size, lba, 8, seed=lba)
    q.write(ns, lba, data)
    back = np.zeros_like(data)
    q.read(ns, lba, back)
    assert np.array_equal(back, data)


@pytest.mark.parametrize("rig", [small(aborts=True)], indirect=True)
def test_a_timeout_that_the_abort_ends_needs_no_reset(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1)[0]
    sim.hold(1)
    with DmaBuffer(ctrl.dma, 4096) as buf:
        req = q.io(IO_READ, ns, 0, 8, buf.dma, "a slow read")
        with pytest.raises(
            CommandTimeoutError,
            match=r"a slow read \(cid \d+\) on queue 1: no "
            r"completion within 0\.2 s; it was aborted",
        ) as e:
            q.complete(req)
        assert e.value.aborted and not e.value.reset
        assert sim.held() == []  # the device has nothing of it left
    sim.release(1)
    assert ctrl.resets == [] and q.outstanding == 0
    roundtrip(q, ns, 16)


@pytest.mark.parametrize("rig", [small(aborts=False)], indirect=True)
def test_a_timeout_the_abort_does_not_end_resets_and_nothing_comes_late(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q1, q2 = ctrl.create_io_queues(2)
    sim.hold()  # every queue: q2's command is in flight too
    unaligned = np.full(64 * 1024 + 1, 0x5A, dtype=np.uint8)[1:]  # bounced
    other = DmaBuffer(ctrl.dma, 4096)
    bystander = q2.io(IO_READ, ns, 100, 8, other.dma, "a bystander read")
    sim.release()
    sim.hold(1)
    with pytest.raises(CommandTimeoutError, match=r"so controller .* was reset") as e:
        q1.read(ns, 0, unaligned)
    assert e.value.reset
    assert bool(np.all(unaligned == 0x5A))  # a failed bounced read copies nothing back
    assert sim.held() == []  # the reset dropped it: no late DMA can come
    with pytest.raises(
        ControllerResetError,
        match=r"a bystander read \(cid \d+\) on queue 2: "
        r"failed: controller .* was reset",
    ):
        q2.complete(bystander)
    other.free()
    assert len(ctrl.resets) == 1
    sim.release(1)
    for q in (q1, q2):  # the same QueuePair objects work after the reset
        roundtrip(q, ns, 8 * q.qid)
    assert ctrl.active_namespaces() == [1]


@pytest.mark.parametrize("rig", [small(aborts=False)], indirect=True)
def test_memory_released_after_a_reset_is_never_written_by_the_old_command(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1)[0]
    sim.namespace_data()[: 64 * 1024] = b"\x11" * (64 * 1024)
    sim.hold(1)
    buf = np.zeros(64 * 1024 + 8, dtype=np.uint8)[8:]  # bounced through the page allocator
    with pytest.raises(CommandTimeoutError):
        q.read(ns, 0, buf)
    reused = [DmaBuffer(ctrl.dma, 64 * 1024) for _ in range(8)]
    for b in reused:
        b.array()[:] = FILL
    for h in sim.held():  # anything the device still had would DMA now
        sim.transfer(h.cid, h.qid)
    sim.complete()
    for b in reused:
        assert bool(np.all(b.array() == FILL))
        b.free()
    assert bool(np.all(buf == 0))


@pytest.mark.parametrize("rig", [small()], indirect=True)
def test_csts_cfs_resets_and_fails_what_was_in_flight(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1)[0]
    sim.hold(1)
    with DmaBuffer(ctrl.dma, 4096) as buf:
        req = q.io(IO_READ, ns, 0, 8, buf.dma, "read before the fault")
        sim.fatal()
        with pytest.raises(ControllerResetError, match=r"fatal status \(CSTS\.CFS\)"):
            q.complete(req)
    sim.release(1)
    assert ctrl.resets == ["the controller reported a fatal status (CSTS.CFS)"]
    roundtrip(q, ns, 0)


@pytest.mark.parametrize("rig", [small()], indirect=True)
def test_a_controller_that_stays_fatal_is_gone_and_close_still_releases_everything(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1)[0]
    sim.hold(1)
    buf = np.zeros(8192, dtype=np.uint8)
    sim.fatal(persist=True)
    with pytest.raises(
        ControllerGoneError, match=r"was reset \(.*\) and is gone: it did not come back"
    ):
        q.read(ns, 0, buf)
    with pytest.raises(ControllerGoneError):
        q.read(ns, 0, buf)
    with pytest.raises(ControllerGoneError):
        ctrl.identify_controller()


@pytest.mark.parametrize("rig", [small()], indirect=True)
def test_surprise_removal_fails_everything_at_once_and_nothing_hangs(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=8)[0]
    sim.hold(1)
    buf = DmaBuffer(ctrl.dma, 8 * 4096)
    reqs = [q.io(IO_READ, ns, 8 * i, 8, buf.dma + 4096 * i, f"read {i}") for i in range(4)]
    sim.remove()
    t0 = time.monotonic()
    for r in reqs:
        with pytest.raises(
            ControllerGoneError, match=r"read \d \(cid \d+\) on queue 1: .*all-ones"
        ):
            q.complete(r)
    with pytest.raises(ControllerGoneError, match="all-ones"):
        q.read(ns, 0, np.zeros(512, dtype=np.uint8))  # a new command fails at once
    with pytest.raises(ControllerGoneError):
        ctrl.create_io_queues(1)
    assert time.monotonic() - t0 < 0.5 * ctrl.command_timeout * 10
    ctrl.close()  # no hang on a device that answers nothing
    assert time.monotonic() - t0 < 5
    # the DmaBuffer this test never freed went with the domain: reported, not crashed on
    assert len(ctrl.leaks) == 1 and "size 32768" in ctrl.leaks[0]
    del buf


@pytest.mark.parametrize("rig", [small()], indirect=True)
def test_threads_sharing_a_queue_pair(rig: tuple[FakeKernel, NvmeSim, Controller]) -> None:
    _k, _sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=4)[0]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(50):
                roundtrip(q, ns, 1000 * k + 8 * i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert q.outstanding == 0 and ctrl.resets == []


@pytest.mark.parametrize("rig", [small()], indirect=True)
def test_ctrl_c_waits_until_the_device_is_done_with_the_buffer(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    ctrl.command_timeout = 5
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1)[0]
    sim.namespace_data()[:4096] = b"\x22" * 4096
    sim.hold(1)
    buf = np.zeros(4096 + 8, dtype=np.uint8)[8:]

    def interrupt(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        sim.complete_after(0.5, qid=1)  # the device finishes 0.4 s after the Ctrl-C
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            q.read(ns, 0, buf)
        assert time.monotonic() - t0 >= 0.45  # it waited for the device
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert sim.held() == [] and q.outstanding == 0
    assert ctrl.dma.debug.live["single"] == {}  # the buffer's mapping is gone
    sim.release(1)
    roundtrip(q, ns, 64)


@pytest.mark.parametrize("rig", [small()], indirect=True)
def test_the_kernel_asking_for_the_device_shuts_the_controller_down(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    k, _sim, ctrl = rig
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1)[0]
    roundtrip(q, ns, 0)
    assert k.request(BDF)  # vfio-pci's device request: `uvdma unbind`, hot-unplug
    watcher = ctrl.vfio._watcher
    assert watcher is not None
    watcher.join(timeout=10)
    assert ctrl.closed and ctrl.vfio.closed and ctrl.leaks == []
    assert not k.device_open(BDF)  # the unbind can complete
    with pytest.raises(
        ControllerClosedError, match="was released: the kernel asked for the device back"
    ):
        q.read(ns, 0, np.zeros(512, dtype=np.uint8))
    with pytest.raises(ControllerClosedError, match="was released"):
        ctrl.namespace(1)


@pytest.mark.parametrize("rig", [small(queues=3)], indirect=True)
def test_queue_creation_frees_what_a_refusal_took_and_can_be_repeated(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    _k, sim, ctrl = rig
    live = ctrl.dma.debug.live["coherent"]
    before = dict(live)
    sim.config.mqes = 15  # the controller now refuses deep queues (Invalid Queue Size)
    ctrl.mqes = 1024  # as if CAP had said otherwise: the device's refusal must clean up
    with pytest.raises(NvmeError, match=r"Create I/O CQ 1 on queue 0: Invalid Queue Size"):
        ctrl.create_io_queues(1, depth=64)
    assert live == before  # the queue memory went back
    assert ctrl.io_queues == []
    a = ctrl.create_io_queues(2, depth=16)
    with pytest.raises(NvmeError, match=r"granted 3 I/O queues and 2 exist: ask for at most 1"):
        ctrl.create_io_queues(2)
    b = ctrl.create_io_queues(1, depth=16)
    ns = ctrl.namespace(1)
    for q in (*a, *b):
        roundtrip(q, ns, 8 * q.qid)


def test_use_after_close_of_every_object(tmp_path: Path) -> None:
    with sim_controller(tmp_path, small()) as (k, _sim):
        ctrl = Controller(open_device(BDF, sysfs=tmp_path, backend="type1"))
        ns = ctrl.namespace(1)
        q = ctrl.create_io_queues(1)[0]
        ctrl.close()
        ctrl.close()
        for call in (
            lambda: q.read(ns, 0, np.zeros(512, dtype=np.uint8)),
            lambda: q.submit(0),
            q.reap,
            lambda: ctrl.create_io_queues(1),
            ctrl.identify_controller,
            ctrl.pool_stats,
            ctrl.iommu_faults,
        ):
            with pytest.raises(ControllerClosedError, match=f"controller {BDF} is closed"):
                call()
        assert k.open_kinds() == []


def test_bad_submit_fields_are_refused_before_a_slot_is_taken(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    """More bad raw submits than the queue has slots: each is a clear error, none keeps a
    command slot, nothing reaches the device, and the queue still works."""
    _k, sim, ctrl = rig
    q = ctrl.create_io_queues(1, depth=4)[0]
    ns = ctrl.namespace(1)
    before = sim.commands
    bad: list[dict[str, Any]] = [
        {"opcode": -1},
        {"opcode": 256},  # would set the FUSE bits through CDW0
        {"opcode": 2, "nsid": -1},
        {"opcode": 2, "nsid": 1 << 32},
        {"opcode": 2, "prp1": 1 << 64},
        {"opcode": 2, "cdw": (1 << 32,)},
        {"opcode": 2, "cdw": (0,) * 7},
        {"opcode": 2.0},
    ]
    for kw in bad:
        with pytest.raises(NvmeError, match=r"submit: (the|at most)"):
            q.submit(**kw)
    assert q.outstanding == 0
    assert sim.commands == before  # nothing was posted to the device
    roundtrip(q, ns, 0)


def test_closing_the_vfio_device_first_then_the_controller_is_clean(tmp_path: Path) -> None:
    with sim_controller(tmp_path, small()) as (k, _sim):
        vd = open_device(BDF, sysfs=tmp_path, backend="type1")
        ctrl = Controller(vd, command_timeout=0.2)
        ctrl.create_io_queues(1)
        vd.close()  # the IOMMU domain and the DMA memory go with it
        ctrl.close()  # nothing left to free one by one: no error
        ctrl.close()
        assert ctrl.closed and k.open_kinds() == [] and k.pinned == 0


def test_a_second_controller_on_the_same_device_is_refused(
    rig: tuple[FakeKernel, NvmeSim, Controller],
) -> None:
    """A second Controller would reset the device under the first; it is refused, changes
    nothing, and once the first is closed the device may be driven again."""
    k, _sim, ctrl = rig
    q = ctrl.create_io_queues(1)[0]
    ns = ctrl.namespace(1)
    calls = len(k.calls)
    with pytest.raises(NvmeError, match="already driven by another Controller"):
        Controller(ctrl.vfio, command_timeout=0.2)
    assert k.calls[calls:] == []  # not even a register read
    roundtrip(q, ns, 8)  # the first one never noticed


def test_the_controller_makes_and_closes_its_own_dma_domain(tmp_path: Path) -> None:
    """Explicit, not silent: the controller's DMA domain takes the coherent_pool it is given
    and goes with the controller, leaving nothing mapped or open."""
    with sim_controller(tmp_path, small()) as (k, _sim):
        vd = open_device(BDF, sysfs=tmp_path, backend="type1")
        ctrl = Controller(vd, command_timeout=0.2, coherent_pool="256K")
        assert ctrl.dma.dma_domain is ctrl.dma_domain
        assert ctrl.dma_domain.atomic_pool_size == 256 << 10
        roundtrip(ctrl.create_io_queues(1)[0], ctrl.namespace(1), 0)
        ctrl.close()
        assert ctrl.dma_domain.closed and k.open_kinds() == [] and k.pinned == 0


def test_a_read_whose_buffer_was_released_under_it_raises_never_returns_stale_data(
    rig: tuple[FakeKernel, NvmeSim, Controller], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel asks for the device back (the watcher thread closes the controller) after
    the device finished a bounced read but before the driver copied it out: the data never
    reached the caller's buffer, so the read raises instead of returning as if it had
    (seen in the VM: a holder's read-back compare failed during `uvdma unbind`)."""
    _k, _sim, ctrl = rig
    q = ctrl.create_io_queues(1)[0]
    ns = ctrl.namespace(1)
    data = pattern(ns.lba_size, 0, 8)
    q.write(ns, 0, data)
    real = ctrl._let_go

    def released_first(t: Any, *, copy_out: bool) -> None:
        ctrl._release_requested(ctrl.vfio)  # what the watcher does, at the worst moment
        real(t, copy_out=copy_out)

    monkeypatch.setattr(ctrl, "_let_go", released_first)
    back = np.zeros(data.nbytes + 1, np.uint8)[1:]  # unaligned: bounced
    with pytest.raises(ControllerClosedError, match="was released"):
        q.read(ns, 0, back)
    assert not back.any()  # nothing was copied, and the caller was told


def test_a_bad_coherent_pool_gives_back_everything_and_the_device_can_be_driven(
    tmp_path: Path,
) -> None:
    """A Controller that fails while making its DMA domain leaves no owner entry, no fault
    log and no release handler behind: the same device is driven at once afterwards."""
    from uvdma.errors import SizeError  # noqa: PLC0415 - only this test needs it

    with sim_controller(tmp_path, small()) as (k, _sim):
        vd = open_device(BDF, sysfs=tmp_path, backend="type1")
        with pytest.raises(SizeError) as info:  # kept: its traceback holds the half-built one
            Controller(vd, command_timeout=0.2, coherent_pool="lots")
        ctrl = Controller(vd, command_timeout=0.2)  # not "already driven"
        assert info.value is not None
        roundtrip(ctrl.create_io_queues(1)[0], ctrl.namespace(1), 0)
        ctrl.close()
        assert k.open_kinds() == [] and k.pinned == 0
