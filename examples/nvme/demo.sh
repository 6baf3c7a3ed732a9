#!/bin/sh
# The uvdma demo, run inside the QEMU test VM by tools/demo: an NVMe controller driven from
# Python through VFIO. Every step is one of the programs in examples/nvme/.
set -e
BDF=${1:-0000:00:09.0}
cd "$(dirname "$0")"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "1. uvdma doctor: is this machine ready? (IOMMU, vfio-pci, hugepages, the device)"
uvdma doctor "$BDF" | tail -n 8

say "2. identify.py: the controller and its namespace, read over admin queues we own"
python identify.py --device "$BDF"

say "3. rw.py: write a pattern over 2048 LBAs (1 MiB: split at MDTS, PRP lists), read back, verify"
python rw.py --device "$BDF" --lba 0 --blocks 2048

say "4. perf.py: 4 KiB random reads, queue depth 16, 3 seconds, polled completions"
python perf.py --device "$BDF" --rw randread --qd 16 --seconds 3

say "5. the DMA memory behind it: atomic pools and allocations by mask"
python - "$BDF" <<'PY'
import sys
from uvdma_nvme import Controller
with Controller.open(sys.argv[1], dma_bits=32) as c:
    q = c.create_io_queues(2)
    print(f"  admin queue at dma {c.admin.sq.dma_handle:#x}, I/O queues at {[hex(x.sq.dma_handle) for x in q]}")
    print("  (a 32-bit DMA mask: every queue below 4 GiB, from dma_alloc_coherent)")
    print("  atomic pools:", ", ".join(f"{k} {v >> 10} KiB" for k, v in c.pool_stats().items()))
print("  DMA-API check at close:", "no leaks" if not c.leaks else c.leaks)
PY
say "done: the NVMe controller was driven from Python, through VFIO and the emulated IOMMU"
