"""Write a pattern over a range of LBAs, read it back, and verify it.

python examples/nvme/rw.py --device 0000:01:00.0 --lba 0 --blocks 256 [--nsid 1]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from uvdma.errors import UvdmaError
from uvdma_nvme import Controller, NvmeError, pattern
from uvdma_nvme.args import mask_bits, nonnegative_int, positive_int


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True, metavar="BDF")
    parser.add_argument("--nsid", type=positive_int, default=1)
    parser.add_argument("--lba", type=nonnegative_int, default=0, help="first LBA")
    parser.add_argument("--blocks", type=positive_int, default=256, help="how many LBAs")
    parser.add_argument(
        "--mask-bits", type=mask_bits, default=64, help="the device's DMA mask: 24, 32 or 64"
    )
    args = parser.parse_args()
    try:
        with Controller.open(args.device, dma_bits=args.mask_bits) as ctrl:
            ns = ctrl.namespace(args.nsid)
            q = ctrl.create_io_queues(1)[0]
            data = pattern(ns.lba_size, args.lba, args.blocks)
            t0 = time.perf_counter()
            q.write(ns, args.lba, data)
            q.flush(ns)
            t1 = time.perf_counter()
            back = np.zeros_like(data)
            q.read(ns, args.lba, back)
            t2 = time.perf_counter()
            size = data.nbytes
            print(f"wrote {size} bytes at LBA {args.lba} in {t1 - t0:.3f} s")
            print(f"read them back in {t2 - t1:.3f} s")
            if not np.array_equal(data, back):
                bad = int(np.flatnonzero(data != back)[0]) // ns.lba_size
                print(f"MISMATCH: first at LBA {args.lba + bad}", file=sys.stderr)
                return 2
            print(f"verified: {args.blocks} LBAs of {ns.lba_size} bytes match")
    except (NvmeError, UvdmaError, TimeoutError) as e:
        print(f"rw: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the driver waited for the device before letting this through
        print("rw: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
