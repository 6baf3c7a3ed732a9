"""Random or sequential reads or writes at a queue depth; IOPS, MB/s and latency percentiles.

python examples/nvme/perf.py --device 0000:01:00.0 --rw randread --qd 32 --seconds 5 [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from typing import Any

import numpy as np

from uvdma.dma import DmaBuffer
from uvdma.errors import UvdmaError
from uvdma_nvme import IO_READ, IO_WRITE, Controller, NvmeError
from uvdma_nvme.args import positive_float, positive_int


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True, metavar="BDF")
    parser.add_argument("--nsid", type=positive_int, default=1)
    parser.add_argument(
        "--rw", choices=["randread", "randwrite", "read", "write"], default="randread"
    )
    parser.add_argument("--bs", type=positive_int, default=4096, help="bytes per I/O")
    parser.add_argument("--qd", type=positive_int, default=1, help="queue depth")
    parser.add_argument("--seconds", type=positive_float, default=5.0)
    parser.add_argument("--count", type=positive_int, help="stop after this many I/Os instead")
    parser.add_argument(
        "--interrupts", action="store_true", help="sleep on the MSI-X eventfd instead of polling"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        with Controller.open(args.device, interrupts=args.interrupts) as ctrl:
            ns = ctrl.namespace(args.nsid)
            if args.bs % ns.lba_size or args.bs > ctrl.max_transfer:
                raise NvmeError(
                    f"--bs {args.bs}: give a multiple of the {ns.lba_size}-byte LBA up to the "
                    f"controller's largest transfer ({ctrl.max_transfer} bytes)"
                )
            if args.qd >= ctrl.mqes:
                raise NvmeError(f"--qd {args.qd}: the controller's queues hold {ctrl.mqes - 1}")
            q = ctrl.create_io_queues(1, depth=max(args.qd + 1, 2))[0]
            nblocks = args.bs // ns.lba_size
            span = ns.blocks - nblocks
            opcode = IO_READ if "read" in args.rw else IO_WRITE
            rnd = random.Random(1)
            buffers = [DmaBuffer(ctrl.dma, args.bs) for _ in range(args.qd)]
            idle = list(buffers)  # buffers not under an I/O
            next_lba = 0
            latencies: list[float] = []
            inflight: dict[Any, tuple[DmaBuffer, float]] = {}  # command -> (buffer, start)
            start = last_report = time.perf_counter()
            done = 0
            while True:
                now = time.perf_counter()
                stop = done >= args.count if args.count else now - start >= args.seconds
                while not stop and idle:
                    buf = idle.pop()
                    if "rand" in args.rw:
                        lba = rnd.randrange(0, span + 1, nblocks)
                    else:
                        lba, next_lba = next_lba, (next_lba + nblocks) % (span + 1)
                    cmd = q.io(opcode, ns, lba, nblocks, buf.dma, args.rw)
                    inflight[cmd] = (buf, time.perf_counter())
                if not inflight:
                    break
                if not q.reap() and q.vector is not None:  # nothing yet: sleep on the interrupt
                    with contextlib.suppress(TimeoutError):
                        ctrl.vfio.wait_irq(q.vector, 1.0)
                for cmd in [c for c in inflight if c.done]:
                    buf, t = inflight.pop(cmd)
                    q.complete(cmd)
                    latencies.append(time.perf_counter() - t)
                    idle.append(buf)
                    done += 1
                if not args.json and now - last_report >= 1.0:
                    last_report = now
                    rate = done / (now - start)
                    print(f"\r{args.rw} qd {args.qd}: {rate:8.0f} IOPS", end="", file=sys.stderr)
            elapsed = time.perf_counter() - start
            for b in buffers:
                b.free()
    except (NvmeError, UvdmaError, TimeoutError) as e:
        print(f"perf: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the driver waited for the device before letting this through
        print("perf: interrupted", file=sys.stderr)
        return 130
    lat = np.array(latencies) * 1e6
    result = {
        "rw": args.rw,
        "bs": args.bs,
        "qd": args.qd,
        "ios": done,
        "seconds": round(elapsed, 3),
        "iops": round(done / elapsed, 1),
        "mb_s": round(done * args.bs / elapsed / 1e6, 2),
        "lat_us": {
            k: round(float(np.percentile(lat, p)), 1)
            for k, p in (("p50", 50), ("p99", 99), ("p999", 99.9))
        }
        | {"mean": round(float(lat.mean()), 1)},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        lat_us = result["lat_us"]
        assert isinstance(lat_us, dict)
        print(f"\r{args.rw} {args.bs} B qd {args.qd}: {result['iops']} IOPS, {result['mb_s']} MB/s")
        print(f"latency: mean {lat_us['mean']} us, p50 {lat_us['p50']} us, p99 {lat_us['p99']} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
