"""Helpers shared by the test tiers (the fake kernel and the software NVMe controller live in
uvdma.testing and uvdma_nvme.sim, where perf.py --device sim can reach them)."""
