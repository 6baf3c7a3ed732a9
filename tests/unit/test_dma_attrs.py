"""dma_unmap_single_attrs with DMA_ATTR_SKIP_CPU_SYNC: a failed transfer leaves the caller's
buffer as it was (the NVMe driver's error path relies on it)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest

from uvdma import _sys, pci
from uvdma.dma import (
    DMA_ATTR_SKIP_CPU_SYNC,
    DMA_FROM_DEVICE,
    DmaApiError,
    DmaDevice,
    dma_map_single,
    dma_unmap_single,
    dma_unmap_single_attrs,
)
from uvdma.testing.fake_kernel import FakeKernel
from uvdma.testing.fake_sysfs import make_device
from uvdma.vfio import open_device

BDF = "0000:00:09.0"


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[DmaDevice]:
    make_device(tmp_path, BDF, pci.NVME_CLASS, 9, "vfio-pci", cdev=0)
    k = FakeKernel()
    k.add_device(BDF, 9, 0)
    with _sys.use_kernel(k):
        vd = open_device(BDF, sysfs=tmp_path, backend="type1")
        d = DmaDevice(vd, coherent_pool="256K", debug=True)
        yield d
        assert d.close() == []
        vd.close()


def device_writes(dev: DmaDevice, dma: int, data: bytes) -> None:
    ctypes.memmove(dev.domain.translate(dma) or 0, data, len(data))


def test_skip_cpu_sync_drops_what_the_device_wrote(dev: DmaDevice) -> None:
    buf = bytearray(b"x" * 1000)  # small: bounced
    dma = dma_map_single(dev, buf, DMA_FROM_DEVICE)
    device_writes(dev, dma, b"dev")
    dma_unmap_single_attrs(dev, dma, 1000, DMA_FROM_DEVICE, DMA_ATTR_SKIP_CPU_SYNC)
    assert buf == bytearray(b"x" * 1000)  # nothing copied back
    dma = dma_map_single(dev, buf, DMA_FROM_DEVICE)  # and without the attribute it is
    device_writes(dev, dma, b"dev")
    dma_unmap_single_attrs(dev, dma, 1000, DMA_FROM_DEVICE, 0)
    assert buf[:3] == b"dev"


def test_unmap_attrs_checks_like_unmap(dev: DmaDevice) -> None:
    buf = bytearray(4096)
    dma = dma_map_single(dev, buf, DMA_FROM_DEVICE)
    with pytest.raises(DmaApiError, match="does not match the allocation"):
        dma_unmap_single_attrs(dev, dma, 8192, DMA_FROM_DEVICE, DMA_ATTR_SKIP_CPU_SYNC)
    dma_unmap_single(dev, dma, 4096, DMA_FROM_DEVICE)
