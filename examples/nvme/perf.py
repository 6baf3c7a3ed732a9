"""Random or sequential reads or writes at a queue depth; IOPS, MB/s and latency percentiles.

python examples/nvme/perf.py --device 0000:01:00.0 --rw randread --qd 32 --seconds 5 [--json]
python examples/nvme/perf.py --device sim --qd 32 --json      # the software controller

The loop keeps --qd commands in flight: the completions each reap returns are resubmitted in
the same pass, together, with one doorbell write (as Linux's blk-mq rings once per batch:
``bd->last``); --batch N submits N at a time, and --batch 1 one per io() call.  --jobs N
forks N worker processes after bring-up, each with a queue pair and buffers of its own
(uvdma_nvme.jobs).  With --json the report adds mean_qd (the depth achieved: Little's law
over the measured latencies) and, on the software controller, driver_ns_per_io (the driver
and this loop per I/O, the controller's own cost taken out), device_ns_per_io (that cost),
doorbells (SQ doorbell writes) and anchor_ns (a no-op method call pair timed in the same
run).  Progress: one line a second; on a terminal it rewrites itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import sys
import time
from array import array
from typing import Any, TextIO

import numpy as np

from uvdma.dma import DmaBuffer
from uvdma.errors import UvdmaError
from uvdma_nvme import IO_READ, IO_WRITE, Controller, NvmeError
from uvdma_nvme.args import positive_float, positive_int
from uvdma_nvme.bench import SIM_CLOCK, anchor_ns, device_ns, driver_share, open_controller
from uvdma_nvme.jobs import run_jobs
from uvdma_nvme.queue import DONE, INFLIGHT, QueuePair
from uvdma_nvme.sim import SimConfig


class Progress:
    """One line a second: on a terminal it rewrites itself (a carriage return), anywhere
    else (a log, a pipe) each second is a line of its own."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream, self.label = stream, label
        self.tty = stream.isatty()
        self.start = self.last = time.perf_counter()
        self.shown = False

    def due(self, now: float) -> bool:
        """Whether a second has passed since the last line."""
        return now - self.last >= 1.0

    def show(self, now: float, done: int) -> None:
        """Print the rate so far."""
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        text = f"{self.label}: {now - self.start:5.1f} s, {done} I/Os, {rate:9.0f} IOPS"
        if self.tty:
            print(f"\r{text}", end="", file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)
        self.shown = True

    def end(self) -> None:
        """Finish a rewritten line."""
        if self.tty and self.shown:
            print(file=self.stream, flush=True)


def run(
    args: argparse.Namespace,
    ctrl: Controller,
    q: QueuePair,
    ns: Any,
    buffers: list[DmaBuffer],
    sim: Any,
    seed: int,
    first_lba: int,
    span_blocks: int,
    progress: Progress | None,
    counter: memoryview | None = None,
) -> dict[str, Any]:
    """The measured loop on queue ``q``: --qd commands in flight for --seconds or --count;
    the figures of one job."""
    nblocks = args.bs // ns.lba_size
    slots = span_blocks // nblocks  # places an I/O may start at
    rnd = np.random.default_rng(seed)
    if "rand" in args.rw:
        table = (first_lba + rnd.integers(0, slots, 1 << 16) * nblocks).tolist()
    else:
        table = [first_lba + (i % slots) * nblocks for i in range(1 << 16)]
    opcode = IO_READ if "read" in args.rw else IO_WRITE
    what = args.rw
    depth = q.depth
    owner = [0] * depth  # cid -> buffer index
    started = [0] * depth  # cid -> submission time (ns)
    requests = q.requests  # one Request per command identifier, for a timeout
    dma = [b.dma for b in buffers]
    idle = list(range(len(buffers)))
    lat = array("q")
    lat_append = lat.append
    io, io_batch, reap, release_all = q.io, q.io_batch, q.reap, q.release_all
    batch = args.batch
    limit = args.count or (1 << 62)
    seconds_ns = int(args.seconds * 1e9) if not args.count else 1 << 62
    timeout_ns = int(ctrl.command_timeout * 1e9)
    vector = q.vector if q.vector is not None else 0
    wait_irq = ctrl.vfio.wait_irq if (args.interrupts and q.vector is not None) else None
    clock = time.perf_counter_ns
    k = submitted = done = 0
    if sim is not None:
        sim.reset_cost()
    cpu0 = time.thread_time_ns()
    t0 = last_done = clock()
    now = t0
    stopping = False
    while True:
        if not stopping and (now - t0 >= seconds_ns or submitted >= limit):
            stopping = True
        if not stopping and idle:
            if batch == 1 or (not batch and len(idle) == 1):
                while idle and submitted < limit:
                    b = idle.pop()
                    r = io(opcode, ns, table[k & 0xFFFF], nblocks, dma[b], what)
                    k += 1
                    owner[r.cid] = b
                    started[r.cid] = now
                    submitted += 1
            else:
                size = batch or len(idle)  # by default what this pass freed, all at once
                while submitted < limit and (
                    len(idle) >= size or (idle and submitted + len(idle) >= limit)
                ):
                    n = min(len(idle), size, limit - submitted)
                    took = idle[-n:]  # (slices and a comprehension: C loops, not bytecode)
                    del idle[-n:]
                    cmds = [(table[(k + j) & 0xFFFF], nblocks, dma[b]) for j, b in enumerate(took)]
                    k += n
                    for r, b in zip(io_batch(opcode, ns, cmds, what), took, strict=True):
                        cid = r.cid
                        owner[cid] = b
                        started[cid] = now
                    submitted += n
        if submitted == done:
            break
        got = reap()
        now = clock()
        if not got:
            if now - last_done > timeout_ns:
                # nothing for a whole command timeout: the driver's own wait for the oldest
                # command (recovery: abort, then reset; it raises unless the command
                # completes after all, and then it is counted like any other)
                pending = [r for r in requests if r.state == INFLIGHT]
                oldest = min(pending, key=lambda r: started[r.cid])
                q.wait(oldest)
                now = last_done = clock()
                # that wait reaped whatever else had completed meanwhile: collect them all
                got = [r for r in requests if r.state == DONE]
                for r in got:
                    if r.status:
                        q.result(r)
                    lat_append(now - started[r.cid])
                    idle.append(owner[r.cid])
                release_all(got)
                done += len(got)
                continue
            if wait_irq is not None:
                with contextlib.suppress(TimeoutError):
                    wait_irq(vector, 0.1)
                now = clock()
            continue
        last_done = now
        for r in got:
            if r.status:
                q.result(r)  # raises CommandError naming it
            cid = r.cid
            lat_append(now - started[cid])
            idle.append(owner[cid])
        release_all(got)
        done += len(got)
        if progress is not None and progress.due(now / 1e9):
            progress.show(now / 1e9, done)
        if counter is not None:
            counter[0] = done
    elapsed_ns = clock() - t0
    cpu_ns = time.thread_time_ns() - cpu0
    out: dict[str, Any] = {
        "ios": done,
        "seconds": round(elapsed_ns / 1e9, 3),
        "iops": round(done / (elapsed_ns / 1e9), 1) if elapsed_ns else 0.0,
        "mean_qd": round(sum(lat) / elapsed_ns, 2) if elapsed_ns else 0.0,
        "cpu_ns_per_io": round(cpu_ns / done, 1) if done else None,
    }
    if sim is not None:
        out["doorbells"] = sim.sq_doorbell_writes  # SQ tail doorbell writes: batching shows
        dev = device_ns(sim)  # by the controller's clock: wall time
        driver = driver_share(cpu_ns, elapsed_ns, dev)
        out["driver_ns_per_io"] = round(driver / done, 1) if done else None
        out["device_ns_per_io"] = round((cpu_ns - driver) / done, 1) if done else None
    out["_lat_ns"] = lat
    return out


def percentiles(lat_ns: Any) -> dict[str, float]:
    """Latency percentiles and mean, in microseconds."""
    lat = np.frombuffer(lat_ns, dtype=np.int64) / 1000.0 if len(lat_ns) else np.zeros(1)
    return {
        k: round(float(np.percentile(lat, p)), 1)
        for k, p in (("p50", 50), ("p99", 99), ("p999", 99.9))
    } | {"mean": round(float(lat.mean()), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", required=True, metavar="BDF", help="a PCI address, or 'sim' (software)"
    )
    parser.add_argument("--nsid", type=positive_int, default=1)
    parser.add_argument(
        "--rw", choices=["randread", "randwrite", "read", "write"], default="randread"
    )
    parser.add_argument("--bs", type=positive_int, default=4096, help="bytes per I/O")
    parser.add_argument("--qd", type=positive_int, default=1, help="queue depth")
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=0,
        help="submit this many at a time, one doorbell write (default: what each reap freed)",
    )
    parser.add_argument("--jobs", type=positive_int, default=1, help="worker processes")
    parser.add_argument("--seconds", type=positive_float, default=5.0)
    parser.add_argument("--count", type=positive_int, help="stop after this many I/Os instead")
    parser.add_argument(
        "--interrupts", action="store_true", help="sleep on the MSI-X eventfd instead of polling"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.batch > args.qd:
        parser.error(f"--batch {args.batch}: at most --qd ({args.qd})")
    if args.jobs > 64:
        parser.error(f"--jobs {args.jobs}: at most 64")
    stream = sys.stderr if args.json else sys.stdout
    label = f"{args.rw} qd {args.qd}" + (f" x {args.jobs} jobs" if args.jobs > 1 else "")
    try:
        # for --device sim: the controller times itself (its cost is taken out)
        cfg = SimConfig(queues=max(16, args.jobs + 1), mqes=4095, clock=SIM_CLOCK)
        with open_controller(args.device, cfg, interrupts=args.interrupts) as (ctrl, sim):
            ns = ctrl.namespace(args.nsid)
            if args.bs % ns.lba_size or args.bs > ctrl.max_transfer:
                raise NvmeError(
                    f"--bs {args.bs}: give a multiple of the {ns.lba_size}-byte LBA up to the "
                    f"controller's largest transfer ({ctrl.max_transfer} bytes)"
                )
            if args.qd >= ctrl.mqes:
                raise NvmeError(f"--qd {args.qd}: the controller's queues hold {ctrl.mqes - 1}")
            nblocks = args.bs // ns.lba_size
            span = ns.blocks // args.jobs // nblocks * nblocks  # each job its own LBA range
            if span < nblocks:
                raise NvmeError(f"--jobs {args.jobs}: namespace {ns.nsid} is too small")
            queues = ctrl.create_io_queues(args.jobs, depth=args.qd + 1)
            buffers = [[DmaBuffer(ctrl.dma, args.bs) for _ in range(args.qd)] for _ in queues]
            progress = Progress(stream, label)
            anchor = anchor_ns()
            if args.jobs == 1:
                r = run(args, ctrl, queues[0], ns, buffers[0], sim, 1, 0, span, progress)
                jobs = [r]
            else:
                jobs = run_workers(args, ctrl, queues, ns, buffers, sim, span, progress)
            progress.end()
            anchor = min(anchor, anchor_ns())  # before and after: the quieter one
    except (NvmeError, UvdmaError, TimeoutError) as e:
        print(f"perf: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the driver waited for the device before letting this through
        print("perf: interrupted", file=sys.stderr)
        return 130
    failed = [j for j in jobs if "error" in j]
    lat = array("q")
    for j in jobs:
        lat.extend(j.pop("_lat_ns", array("q")))
    ios = sum(j.get("ios", 0) for j in jobs)
    seconds = max((j.get("seconds", 0.0) for j in jobs), default=0.0)
    result: dict[str, Any] = {
        "device": args.device,
        "rw": args.rw,
        "bs": args.bs,
        "qd": args.qd,
        "batch": args.batch,
        "ios": ios,
        "seconds": seconds,
        "iops": round(sum(j.get("iops", 0.0) for j in jobs), 1),
        "mb_s": round(sum(j.get("iops", 0.0) for j in jobs) * args.bs / 1e6, 2),
        "mean_qd": round(sum(j.get("mean_qd", 0.0) for j in jobs), 2),
        "lat_us": percentiles(lat),
        "anchor_ns": round(anchor, 1),
    }
    if all("doorbells" in j for j in jobs):
        result["doorbells"] = sum(j["doorbells"] for j in jobs)
    for key in ("driver_ns_per_io", "device_ns_per_io", "cpu_ns_per_io"):
        vals = [j[key] for j in jobs if j.get(key) is not None]
        if vals:
            result[key] = round(sum(vals) / len(vals), 1)
    if "driver_ns_per_io" in result:
        result["driver_x_anchor"] = round(result["driver_ns_per_io"] / anchor, 2)
    if args.jobs > 1:
        result["jobs"] = jobs
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        lat_us = result["lat_us"]
        print(f"{args.rw} {args.bs} B qd {args.qd}: {result['iops']} IOPS, {result['mb_s']} MB/s")
        print(f"latency: mean {lat_us['mean']} us, p50 {lat_us['p50']} us, p99 {lat_us['p99']} us")
        print(f"mean queue depth achieved: {result['mean_qd']}")
        if "driver_ns_per_io" in result:
            print(
                f"driver + loop: {result['driver_ns_per_io']} ns per I/O "
                f"({result['driver_x_anchor']}x the {result['anchor_ns']} ns anchor); "
                f"the software controller: {result['device_ns_per_io']} ns"
            )
        for j in jobs:
            if "error" in j:
                print(f"job {j['job']}: {j['error']}", file=sys.stderr)
    return 1 if failed else 0


def run_workers(
    args: argparse.Namespace,
    ctrl: Controller,
    queues: list[QueuePair],
    ns: Any,
    buffers: list[list[DmaBuffer]],
    sim: Any,
    span: int,
    progress: Progress,
) -> list[dict[str, Any]]:
    """--jobs N: one worker process per queue, each on its own LBA range; per-job figures
    (the latencies come back through shared memory)."""
    n = len(queues)
    counts = mmap.mmap(-1, 8 * n)  # shared: each worker's I/Os so far, for progress
    words = memoryview(counts).cast("Q")
    cap = 1 << 22  # latencies kept per job (the first 4 Mi): 32 MiB each, shared
    lat_mem = mmap.mmap(-1, 8 * (cap + 1) * n)
    lat_words = memoryview(lat_mem).cast("q")

    def work(i: int, q: QueuePair) -> dict[str, Any]:
        out = run(args, ctrl, q, ns, buffers[i], sim, 1 + i, i * span, span, None, words[i : i + 1])
        lat = out.pop("_lat_ns")
        kept = min(len(lat), cap)
        base = i * (cap + 1)
        lat_words[base] = kept
        lat_words[base + 1 : base + 1 + kept] = memoryview(lat).cast("B").cast("q")[:kept]
        return out

    def tick() -> None:
        progress.show(time.perf_counter(), sum(words))

    jobs = run_jobs(ctrl, queues, work, max_bytes=args.bs, tick=tick)
    out: list[dict[str, Any]] = []
    for j in jobs:
        d: dict[str, Any] = {"job": j.job, "pid": j.pid}
        if j.ok and j.result is not None:
            d |= j.result
            base = j.job * (cap + 1)
            kept = lat_words[base]
            d["_lat_ns"] = array("q", lat_words[base + 1 : base + 1 + kept])
        else:
            d["error"] = j.error or "failed"
        out.append(d)
    return out


if __name__ == "__main__":
    sys.exit(main())
