"""Nothing lost: the NVMe driver under faults, misuse and contention, on QEMU's emulated NVMe.

A real timeout needs a slow device: ``tools/test`` boots the guest with one controller
throttled by QEMU (``uvdma vm run --nvme-iops``), whose queued commands really run, and
DMA, seconds later.  Each "nothing lost" claim here is checked the hard way: fill memory,
wait until every throttled command would have run, check it; write data, kill the writer,
read it back in a new process.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.vm import bind_back
from uvdma import pci
from uvdma.dma import DmaBuffer, dma_alloc_coherent, dma_free_coherent
from uvdma_nvme import (
    CommandTimeoutError,
    Controller,
    ControllerClosedError,
    NvmeError,
    pattern,
)

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]
FILL = 0xA5


def controllers() -> list[tuple[str, int]]:
    """(BDF, I/O operations per second allowed, 0 = unlimited) of each controller."""
    iops = os.environ.get("UVDMA_VM_NVME_IOPS", "")
    if not iops:
        raise AssertionError(
            "this test needs a throttled controller: boot the guest with "
            "`uvdma vm run --nvme 4 --nvme-iops 0,0,1,0` (tools/test does)"
        )
    limits = [int(x) for x in iops.split(",")]
    return [(str(d.address), n) for d, n in zip(pci.nvme_controllers(), limits, strict=True)]


def slow_bdf() -> tuple[str, int]:
    slow = [(b, n) for b, n in controllers() if n]
    assert slow, "no throttled controller in UVDMA_VM_NVME_IOPS"
    return slow[0]


def fast_bdf() -> str:
    return next(b for b, n in controllers() if n == 0)


@pytest.fixture
def slow() -> Iterator[tuple[Controller, int]]:
    bdf, iops = slow_bdf()
    c = Controller.open(bdf, command_timeout=0.5)
    yield c, iops
    c.close()
    assert c.leaks == [], c.leaks  # the DMA-API check at close finds nothing


def filled(ctrl: Controller, count: int, size: int) -> list[DmaBuffer]:
    bufs = [DmaBuffer(ctrl.dma, size) for _ in range(count)]
    for b in bufs:
        b.array()[:] = FILL
    return bufs


@pytest.mark.parametrize("placement", ["bounced", "in place"])
def test_a_timed_out_read_never_writes_into_memory_handed_out_again(
    slow: tuple[Controller, int], placement: str
) -> None:
    ctrl, iops = slow
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1)[0]
    size = 4 << 20  # 8 commands at a 512 KiB MDTS: at 1 I/O per second most of them wait
    if placement == "bounced":
        backing = np.empty(size + 1, dtype=np.uint8)
        buf = backing[1:]  # unaligned: the driver bounces it through DMA memory of its own
    else:
        mem = mmap.mmap(-1, size)  # page-aligned: mapped where it is
        buf = np.frombuffer(mem, dtype=np.uint8)
    buf[:] = 0x5A
    t0 = time.monotonic()
    with pytest.raises(CommandTimeoutError, match="was reset") as e:
        q.read(ns, 0, buf)
    assert e.value.reset
    snapshot = buf.copy()
    if placement == "bounced":
        assert bool(np.all(buf == 0x5A))  # a failed bounced read copies nothing back
    # The memory the failed read used goes back to the allocators; take it again and more.
    bufs = filled(ctrl, 4, 1 << 20)
    cpu, dma = dma_alloc_coherent(ctrl.dma, 2 << 20)
    coherent = np.ctypeslib.as_array((ctypes.c_uint8 * (2 << 20)).from_address(cpu))
    coherent[:] = FILL
    # every throttled command would have run by now if the device still had them
    time.sleep(max(0.0, t0 + 8 / iops + 3 - time.monotonic()))
    for b in bufs:
        assert bool(np.all(b.array() == FILL)), "the device wrote into memory handed out again"
    assert bool(np.all(coherent == FILL))
    assert np.array_equal(buf, snapshot), "the caller's buffer changed after the error"
    assert ctrl.iommu_faults(wait=1) == []  # no late DMA into an unmapped IOVA either
    del coherent
    dma_free_coherent(ctrl.dma, 2 << 20, cpu, dma)
    for b in bufs:
        b.free()
    # the controller works after the reset, on the same queue (slowly: 1 I/O per second)
    ctrl.command_timeout = 10
    data = pattern(ns.lba_size, 100, 8)
    q.write(ns, 100, data)
    back = np.zeros_like(data)
    q.read(ns, 100, back)
    assert np.array_equal(back, data)
    assert len(ctrl.resets) == 1 and "no completion within 0.5 s" in ctrl.resets[0]
    if placement == "in place":
        del buf


def test_a_reset_keeps_every_queue_pair_and_fails_the_others_by_name(
    slow: tuple[Controller, int],
) -> None:
    ctrl, _iops = slow
    ns = ctrl.namespace(1)
    q1, q2 = ctrl.create_io_queues(2, depth=16)
    with DmaBuffer(ctrl.dma, 1 << 20) as a, DmaBuffer(ctrl.dma, 1 << 20) as b:
        r1 = [q1.io(0x02, ns, i * 1024, 1024, a.dma + 0, "slow read") for i in range(2)]
        r2 = q2.io(0x02, ns, 4096, 1024, b.dma, "bystander read")
        with pytest.raises(CommandTimeoutError):
            for r in r1:
                q1.complete(r)
        for r in r1:
            if r.state:  # not collected yet: failed by the reset
                with contextlib.suppress(NvmeError):
                    q1.complete(r)
        # the other queue's command failed with the reset, naming itself
        with pytest.raises(NvmeError, match=r"bystander read \(cid \d+\) on queue 2: .*was reset"):
            q2.complete(r2)
    assert q1.outstanding == q2.outstanding == 0
    assert len(ctrl.resets) == 1
    ctrl.command_timeout = 10  # 1 I/O per second from here on
    # both QueuePair objects still work, and so do admin commands
    for q, lba in ((q1, 10), (q2, 20)):
        data = pattern(ns.lba_size, lba, 8)
        q.write(ns, lba, data)
        back = np.zeros_like(data)
        q.read(ns, lba, back)
        assert np.array_equal(back, data)
    assert ctrl.active_namespaces() == [1]
    assert ctrl.create_io_queues(1)[0].qid == 3  # and more queues can be made


def test_kill_9_in_the_middle_of_heavy_writes_loses_no_acknowledged_write(tmp_path: Path) -> None:
    bdf = fast_bdf()
    writer = textwrap.dedent(
        f"""
        import sys
        from uvdma_nvme import Controller, pattern
        with Controller.open({bdf!r}) as c:
            ns = c.namespace(1)
            q = c.create_io_queues(1)[0]
            lba = 0
            while True:
                q.write(ns, lba, pattern(ns.lba_size, lba, 128, seed=0xD1E))
                print(lba, flush=True)  # acknowledged: the write command completed
                lba = (lba + 128) % (ns.blocks - 128)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None
    acked: list[int] = []
    deadline = time.monotonic() + 120
    while len(acked) < 40 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(int(line))
    os.kill(proc.pid, signal.SIGKILL)  # in the middle of the next writes
    proc.wait()
    assert len(acked) >= 40, "the writer did not get going"
    with Controller.open(bdf) as c:  # a new process (here: this one) re-opens the controller
        ns = c.namespace(1)
        q = c.create_io_queues(1)[0]
        back = np.zeros(128 * ns.lba_size, dtype=np.uint8)
        for lba in acked:
            q.read(ns, lba, back)
            assert np.array_equal(back, pattern(ns.lba_size, lba, 128, seed=0xD1E)), lba
    assert c.leaks == []


def test_threads_sharing_one_queue_pair_all_finish_and_the_queue_keeps_working() -> None:
    with Controller.open(fast_bdf(), command_timeout=30) as c:
        ns = c.namespace(1)
        q = c.create_io_queues(1, depth=8)[0]
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                for i in range(25):
                    lba = 2048 * k + 8 * i
                    data = pattern(ns.lba_size, lba, 8, seed=k)
                    q.write(ns, lba, data)
                    back = np.zeros_like(data)
                    q.read(ns, lba, back)
                    if not np.array_equal(back, data):
                        raise AssertionError(f"thread {k}: LBA {lba} reads back wrong")
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a thread is stuck"
        assert errors == []
        assert q.outstanding == 0 and c.resets == []
        data = pattern(ns.lba_size, 9000, 8)  # a later single-threaded user of the queue
        q.write(ns, 9000, data)
        back = np.zeros_like(data)
        q.read(ns, 9000, back)
        assert np.array_equal(back, data)
    assert c.leaks == []


PROBE = """
import sys
import numpy as np
from uvdma_nvme import Controller, ControllerClosedError
c = Controller.open({bdf!r})
ns = c.namespace(1)
q = c.create_io_queues(1)[0]
c.close()
c.close()  # a second close does nothing
calls = [
    lambda: c.create_io_queues(1),
    lambda: c.identify_controller(),
    lambda: c.namespace(1),
    lambda: c.smart(),
    lambda: q.read(ns, 0, np.zeros(512, dtype=np.uint8)),
    lambda: q.write(ns, 0, np.zeros(512, dtype=np.uint8)),
    lambda: q.flush(ns),
    lambda: q.reap(),
    lambda: q.submit(0x02),
]
for call in calls:
    try:
        call()
    except ControllerClosedError as e:
        print("refused:", e)
    else:
        print("NOT REFUSED")
"""


def test_use_after_close_is_a_clear_error_not_a_crash() -> None:
    bdf = fast_bdf()
    r = subprocess.run(  # a crash would kill only the probe, and show as its exit code
        [sys.executable, "-c", PROBE.format(bdf=bdf)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, (r.returncode, r.stderr)
    lines = r.stdout.splitlines()
    assert len(lines) == 9 and "NOT REFUSED" not in r.stdout
    assert all(f"controller {bdf} is closed" in line for line in lines)


def test_queue_creation_can_be_repeated_and_bad_requests_change_nothing() -> None:
    with Controller.open(fast_bdf()) as c:
        live = c.dma.debug.live["coherent"]
        before = len(live)
        for args, msg in (
            ((1, 1), r"depth 1 is outside 2\.\.2048"),
            ((1, 4096), r"depth 4096 is outside 2\.\.2048"),
            ((0,), r"ask for 1\.\.65535 queues, not 0"),
            ((70000,), r"ask for 1\.\.65535 queues, not 70000"),
            ((c.queues_granted + 1,), rf"granted {c.queues_granted} I/O queues and 0 exist"),
            (("2",), r"queue count must be an integer"),
        ):
            with pytest.raises(NvmeError, match=msg):
                c.create_io_queues(*args)
        assert len(live) == before  # nothing allocated, nothing leaked
        a = c.create_io_queues(2)
        b = c.create_io_queues(1)  # a second call: more queues from what was granted
        assert [q.qid for q in (*a, *b)] == [1, 2, 3]
        ns = c.namespace(1)
        for q in (*a, *b):
            data = pattern(ns.lba_size, 7 * q.qid, 8)
            q.write(ns, 7 * q.qid, data)
            back = np.zeros_like(data)
            q.read(ns, 7 * q.qid, back)
            assert np.array_equal(back, data)
    assert c.leaks == []


def test_driver_arguments_are_checked() -> None:
    with Controller.open(fast_bdf()) as c:
        ns = c.namespace(1)
        q = c.create_io_queues(1)[0]
        with pytest.raises(NvmeError, match=r"the LBA must be an integer, not float 1\.5"):
            q.read(ns, 1.5, np.zeros(512, dtype=np.uint8))  # type: ignore[arg-type]
        with pytest.raises(NvmeError, match="the LBA must be an integer, not str"):
            q.write(ns, "0", np.zeros(512, dtype=np.uint8))  # type: ignore[arg-type]
        with pytest.raises(NvmeError, match="is read-only, so the read could not land in it"):
            q.read(ns, 0, bytes(512))
        with pytest.raises(NvmeError, match="a list is not a buffer"):
            q.write(ns, 0, [0] * 512)
        q.write(ns, 30, bytes(range(256)) * 2)  # bytes may be written ...
        back = bytearray(512)
        q.read(ns, 30, back)  # ... and read back into a bytearray
        assert back == bytes(range(256)) * 2
        q.read(ns, np.int64(30), back)  # numpy integers are integers
        with pytest.raises(NvmeError, match="namespace id must be an integer"):
            c.namespace("1")  # type: ignore[arg-type]
        assert q.outstanding == 0
    assert c.leaks == []


def test_closing_with_commands_in_flight_fails_them_and_releases_everything() -> None:
    bdf, _ = slow_bdf()
    ctrl = Controller.open(bdf, command_timeout=0.5)
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1)[0]
    buf = DmaBuffer(ctrl.dma, 1 << 20)
    reqs = [q.io(0x02, ns, 2048 * i, 1024, buf.dma, "abandoned read") for i in range(3)]
    ctrl.close()  # shuts the controller down first: no DMA after this
    for r in reqs:
        if r.state:  # the first may have completed before the close
            with pytest.raises(ControllerClosedError, match=r"abandoned read \(cid \d+\)"):
                q.wait(r)
    # everything was given back, except the DmaBuffer this test never freed (the leak report
    # names it)
    assert len(ctrl.leaks) == 1 and "size 1048576" in ctrl.leaks[0], ctrl.leaks


HOLDER = """
import sys, time
import numpy as np
from uvdma_nvme import Controller, ControllerClosedError, pattern
c = Controller.open({bdf!r})
ns = c.namespace(1)
q = c.create_io_queues(1)[0]
print("ready", flush=True)
lba = 0
try:
    while True:
        data = pattern(ns.lba_size, lba, 8)
        q.write(ns, lba, data)
        back = np.zeros_like(data)
        q.read(ns, lba, back)
        assert np.array_equal(back, data)
        lba = (lba + 8) % 4096
except ControllerClosedError as e:
    print("stopped:", e, flush=True)
    print("leaks:", c.leaks, flush=True)
"""


def test_uvdma_unbind_shuts_down_a_controller_in_use_and_the_device_goes_back() -> None:
    bdf = controllers()[1][0]
    dev = pci.device(bdf)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(bdf=bdf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        r = subprocess.run(
            [sys.executable, "-m", "uvdma.cli", "unbind", bdf],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert dev.driver == "nvme"  # given back, never left without a driver
        out, _ = holder.communicate(timeout=60)
        assert holder.returncode == 0, out
        assert f"controller {bdf} was released: the kernel asked for the device back" in out
        assert "leaks: []" in out  # it shut down cleanly: every DMA allocation given back
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if dev.driver != "vfio-pci":
            bind_back(bdf)
    with Controller.open(bdf) as c:  # and it can be opened again
        assert c.active_namespaces() == [1]
