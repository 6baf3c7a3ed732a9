"""Test doubles behind uvdma's syscall seam: a fake kernel (VFIO, iommufd, memfd, pagemap) and a
stand-in sysfs.  The unit tests use them, and so does ``perf.py --device sim`` (a software NVMe
controller, uvdma_nvme.sim, behind the fake kernel).  Not for driving real devices."""
