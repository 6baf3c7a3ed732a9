"""Write a pattern over a range of LBAs, read it back, and verify it.

python examples/nvme/rw.py --device 0000:01:00.0 --lba 0 --blocks 256 [--nsid 1]
python examples/nvme/rw.py --device 0000:01:00.0 --lba 0 --blocks 256 --jobs 4

--jobs N forks N worker processes after bring-up (uvdma_nvme.jobs): job i writes and
verifies LBAs lba + i*blocks .. +blocks on a queue pair and a buffer of its own; then the
parent reads every job's range back through its own queue and verifies them all.
--device sim runs on the software controller (no device, no root).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from uvdma.dma import DmaBuffer
from uvdma.errors import UvdmaError
from uvdma_nvme import Controller, NvmeError, pattern
from uvdma_nvme.args import mask_bits, nonnegative_int, positive_int
from uvdma_nvme.bench import open_controller
from uvdma_nvme.jobs import run_jobs
from uvdma_nvme.queue import QueuePair


def verify(data: Any, back: Any, first_lba: int, lba_size: int) -> str | None:
    """None when ``back`` equals ``data``, else where the first difference is."""
    if np.array_equal(data, back):
        return None
    bad = int(np.flatnonzero(data != back)[0]) // lba_size
    return f"MISMATCH: first at LBA {first_lba + bad}"


def one(args: argparse.Namespace, ctrl: Controller) -> int:
    ns = ctrl.namespace(args.nsid)
    if args.lba + args.blocks > ns.blocks:  # before the pattern: it would be that big
        raise NvmeError(
            f"--blocks {args.blocks} from LBA {args.lba} run past the end of namespace "
            f"{ns.nsid} ({ns.blocks} LBAs)"
        )
    q = ctrl.create_io_queues(1)[0]
    data = pattern(ns.lba_size, args.lba, args.blocks)
    t0 = time.perf_counter()
    q.write(ns, args.lba, data)
    q.flush(ns)
    t1 = time.perf_counter()
    back = np.zeros_like(data)
    q.read(ns, args.lba, back)
    t2 = time.perf_counter()
    print(f"wrote {data.nbytes} bytes at LBA {args.lba} in {t1 - t0:.3f} s")
    print(f"read them back in {t2 - t1:.3f} s")
    bad = verify(data, back, args.lba, ns.lba_size)
    if bad:
        print(bad, file=sys.stderr)
        return 2
    print(f"verified: {args.blocks} LBAs of {ns.lba_size} bytes match")
    return 0


def many(args: argparse.Namespace, ctrl: Controller) -> int:
    ns = ctrl.namespace(args.nsid)
    if args.lba + args.jobs * args.blocks > ns.blocks:
        raise NvmeError(
            f"--jobs {args.jobs} x --blocks {args.blocks} from LBA {args.lba} run past the "
            f"end of namespace {ns.nsid} ({ns.blocks} LBAs)"
        )
    size = args.blocks * ns.lba_size
    queues = ctrl.create_io_queues(args.jobs + 1)  # one each, and the parent's for the check
    mine, theirs = queues[-1], queues[:-1]
    buffers = [DmaBuffer(ctrl.dma, size) for _ in theirs]  # allocated here, before the fork

    def work(i: int, q: QueuePair) -> dict[str, Any]:
        first = args.lba + i * args.blocks
        data = pattern(ns.lba_size, first, args.blocks, seed=0x5EED + i)
        buf = buffers[i]
        np.frombuffer(buf.cpu, dtype=np.uint8)[:] = data
        q.write(ns, first, buf)
        q.flush(ns)
        np.frombuffer(buf.cpu, dtype=np.uint8)[:] = 0
        q.read(ns, first, buf)
        bad = verify(data, np.frombuffer(buf.cpu, dtype=np.uint8), first, ns.lba_size)
        if bad:
            raise NvmeError(f"job {i}: {bad}")
        return {"first_lba": first, "blocks": args.blocks}

    jobs = run_jobs(ctrl, theirs, work, max_bytes=ctrl.max_transfer)
    status = 0
    for j in jobs:
        if not j.ok:
            print(f"job {j.job} (pid {j.pid}): {j.error}", file=sys.stderr)
            status = 1
    # the parent reads every range back through its own queue (what the workers wrote is
    # on the medium, not only in their buffers)
    for j in jobs:
        if not j.ok:
            continue
        first = args.lba + j.job * args.blocks
        data = pattern(ns.lba_size, first, args.blocks, seed=0x5EED + j.job)
        back = np.zeros_like(data)
        mine.read(ns, first, back)
        bad = verify(data, back, first, ns.lba_size)
        if bad:
            print(f"job {j.job}: read back by the parent: {bad}", file=sys.stderr)
            status = 2
        else:
            print(f"job {j.job} (pid {j.pid}): LBAs {first}..{first + args.blocks - 1} verified")
    if status == 0:
        print(f"verified: {args.jobs} jobs x {args.blocks} LBAs of {ns.lba_size} bytes match")
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", required=True, metavar="BDF", help="a PCI address, or 'sim' (software)"
    )
    parser.add_argument("--nsid", type=positive_int, default=1)
    parser.add_argument("--lba", type=nonnegative_int, default=0, help="first LBA")
    parser.add_argument("--blocks", type=positive_int, default=256, help="how many LBAs (per job)")
    parser.add_argument(
        "--mask-bits", type=mask_bits, default=64, help="the device's DMA mask: 24, 32 or 64"
    )
    parser.add_argument("--jobs", type=positive_int, default=1, help="worker processes")
    args = parser.parse_args()
    if args.jobs > 64:
        parser.error(f"--jobs {args.jobs}: at most 64")
    try:
        with open_controller(args.device, dma_bits=args.mask_bits) as (ctrl, _sim):
            return one(args, ctrl) if args.jobs == 1 else many(args, ctrl)
    except (NvmeError, UvdmaError, TimeoutError) as e:
        print(f"rw: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the driver waited for the device before letting this through
        print("rw: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
