"""What the driver costs, measured on the software controller (:mod:`uvdma_nvme.sim`).

``python -m uvdma_nvme.bench`` (what ``tools/bench-nvme --sim`` runs) prints CPU time per
I/O, each beside the *anchor*: a no-op Python method call pair timed in the same run, so a
figure reads as a ratio that holds across machines.  Best of three; a benchmark, never a
test.  The rows:

- ``driver_*``, ``io_qd32_4k``, ``batch32_4k``: a minimal caller's loop and the driver on
  the software controller (QD1, QD32, one io() per I/O, batches of 32); the controller's
  own cost (:attr:`NvmeSim.busy_ns`) taken out (:func:`driver_path`).
- ``own_*``: the driver's calls alone (io_batch or io, reap, release_all or complete), each
  timed on its own, the caller's loop and the device left out (:func:`own_path`).
- ``floor_batch32``: the least a batch path can cost in CPython (:func:`floor_path`), to
  compare with ``own_qd32_4k`` (whose passes are batches of 32).
- ``prp_per_page_*``: PRP2 of one transfer (where its pages are, and its list filled), per
  list entry.

perf.py's whole loop is measured by ``perf.py --device sim --json`` (driver_ns_per_io).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from uvdma.dma import DmaBuffer
from uvdma.vfio import open_device
from uvdma_nvme.controller import Controller, Namespace
from uvdma_nvme.prp import plan_prps, prp_list_pages_needed
from uvdma_nvme.queue import _RW_SQE, QueuePair
from uvdma_nvme.sim import BDF, NvmeSim, SimConfig, sim_controller
from uvdma_nvme.spec import IoOpcode

# The software controller's clock when the driver's cost is measured: wall time from the
# vDSO (~50 ns, no system call).  A thread clock would be preemption-proof but is a system
# call, and two per doorbell write (flushing the TLB on kernels with page-table isolation)
# made the driver's own code slower than it is.  Preemption is handled by driver_share().
SIM_CLOCK = time.perf_counter_ns


class _Anchor:
    def noop(self) -> None:
        """Nothing: the anchor's unit of work."""


def anchor_ns(pairs: int = 100_000, rounds: int = 3) -> float:
    """CPU ns of one turn of ``for _ in r: a.noop(); a.noop()`` (a pair of no-op method
    calls and the loop around them), best of ``rounds``."""
    a = _Anchor()
    best = float("inf")
    r = range(pairs)
    for _ in range(rounds):
        t0 = time.thread_time_ns()
        for _i in r:
            a.noop()
            a.noop()
        best = min(best, (time.thread_time_ns() - t0) / pairs)
    return best


@contextlib.contextmanager
def sim_driver(
    config: SimConfig | None = None, **controller: Any
) -> Iterator[tuple[Controller, NvmeSim]]:
    """The driver brought up on a software controller behind the fake kernel (no root, no
    device): ``with sim_driver() as (ctrl, sim): ...``."""
    with (
        tempfile.TemporaryDirectory(prefix="uvdma-sim-") as tmp,
        sim_controller(Path(tmp), config) as (_kernel, sim),
    ):
        ctrl = Controller(open_device(BDF, sysfs=Path(tmp), backend="type1"), **controller)
        try:
            yield ctrl, sim
        finally:
            ctrl.close()


@contextlib.contextmanager
def open_controller(
    device: str, config: SimConfig | None = None, **controller: Any
) -> Iterator[tuple[Controller, NvmeSim | None]]:
    """What the example programs' ``--device`` names: a PCI address (bound to vfio-pci), or
    ``sim`` for the software controller.  Yields (controller, the sim or None)."""
    if device == "sim":
        with sim_driver(config, **controller) as (ctrl, sim):
            yield ctrl, sim
    else:
        with Controller.open(device, **controller) as ctrl:
            yield ctrl, None


def _rig(
    ctrl: Controller, qd: int, bs: int
) -> tuple[Namespace, QueuePair, int, list[DmaBuffer], list[int], list[int]]:
    """What a measurement at depth ``qd`` of ``bs``-byte reads needs: namespace 1, a new
    queue, the blocks per read, ``qd`` buffers and their DMA addresses, 4096 LBAs."""
    ns = ctrl.namespace(1)
    q = ctrl.create_io_queues(1, depth=qd + 1)[0]
    nblocks = bs // ns.lba_size
    bufs = [DmaBuffer(ctrl.dma, bs) for _ in range(qd)]
    lbas = [(i * 7919 * nblocks) % (ns.blocks - nblocks) for i in range(4096)]
    return ns, q, nblocks, bufs, [b.dma for b in bufs], lbas


def driver_path(
    ctrl: Controller, sim: NvmeSim, qd: int, bs: int, ios: int, batch: int = 0
) -> float:
    """ns per I/O of the driver's own path at queue depth ``qd`` (reads of ``bs`` bytes at
    LBAs from a precomputed list, on a new queue): submit, reap, collect, resubmit; the
    controller's own cost taken out (:func:`driver_share`).  ``batch`` 0: perf.py's
    default, what each reap returned given back at once (:meth:`QueuePair.release_all`)
    and resubmitted with one doorbell write (:meth:`QueuePair.io_batch`; one at a time
    with :meth:`QueuePair.io` when a reap returned one); ``batch`` N: N at a time;
    ``batch`` -1: one :meth:`QueuePair.io` and one :meth:`QueuePair.complete` per I/O."""
    ns, q, nblocks, bufs, dma, lbas = _rig(ctrl, qd, bs)
    read = IoOpcode.READ
    owner = [0] * qd  # cid -> buffer
    try:
        sim.reset_cost()
        done = k = 0
        cpu0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        if batch >= 0 and qd > 1:
            io_batch, reap, release_all = q.io_batch, q.reap, q.release_all
            free = list(range(qd))
            while done < ios:
                size = batch or len(free)
                while free and len(free) >= size:
                    took = [free.pop() for _ in range(size)]
                    cmds = []
                    for b in took:
                        cmds.append((lbas[k & 4095], nblocks, dma[b]))
                        k += 1
                    for r, b in zip(io_batch(read, ns, cmds, "read"), took, strict=True):
                        owner[r.cid] = b
                got = reap()
                for r in got:
                    if r.status:
                        q.result(r)  # raises, naming it
                    free.append(owner[r.cid])
                release_all(got)
                done += len(got)
        else:
            io, reap, complete = q.io, q.reap, q.complete
            for b in range(qd):
                owner[io(read, ns, lbas[k & 4095], nblocks, dma[b], "read").cid] = b
                k += 1
            while done < ios:
                for r in reap():
                    b = owner[r.cid]
                    complete(r)
                    done += 1
                    owner[io(read, ns, lbas[k & 4095], nblocks, dma[b], "read").cid] = b
                    k += 1
        cpu, wall = time.thread_time_ns() - cpu0, time.perf_counter_ns() - t0
        driver = driver_share(cpu, wall, device_ns(sim))
        while q.outstanding:
            q.release_all(q.reap())
        return driver / done
    finally:
        for buf in bufs:
            buf.free()


def _clock_pair_ns(rounds: int = 5, n: int = 20_000) -> float:
    """The cost of one ``t0 = perf_counter_ns(); ...; perf_counter_ns() - t0`` around
    nothing, best of ``rounds`` (what :func:`own_path` takes out of each timed call)."""
    clock = time.perf_counter_ns
    best = float("inf")
    for _ in range(rounds):
        spent = 0
        for _i in range(n):
            t0 = clock()
            spent += clock() - t0
        best = min(best, spent / n)
    return best


def own_path(ctrl: Controller, qd: int, bs: int, ios: int, batch: int = 0) -> float:
    """ns per I/O of the driver's calls alone at queue depth ``qd``: :meth:`QueuePair.io_batch`,
    :meth:`QueuePair.reap` and :meth:`QueuePair.release_all` (``batch`` 0: what each reap
    returned, resubmitted at once; N: N at a time), or with ``batch`` -1
    :meth:`QueuePair.io`, :meth:`QueuePair.reap` and :meth:`QueuePair.complete` per I/O,
    each call timed on its own.  What is not timed: the caller's loop (its command list
    and which buffer each request used: what :func:`driver_path` and perf.py add) and the
    device, played here: the queue's doorbells are plain memory, as a real BAR's are to
    the CPU, and this function posts each command's completion entry itself (the software
    controller never sees these commands).  The cost of the clock reads is taken out."""
    if batch > qd:
        raise ValueError(f"own_path: a batch of {batch} cannot fill at depth {qd}")
    ns, q, nblocks, bufs, dma, lbas = _rig(ctrl, qd, bs)
    # The device's side, done here and outside the timing: doorbell stores land in plain
    # memory (the software controller is cut off from this queue, which is never used again)
    q._sq_doorbell = ctypes.c_uint32()
    q._cq_doorbell = ctypes.c_uint32()
    cqe, depth = q._cqe, q.depth
    read = IoOpcode.READ
    owner = [0] * qd  # cid -> buffer
    clock = time.perf_counter_ns
    pair = _clock_pair_ns()
    head, phase = 0, 1  # the device's completion queue tail and phase
    timed = spent = done = k = 0
    try:
        free = list(range(qd))
        while done < ios:
            if batch >= 0:
                size = batch or len(free)
                sent: list[Any] = []
                while free and len(free) >= size:
                    took = [free.pop() for _ in range(size)]
                    cmds = [(lbas[(k + j) & 4095], nblocks, dma[b]) for j, b in enumerate(took)]
                    k += size
                    t0 = clock()
                    reqs = q.io_batch(read, ns, cmds, "read")
                    spent += clock() - t0
                    timed += 1
                    for r, b in zip(reqs, took, strict=True):
                        owner[r.cid] = b
                    sent += reqs
            else:
                sent = []
                while free:
                    b = free.pop()
                    lba, d = lbas[k & 4095], dma[b]
                    k += 1
                    t0 = clock()
                    r = q.io(read, ns, lba, nblocks, d, "read")
                    spent += clock() - t0
                    timed += 1
                    owner[r.cid] = b
                    sent.append(r)
            for r in sent:  # the device completes them all, in order, with success
                cqe[(head << 2) + 3] = (phase << 16) | r.cid
                head += 1
                if head == depth:
                    head, phase = 0, phase ^ 1
            t0 = clock()
            got = q.reap()
            spent += clock() - t0
            timed += 1
            for r in got:
                free.append(owner[r.cid])
            if batch >= 0:
                t0 = clock()
                q.release_all(got)
                spent += clock() - t0
                timed += 1
            else:
                for r in got:
                    t0 = clock()
                    q.complete(r)
                    spent += clock() - t0
                    timed += 1
            done += len(got)
        return (spent - timed * pair) / done
    finally:
        for buf in bufs:
            buf.free()


def driver_share(cpu_ns: float, wall_ns: float, device_wall_ns: float) -> float:
    """The driver's CPU time in a run that took ``cpu_ns`` of this thread's CPU over
    ``wall_ns``, of which the software controller's code took ``device_wall_ns`` by its
    (wall) clock.  Time the thread was preempted inflates wall intervals wherever it falls:
    taken as spread evenly, the controller's CPU share is ``device_wall * cpu / wall``."""
    if wall_ns <= 0:
        return 0.0
    return cpu_ns - device_wall_ns * min(cpu_ns / wall_ns, 1.0)


def device_ns(sim: NvmeSim, dispatch_ns: float | None = None) -> float:
    """The controller's own CPU time since its last reset_cost(): its code
    (:attr:`NvmeSim.busy_ns`) and the calls that carry each doorbell write to it."""
    if dispatch_ns is None:
        dispatch_ns = sim.doorbell_dispatch_ns()
    return sim.busy_ns + (sim.sq_doorbell_writes + sim.cq_doorbell_writes) * dispatch_ns


def prp_ns_per_page(ctrl: Controller, bs: int, rounds: int = 2000) -> float:
    """CPU ns per list entry of what the driver does for PRP2 of a ``bs``-byte,
    page-aligned transfer (:meth:`QueuePair._prp2`: where the pages are, and the list
    filled; the request's list page already held, as after its first use)."""
    q = ctrl.io_queues[0] if ctrl.io_queues else ctrl.create_io_queues(1, depth=8)[0]
    req = q._requests[0]
    dma = 0x10_0000_0000
    plan = plan_prps(dma, bs)
    q._prp_lists(req, prp_list_pages_needed(plan.pages))
    prp2 = q._prp2
    t0 = time.thread_time_ns()
    for _ in range(rounds):
        prp2(req, dma, bs)
    return (time.thread_time_ns() - t0) / rounds / plan.pages


class _FloorRequest:
    __slots__ = ("cid", "state", "status", "tag")

    def __init__(self, cid: int) -> None:
        self.cid, self.tag, self.state, self.status = cid, cid << 16, 0, 0


def floor_path(ios: int, qd: int = 32) -> float:
    """ns per I/O of the least a batch path can do in CPython, as a yardstick for the
    driver's (not a driver: no device, no recovery, no error messages): per command the
    checks the driver makes (integers, LBA range, MDTS, the remembered mapped range), a
    slot from a free list, one 64-byte ``pack_into`` into a queue in memory; one lock and
    one doorbell store per batch; a reap of ``qd`` phase-tagged entries (written here for
    it, outside the timing) and their release under one lock each.  The caller's list of
    commands is made outside the timing, as in :func:`own_path`: what is left between this
    and :func:`own_path` with ``batch=qd`` is what the driver adds: its request
    bookkeeping, the blocked-queue flag, PRP lists, and the full checks' fallback."""
    depth, blocks, lba_size, mdts, nsid = qd + 1, 1 << 20, 512, 1 << 20, 1
    lo, end = 0x100_0000, 0x200_0000
    sq = memoryview(bytearray(64 * depth))
    cq = memoryview(bytearray(16 * depth)).cast("I")
    bells = (ctypes.c_uint32 * 2)()
    sq_bell = ctypes.c_uint32.from_buffer(bells, 0)
    cq_bell = ctypes.c_uint32.from_buffer(bells, 4)
    reqs = [_FloorRequest(c) for c in range(qd)]
    free = list(range(qd - 1, -1, -1))
    lock = threading.Lock()
    pack = _RW_SQE.pack_into
    lbas = [(i * 7919 * 8) % (blocks - 8) for i in range(4096)]
    dmas = [lo + i * 4096 for i in range(qd)]
    clock = time.perf_counter_ns  # as own_path times: the clock pairs' cost taken out
    pair = _clock_pair_ns()
    tail = head = k = spent = done = timed = 0
    phase = 1
    while done < ios:
        cmds = [(lbas[(k + i) & 4095], 8, dmas[i]) for i in range(qd)]  # the caller's
        k += qd
        t0 = clock()
        out: list[_FloorRequest] = []
        take = out.append
        with lock:
            pop = free.pop
            for lba, nb, dma in cmds:
                if (
                    lba.__class__ is not int
                    or nb.__class__ is not int
                    or dma.__class__ is not int
                    or nb < 1
                    or lba < 0
                    or lba + nb > blocks
                ):
                    raise ValueError(lba)
                length = nb * lba_size
                if length > mdts or dma < lo or dma + length > end:
                    raise ValueError(dma)
                req = reqs[pop()]
                take(req)
                pack(sq, tail << 6, 2 | req.tag, nsid, dma, 0, lba, nb - 1)
                tail += 1
                if tail == depth:
                    tail = 0
            for r in out:
                r.state = 1
            sq_bell.value = tail
        spent += clock() - t0
        timed += 1
        h, p = head, phase  # the "device" completes them all, outside the timing
        for r in out:
            cq[(h << 2) + 3] = (p << 16) | r.cid
            h += 1
            if h == depth:
                h, p = 0, p ^ 1
        t0 = clock()
        with lock:
            want = phase << 16
            dw3 = cq[(head << 2) + 3]
            got: list[_FloorRequest] = []
            add = got.append
            while dw3 & 0x10000 == want:
                req = reqs[dw3 & 0xFFFF]
                if req.state == 1:
                    req.status = dw3 >> 17
                    req.state = 2
                    add(req)
                head += 1
                if head == depth:
                    head, phase, want = 0, phase ^ 1, want ^ 0x10000
                dw3 = cq[(head << 2) + 3]
            cq_bell.value = head
        with lock:
            for r in got:
                if r.state < 2:
                    raise ValueError(r.cid)
            for r in got:
                r.state = 0
                free.append(r.cid)
        spent += clock() - t0
        timed += 1
        done += len(got)
    return (spent - timed * pair) / done


def measure(ios: int = 100_000, runs: int = 3) -> dict[str, Any]:
    """Every figure, best of ``runs``, with the anchor (best of all its runs).  The rows
    take turns within each run, so that a busy spell of the machine falls on all of them
    rather than on every run of one."""
    anchors: list[float] = []
    # 1 MiB transfers, for PRP figures; a new queue per measurement of six rows
    cfg = SimConfig(mdts=8, queues=max(64, 6 * runs + 1), clock=SIM_CLOCK)
    with sim_driver(cfg) as (ctrl, sim):
        figures: dict[str, Callable[[], float]] = {
            f"driver_qd{qd}_4k": functools.partial(driver_path, ctrl, sim, qd, 4096, ios)
            for qd in (1, 32)
        }
        # QD32 with one io() and one complete() per I/O (no batching at all)
        figures["io_qd32_4k"] = functools.partial(driver_path, ctrl, sim, 32, 4096, ios, -1)
        figures["batch32_4k"] = functools.partial(driver_path, ctrl, sim, 32, 4096, ios, 32)
        figures["floor_batch32"] = functools.partial(floor_path, ios)
        # (the played device completes every command before the next reap, so each pass
        # resubmits 32 at once: this is also the figure of a batch of 32)
        figures["own_qd32_4k"] = functools.partial(own_path, ctrl, 32, 4096, ios)
        figures["own_io_qd32_4k"] = functools.partial(own_path, ctrl, 32, 4096, ios, -1)
        for bs in (65536, 131072, 262144, 1 << 20):
            figures[f"prp_per_page_{bs // 1024}k"] = functools.partial(prp_ns_per_page, ctrl, bs)
        rows = {name: float("inf") for name in figures}
        for _ in range(runs):
            for name, fn in figures.items():
                anchors.append(anchor_ns())
                rows[name] = min(rows[name], fn())
    anchor = min(anchors)
    return {"anchor_ns": round(anchor, 1)} | {
        k: {"ns": round(v, 1), "x_anchor": round(v / anchor, 2)} for k, v in rows.items()
    }


PERF = Path(__file__).resolve().parents[1] / "perf.py"
#: Each run makes a queue per row on the software controller, with its memory: a bound.
MAX_RUNS = 100


def perf_table(
    qds: tuple[int, ...] = (1, 32, 128),
    sizes: tuple[int, ...] = (4096, 65536, 131072),
    count: int = 50_000,
    runs: int = 3,
    batch: int = 0,
) -> list[dict[str, Any]]:
    """perf.py --device sim --json per queue depth and transfer size: its whole loop's
    driver_ns_per_io, the best of ``runs`` beside the best anchor of the same runs (the
    ratio of one run to its own anchor would favour a run whose anchor a busy moment
    inflated)."""
    rows = []
    for bs in sizes:
        for qd in qds:
            got = []
            for _ in range(runs):
                cmd = [sys.executable, str(PERF), "--device", "sim", "--qd", str(qd)]
                cmd += ["--bs", str(bs), "--count", str(count), "--json"]
                if batch:
                    cmd += ["--batch", str(min(batch, qd))]
                got.append(json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout))
            driver = min(r["driver_ns_per_io"] for r in got)
            anchor = min(r["anchor_ns"] for r in got)
            rows.append(
                {
                    "bs": bs,
                    "qd": qd,
                    "batch": got[0]["batch"],
                    "driver_ns_per_io": driver,
                    "anchor_ns": anchor,
                    "driver_x_anchor": round(driver / anchor, 2),
                    "device_ns_per_io": min(r["device_ns_per_io"] for r in got),
                    "mean_qd": min(r["mean_qd"] for r in got),
                }
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ios", type=int, default=100_000, help="I/Os per measurement")
    parser.add_argument("--runs", type=int, default=3, help="best of this many")
    parser.add_argument(
        "--perf-table", action="store_true", help="also perf.py's loop by queue depth and size"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.ios < 1 or not 1 <= args.runs <= MAX_RUNS:
        parser.error(f"--ios must be at least 1 and --runs 1..{MAX_RUNS}")
    out = measure(args.ios, args.runs)
    if args.perf_table:
        out["perf"] = perf_table(runs=args.runs) + perf_table(
            qds=(32, 128), sizes=(4096,), runs=args.runs, batch=32
        )
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"anchor (no-op method call pair, in a loop): {out['anchor_ns']} ns")
    for k, v in out.items():
        if isinstance(v, dict):
            print(f"{k:>20}: {v['ns']:8.1f} ns  {v['x_anchor']:6.2f}x anchor")
    if args.perf_table:
        print()
        print("| transfer | QD | batch | driver + loop ns/IO | x anchor | device ns/IO | mean QD |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in out["perf"]:
            print(
                f"| {r['bs'] // 1024} KiB | {r['qd']} | {r['batch'] or '-'} | "
                f"{r['driver_ns_per_io']:.0f} | {r['driver_x_anchor']:.1f} | "
                f"{r['device_ns_per_io']:.0f} | {r['mean_qd']:.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
