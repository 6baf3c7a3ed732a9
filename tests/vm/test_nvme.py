"""The NVMe driver of examples/nvme on QEMU's emulated NVMe, in the guest.

Proves: bring-up, admin commands, I/O of every PRP shape and past MDTS, many commands
outstanding, several queues, masks of 24/32/64 bits, MSI-X completions, data shared with
the kernel's own nvme driver both ways, the IOMMU stopping a stray DMA, and the bad input
a user meets, each leaving the controller usable and no DMA memory leaked.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.vm import bind_back
from uvdma import pci
from uvdma.dma import DmaBuffer
from uvdma_nvme import IO_READ, IO_WRITE, CommandTimeoutError, Controller, NvmeError, pattern
from uvdma_nvme.jobs import run_jobs
from uvdma_nvme.queue import QueuePair

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]


def bdf(i: int = 0) -> str:
    return str(pci.nvme_controllers()[i].address)


@pytest.fixture
def ctrl() -> Iterator[Controller]:
    c = Controller.open(bdf())
    yield c
    c.close()
    assert c.leaks == [], c.leaks  # the DMA-API check at close finds nothing


def test_bring_up_and_admin_commands(ctrl: Controller) -> None:
    assert ctrl.model == "QEMU NVMe Ctrl" and ctrl.serial == "uvdma0000"
    assert ctrl.mqes == 2048
    assert ctrl.max_transfer == 512 * 1024  # MDTS 7 with 4 KiB pages
    assert ctrl.active_namespaces() == [1]
    ns = ctrl.namespace(1)
    assert ns.size == 64 << 20 and ns.lba_size == 512
    assert ctrl.version[:2] == (1, 4)  # VS
    smart = ctrl.smart()
    assert 250 < smart.COMPOSITE_TEMPERATURE < 400 and smart.AVAILABLE_SPARE <= 100
    assert ctrl.health()["temperature_k"] == smart.COMPOSITE_TEMPERATURE
    assert all(e.ERROR_COUNT for e in ctrl.error_log())
    ident = ctrl.identify
    assert ident.VID == 0x1B36 and ident.MDTS == 7 and ident.NN >= 1  # QEMU's
    ins = ctrl.identify_namespace(1)
    assert ins.NSZE == ins.NCAP == (64 << 20) // 512 and ins.lba_format.LBADS == 9
    with pytest.raises(NvmeError, match=r"namespace 7 does not exist; active: \[1\]"):
        ctrl.namespace(7)
    assert ctrl.bar.read32(0x1C) & 1  # still ready


@pytest.mark.parametrize(
    ("blocks", "shape"),
    [(1, "PRP1"), (16, "PRP1+PRP2"), (200, "PRP list"), (3000, "split at MDTS")],
)
def test_write_read_verify_every_prp_shape(ctrl: Controller, blocks: int, shape: str) -> None:
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1)[0]
    lba = 1000
    data = pattern(ns.lba_size, lba, blocks)
    q.write(ns, lba, data)
    q.flush(ns)
    back = np.zeros_like(data)
    q.read(ns, lba, back)
    assert np.array_equal(back, data), shape
    assert q.outstanding == 0  # every request collected; their PRP pages stay for reuse


def test_dma_buffers_and_in_place_numpy_memory(ctrl: Controller) -> None:
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1)[0]
    with DmaBuffer(ctrl.dma, 64 * 1024) as buf:
        buf.array()[:] = pattern(ns.lba_size, 5, 128)
        q.write(ns, 5, buf)
    with mmap.mmap(-1, 64 * 1024) as m:
        arr = np.frombuffer(m, dtype=np.uint8)  # page-aligned: mapped in place, not bounced
        q.read(ns, 5, arr)
        assert np.array_equal(arr, pattern(ns.lba_size, 5, 128))
        del arr


def test_many_commands_outstanding_on_several_queues(ctrl: Controller) -> None:
    ns = ctrl.namespace(1)
    queues = ctrl.create_io_queues(4, depth=64)
    assert len(queues) == 4 and [q.qid for q in queues] == [1, 2, 3, 4]
    bufs = [DmaBuffer(ctrl.dma, 4096) for _ in range(4 * 32)]
    cmds = []
    for i, buf in enumerate(bufs):
        q = queues[i % 4]
        buf.array()[:] = pattern(ns.lba_size, 8 * i, 8)
        cmds.append((q, q.io(0x01, ns, 8 * i, 8, buf.dma, "write")))
    assert max(q.outstanding for q in queues) == 32
    for q, c in cmds:
        q.complete(c)
    back = DmaBuffer(ctrl.dma, 4096 * 128)
    queues[0].read(ns, 0, back)
    assert np.array_equal(
        back.array(), np.concatenate([pattern(ns.lba_size, 8 * i, 8) for i in range(128)])
    )
    back.free()
    for b in bufs:
        b.free()


def test_a_batch_of_writes_with_prp_lists_lands_whole(ctrl: Controller) -> None:
    """io_batch (perf.py's default shape: one doorbell write for many commands) on QEMU's
    controller: 31 writes of 16 KiB, each with a PRP list, in one call; what reads back
    is what was written."""
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=32)[0]
    per = 16384 // ns.lba_size
    bufs = [DmaBuffer(ctrl.dma, 16384) for _ in range(31)]
    try:
        for i, buf in enumerate(bufs):
            buf.array()[:] = pattern(ns.lba_size, 1000 + per * i, per)
        reqs = q.io_batch(
            IO_WRITE, ns, [(1000 + per * i, per, b.dma) for i, b in enumerate(bufs)], "write"
        )
        assert len(reqs) == 31 and q.outstanding == 31
        done: list[Any] = []
        deadline = time.monotonic() + 60
        while len(done) < 31 and time.monotonic() < deadline:
            done += q.reap()
        assert sorted(r.cid for r in done) == sorted(r.cid for r in reqs)
        assert all(q.result(r) == 0 for r in done)
        q.release_all(done)
        back = DmaBuffer(ctrl.dma, 16384 * 31)
        q.read(ns, 1000, back)
        want = np.concatenate([pattern(ns.lba_size, 1000 + per * i, per) for i in range(31)])
        assert np.array_equal(back.array(), want)
        back.free()
    finally:
        for b in bufs:
            b.free()


@pytest.mark.parametrize("bits", [24, 32, 64])
def test_queue_and_data_memory_honour_the_dma_mask(bits: int) -> None:
    with Controller.open(bdf(), dma_bits=bits) as c:
        mask = (1 << bits) - 1
        ns = c.namespace(1)
        q = c.create_io_queues(1, depth=64)[0]
        for qp in (c.admin, q):
            for r in (qp.sq, qp.cq):
                assert r.dma_addr + r.size - 1 <= mask
        data = pattern(ns.lba_size, 77, 64)
        q.write(ns, 77, data)
        back = np.zeros_like(data)
        q.read(ns, 77, back)
        assert np.array_equal(back, data)
    assert c.leaks == []


def test_completions_arrive_through_the_msix_eventfd() -> None:
    with Controller.open(bdf(), interrupts=True) as c:
        assert c.vfio.enabled_vectors() > 1
        ns = c.namespace(1)
        q = c.create_io_queues(1)[0]
        assert q.vector == 1
        with DmaBuffer(c.dma, 4096) as buf:
            cmd = q.io(IO_READ, ns, 0, 8, buf.dma, "read")
            assert c.vfio.wait_irq(q.vector, 10.0) >= 1  # the interrupt, before any polling
            q.complete(cmd)
            q.read(ns, 0, buf)  # wait() sleeps on the eventfd between reaps


def block_device(address: str) -> Path:
    """/dev/nvmeXn1 of a controller the kernel's nvme driver owns."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for ctl in (Path("/sys/bus/pci/devices") / address / "nvme").glob("nvme*"):
            for n in ctl.glob(f"{ctl.name}n*"):
                dev = Path("/dev") / n.name
                if dev.exists():
                    return dev
        time.sleep(0.2)
    raise AssertionError(f"no block device for {address}")


def test_data_is_shared_with_the_kernel_driver_both_ways() -> None:
    address = bdf(1)
    lba, blocks = 4096, 64
    ours = pattern(512, lba, blocks, seed=0xC0FFEE)
    with Controller.open(address) as c:  # uvdma writes ...
        q = c.create_io_queues(1)[0]
        q.write(c.namespace(1), lba, ours)
        q.flush(c.namespace(1))
    pci.unbind(address)  # ... the kernel's nvme driver reads
    try:
        dev = block_device(address)
        fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, blocks * 512)
            assert os.preadv(fd, [buf], lba * 512) == blocks * 512
            assert bytes(buf) == ours.tobytes()
            theirs = pattern(512, lba, blocks, seed=0xBEEF)  # the kernel writes ...
            buf[:] = theirs.tobytes()
            assert os.pwritev(fd, [buf], lba * 512) == blocks * 512
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        bind_back(address)
    with Controller.open(address) as c:  # ... and uvdma reads it
        q = c.create_io_queues(1)[0]
        back = np.zeros(blocks * 512, dtype=np.uint8)
        q.read(c.namespace(1), lba, back)
        assert np.array_equal(back, theirs)


def test_the_iommu_stops_a_read_into_an_unmapped_iova(ctrl: Controller) -> None:
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1)[0]
    with DmaBuffer(ctrl.dma, 8192) as canary:
        canary.array()[:] = 0x5A
        stray = canary.dma + (1 << 30)  # nothing is mapped there
        assert ctrl.vfio.domain.translate(stray) is None
        # the driver refuses to send the device there ...
        with pytest.raises(NvmeError, match="is not mapped in the device's IOMMU domain"):
            q.io(IO_READ, ns, 0, 8, stray, "read")
        # ... and when a command does point there (submitted raw), the IOMMU blocks the DMA:
        assert ctrl.iommu_faults() == []
        q.complete(
            q.submit(IO_READ, ns.nsid, stray, 0, (0, 0, 7), "raw read into an unmapped IOVA")
        )
        faults = ctrl.iommu_faults(wait=10)  # QEMU 7.2 completes it with success; the log says why
        assert faults and all(f.iova >> 12 == stray >> 12 and f.kind == "Write" for f in faults)
        assert "Write access is not set" in faults[0].reason
        assert bool(np.all(canary.array() == 0x5A))  # memory outside the mapping untouched
    # and the controller goes on working
    data = pattern(ns.lba_size, 9, 8)
    q.write(ns, 9, data)
    back = np.zeros_like(data)
    q.read(ns, 9, back)
    assert np.array_equal(back, data)


def test_bad_input_gets_clear_errors_and_leaves_the_controller_usable(ctrl: Controller) -> None:
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1)[0]
    with pytest.raises(NvmeError, match=r"outside namespace 1 \(0\.\.131071\)"):
        q.read(ns, ns.blocks - 4, np.zeros(8 * 512, dtype=np.uint8))
    with pytest.raises(NvmeError, match="multiple of the 512-byte LBA"):
        q.read(ns, 0, np.zeros(100, dtype=np.uint8))
    with (
        DmaBuffer(ctrl.dma, 1 << 20) as big,
        pytest.raises(NvmeError, match="exceed the controller's MDTS"),
    ):
        q.io(IO_READ, ns, 0, 2048, big.dma, "read")
    odd = np.zeros(4096 + 3, dtype=np.uint8)[3:]  # misaligned: bounced, so it still works
    q.read(ns, 0, odd)
    # a command whose doorbell never reaches the controller never completes: it is
    # aborted (QEMU answers "not aborted"), then the controller is reset
    real_doorbell = q._sq_doorbell
    q._sq_doorbell = ctypes.c_uint32()  # doorbell writes land nowhere
    with DmaBuffer(ctrl.dma, 4096) as buf:
        cmd = q.io(IO_READ, ns, 0, 8, buf.dma, "a lost read")
        with pytest.raises(
            CommandTimeoutError,
            match=r"a lost read \(cid \d+\) on queue 1: no completion within 0\.3 s; the abort "
            r"did not complete it, so controller .* was reset",
        ) as e:
            q.complete(cmd, timeout=0.3)
        assert e.value.reset and not e.value.aborted
    q._sq_doorbell = real_doorbell
    assert len(ctrl.resets) == 1 and q.outstanding == 0
    data = pattern(ns.lba_size, 40, 8)  # the same queue works after the reset
    q.write(ns, 40, data)
    back = np.zeros_like(data)
    q.read(ns, 40, back)
    assert np.array_equal(back, data)


def test_the_programs_run(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args in (
        ["identify.py", "--device", bdf()],
        ["rw.py", "--device", bdf(), "--lba", "100", "--blocks", "1024", "--mask-bits", "32"],
        ["perf.py", "--device", bdf(), "--qd", "4", "--count", "200", "--json"],
        ["perf.py", "--device", bdf(), "--qd", "2", "--count", "50", "--interrupts"],
    ):
        r = subprocess.run(
            [sys.executable, str(ROOT / "examples/nvme" / args[0]), *args[1:]],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert r.returncode == 0, r.stdout + r.stderr
    assert (
        "verified: 1024 LBAs"
        in subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples/nvme/rw.py"),
                "--device",
                bdf(),
                "--blocks",
                "1024",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        ).stdout
    )
    bad = subprocess.run(
        [sys.executable, str(ROOT / "examples/nvme/rw.py"), "--device", bdf(), "--nsid", "9"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert bad.returncode == 1 and "namespace 9 does not exist" in bad.stderr


# -- more than one core: worker processes forked after bring-up (issue 10 item 4) ---------
def test_what_worker_processes_write_reads_back(ctrl: Controller) -> None:
    ns = ctrl.namespace(1)
    queues = ctrl.create_io_queues(4, depth=16)
    mine, theirs = queues[-1], queues[:-1]
    blocks = 2048  # 1 MiB each: split at MDTS, PRP lists
    bufs = [DmaBuffer(ctrl.dma, blocks * ns.lba_size) for _ in theirs]

    def work(i: int, q: QueuePair) -> dict[str, Any]:
        first = 40_000 + i * blocks
        data = pattern(ns.lba_size, first, blocks, seed=i)
        view = np.frombuffer(bufs[i].cpu, dtype=np.uint8)
        view[:] = data
        q.write(ns, first, bufs[i])
        view[:] = 0
        q.read(ns, first, bufs[i])
        return {"pid": os.getpid(), "same": bool(np.array_equal(view, data))}

    jobs = run_jobs(ctrl, theirs, work, max_bytes=ctrl.max_transfer)
    assert [j.ok for j in jobs] == [True] * 3, [j.error for j in jobs]
    assert all(j.result is not None and j.result["same"] for j in jobs)
    assert len({j.pid for j in jobs} | {os.getpid()}) == 4  # three other processes
    for i in range(3):  # on the medium: the parent reads each range back itself
        first = 40_000 + i * blocks
        back = np.zeros(blocks * ns.lba_size, dtype=np.uint8)
        mine.read(ns, first, back)
        assert np.array_equal(back, pattern(ns.lba_size, first, blocks, seed=i))
    for b in bufs:
        b.free()


def test_a_worker_killed_mid_io_takes_neither_the_others_nor_the_controller_down(
    ctrl: Controller,
) -> None:
    ns = ctrl.namespace(1)
    queues = ctrl.create_io_queues(3, depth=16)
    bufs = [DmaBuffer(ctrl.dma, 8 * 65536) for _ in queues]

    def work(i: int, q: QueuePair) -> dict[str, Any]:
        first = 60_000 + i * 10_000
        data = pattern(ns.lba_size, first, 1024, seed=7 + i)
        np.frombuffer(bufs[i].cpu, dtype=np.uint8)[:] = data
        for rnd in range(20):  # heavy writes: 8 x 64 KiB in flight at a time
            reqs = [
                q.io(IO_WRITE, ns, first + 128 * k, 128, bufs[i].dma + 65536 * k, "w")
                for k in range(8)
            ]
            if i == 1 and rnd == 5:
                os.kill(os.getpid(), signal.SIGKILL)  # with eight writes in flight
            for r in reqs:
                q.complete(r)
        return {"rounds": 20}

    try:
        jobs = run_jobs(ctrl, queues, work, max_bytes=65536)
        assert [j.ok for j in jobs] == [True, False, True], [j.error for j in jobs]
        assert jobs[1].signal == signal.SIGKILL
        # the controller is fine: admin commands, a new queue, what the survivors wrote
        assert ctrl.identify_controller().MN.startswith(b"QEMU")
        q = ctrl.create_io_queues(1)[0]
        for i in (0, 2):
            first = 60_000 + i * 10_000
            back = np.zeros(1024 * ns.lba_size, dtype=np.uint8)
            q.read(ns, first, back)
            assert np.array_equal(back, pattern(ns.lba_size, first, 1024, seed=7 + i))
        assert ctrl.resets == []
    finally:
        for b in bufs:
            b.free()


def test_the_programs_run_with_jobs() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args, expect in (
        (
            ["rw.py", "--device", bdf(), "--lba", "100000", "--blocks", "512", "--jobs", "3"],
            "verified: 3 jobs x 512 LBAs",
        ),
        (
            ["perf.py", "--device", bdf(), "--qd", "8", "--count", "2000", "--jobs", "2", "--json"],
            '"jobs"',
        ),
        (
            [
                "perf.py",
                "--device",
                bdf(),
                "--qd",
                "16",
                "--batch",
                "8",
                "--count",
                "2000",
                "--json",
            ],
            '"mean_qd"',
        ),
    ):
        r = subprocess.run(
            [sys.executable, str(ROOT / "examples/nvme" / args[0]), *args[1:]],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert r.returncode == 0 and expect in r.stdout, r.stdout + r.stderr
