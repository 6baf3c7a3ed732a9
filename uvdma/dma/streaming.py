"""Streaming DMA (``dma_map_single``, ``dma_map_sg``) of the caller's own buffers, mapped
in place or bounced: dma-direct's map_page and swiotlb (kernel/dma/direct.h,
kernel/dma/swiotlb.c), with the mapping.c entry points.

Buffers (numpy arrays, bytearrays, mmaps) are mapped one of two ways, and the choice is
ours:

* **direct**: a buffer that starts and ends on page boundaries and is at least
  ``DIRECT_MIN`` bytes is mapped into the IOMMU where it is (one ioctl, no copy), at an
  IOVA chosen within the device's ``dma_mask``; the device sees exactly the caller's
  pages and nothing else.
* **bounce**: anything else (unaligned, small, or when the direct map fails) is copied
  through memory from the page allocator, taken within the ``dma_mask``: in at map time
  for ``DMA_TO_DEVICE``/``DMA_BIDIRECTIONAL``, out at unmap or ``dma_sync_single_for_cpu``
  for ``DMA_FROM_DEVICE``/``DMA_BIDIRECTIONAL``.  Mapping part of a page would expose the
  rest of it to the device (the kernel bounces for untrusted devices for the same
  reason), and for small buffers a copy is cheaper than an ioctl.

Mapping errors are exceptions (:class:`~uvdma.errors.DmaApiError`,
:class:`~uvdma.errors.DmaAllocError`); the kernel's DMA_MAPPING_ERROR has no equivalent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from uvdma._sys import copy
from uvdma.dma.device import DmaDevice, check_memory, check_usable
from uvdma.dma.direct import alloc_pages_or_why
from uvdma.dma.gfp import (
    DMA_ATTR_SKIP_CPU_SYNC,
    DMA_BIDIRECTIONAL,
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    PAGE_SIZE,
    DmaDataDirection,
    get_order,
)
from uvdma.dma.region import DmaRegion, SgEntry
from uvdma.dma.zones import zone_for_mask, zone_windows
from uvdma.errors import DmaAllocError, DmaApiError, UvdmaError
from uvdma.vfio.domain import DmaMapping

DIRECT_MIN = 64 << 10  # smaller page-aligned buffers are bounced: a copy beats an ioctl


@dataclass
class Streaming:
    """One streaming mapping: where the caller's buffer is, and how the device sees it."""

    dma: int
    size: int
    direction: int
    buf_addr: int
    keep: Any  # the caller's buffer (kept alive while mapped)
    mapping: DmaMapping | None = None  # direct
    bounce: DmaRegion | None = None  # the bounce buffer


def _buffer_address(buf: Any, direction: int) -> tuple[int, int, Any]:
    """(address, size, what to keep alive) of a C-contiguous buffer; refuses a read-only
    buffer that the device is to write."""
    try:
        mv = memoryview(buf)
    except TypeError as e:
        raise DmaApiError(f"cannot DMA-map a {type(buf).__name__}: it has no buffer") from e
    if not mv.c_contiguous:
        raise DmaApiError("cannot DMA-map a buffer that is not C-contiguous: copy it first")
    if mv.readonly and direction in (DMA_FROM_DEVICE, DMA_BIDIRECTIONAL):
        raise DmaApiError(
            f"mapping a read-only buffer for the device to write "
            f"({DmaDataDirection(direction).name}): pass a writable buffer, or map it DMA_TO_DEVICE"
        )
    arr = np.frombuffer(mv.cast("B"), dtype=np.uint8)
    return int(arr.ctypes.data), arr.nbytes, arr


def _map_one(dev: DmaDevice, buf: Any, direction: int) -> Streaming:
    if direction not in (DMA_BIDIRECTIONAL, DMA_TO_DEVICE, DMA_FROM_DEVICE):
        raise DmaApiError(
            f"direction must be TO_DEVICE, FROM_DEVICE or BIDIRECTIONAL, not {direction}"
        )
    addr, size, keep = _buffer_address(buf, direction)
    if size == 0:
        raise DmaApiError("cannot DMA-map an empty buffer")
    if addr % PAGE_SIZE == 0 and size % PAGE_SIZE == 0 and size >= DIRECT_MIN:
        try:
            m = dev.domain.map(
                addr,
                size,
                read=direction != DMA_FROM_DEVICE,
                write=direction != DMA_TO_DEVICE,
                windows=zone_windows(zone_for_mask(dev.dma_mask), dev.dma_mask),
            )
            return Streaming(m.iova, size, direction, addr, keep, mapping=m)
        except UvdmaError:
            pass  # fall back to bouncing
    why: list[UvdmaError] = []
    got = alloc_pages_or_why(dev, zone_for_mask(dev.dma_mask), get_order(size), dev.dma_mask, why)
    if got is None:
        what = f"dma_map_single({dev.name}, {size} bytes)"
        if why:
            raise DmaAllocError(f"{what}: bounce memory: {why[-1]}") from why[-1]
        raise DmaAllocError(
            f"{what}: no bounce memory within mask {dev.dma_mask:#x}: free some mappings, "
            "or widen the mask"
        )
    if direction in (DMA_TO_DEVICE, DMA_BIDIRECTIONAL):
        copy(got.cpu_addr, addr, size)
    return Streaming(got.dma_addr, size, direction, addr, keep, bounce=got)


def _unmap_one(dev: DmaDevice, s: Streaming, sync: bool = True) -> None:
    if s.mapping is not None:
        dev.domain.unmap(s.mapping)
    elif s.bounce is not None:
        if sync and s.direction in (DMA_FROM_DEVICE, DMA_BIDIRECTIONAL):
            copy(s.buf_addr, s.bounce.cpu_addr, s.size)
        dev.dma_domain.pages.free_pages(s.bounce.cpu_addr, get_order(s.bounce.size))


def dma_map_single(dev: DmaDevice, buf: Any, direction: int) -> int:
    """``dma_map_single``: the dma address at which the device sees ``buf``.

    ``buf`` is anything with a C-contiguous buffer (numpy array, bytearray, mmap, ...);
    it is kept alive until unmapped.  Errors are exceptions.
    """
    check_usable(dev, "dma_map_single")
    s = _map_one(dev, buf, direction)
    with dev._lock:
        dev._streaming[s.dma] = s
        dev.debug.add("single", s.dma, s.buf_addr, s.size, direction)
    return s.dma


def dma_unmap_single(dev: DmaDevice, dma: int, size: int, direction: int) -> None:
    """``dma_unmap_single``: handle, size and direction must match the mapping."""
    dma_unmap_single_attrs(dev, dma, size, direction, 0)


def dma_unmap_single_attrs(
    dev: DmaDevice, dma: int, size: int, direction: int, attrs: int = 0
) -> None:
    """``dma_unmap_single_attrs``: with ``DMA_ATTR_SKIP_CPU_SYNC`` a bounced buffer is
    not copied back (what the device wrote is dropped: a transfer that failed)."""
    check_memory(dev, "dma_unmap_single")
    with dev._lock:
        dev.debug.take("single", dma, size, direction=direction)
        s = dev._streaming.pop(dma)
    _unmap_one(dev, s, sync=not attrs & DMA_ATTR_SKIP_CPU_SYNC)


def dma_map_sg(dev: DmaDevice, bufs: Sequence[Any], direction: int) -> list[SgEntry]:
    """``dma_map_sg``: map each buffer; returns one :class:`~uvdma.dma.region.SgEntry`
    (``dma_address``, ``dma_length``) per buffer. All or nothing."""
    check_usable(dev, "dma_map_sg")
    done: list[Streaming] = []
    try:
        for buf in bufs:
            done.append(_map_one(dev, buf, direction))
    except BaseException:
        for s in reversed(done):
            _unmap_one(dev, s)
        raise
    with dev._lock:
        for s in done:
            dev._streaming[s.dma] = s
            dev.debug.add("sg", s.dma, s.buf_addr, s.size, direction)
    return [SgEntry(s.dma, s.size) for s in done]


def dma_unmap_sg(dev: DmaDevice, sg: Sequence[SgEntry], direction: int) -> None:
    """``dma_unmap_sg``: what :func:`dma_map_sg` returned. Checked entirely before anything
    is unmapped."""
    check_memory(dev, "dma_unmap_sg")
    with dev._lock:
        live = dev.debug.live["sg"]
        for dma, size in sg:  # check every entry before touching any
            rec = live.get(dma)
            if rec is None or rec[1] != size or rec[2] != direction:
                raise dev.debug.mismatch("sg", dma, size, None, direction, rec)
        streams = []
        for dma, size in sg:
            dev.debug.take("sg", dma, size, direction=direction)
            streams.append(dev._streaming.pop(dma))
    for s in streams:
        _unmap_one(dev, s)


def _sync(dev: DmaDevice, dma: int, size: int, direction: int, for_cpu: bool) -> None:
    check_memory(dev, "dma_sync_single_for_" + ("cpu" if for_cpu else "device"))
    with dev._lock:
        s = dev._streaming.get(dma)
    if s is None or size > s.size:
        raise DmaApiError(
            f"{dev.name}: sync of dma {dma:#x} size {size}: not a live streaming mapping"
        )
    if s.bounce is None:
        return  # mapped in place: x86 DMA is cache-coherent
    if for_cpu and direction in (DMA_FROM_DEVICE, DMA_BIDIRECTIONAL):
        copy(s.buf_addr, s.bounce[0], size)
    if not for_cpu and direction in (DMA_TO_DEVICE, DMA_BIDIRECTIONAL):
        copy(s.bounce[0], s.buf_addr, size)


def dma_sync_single_for_cpu(dev: DmaDevice, dma: int, size: int, direction: int) -> None:
    """Make what the device wrote visible in the caller's buffer."""
    _sync(dev, dma, size, direction, for_cpu=True)


def dma_sync_single_for_device(dev: DmaDevice, dma: int, size: int, direction: int) -> None:
    """Make what the CPU wrote visible to the device."""
    _sync(dev, dma, size, direction, for_cpu=False)


def is_bounced(dev: DmaDevice, dma: int) -> bool:
    """Whether a streaming mapping goes through a bounce buffer (for tests and tools)."""
    with dev._lock:
        s = dev._streaming.get(dma)
    if s is None:
        raise DmaApiError(f"{dev.name}: dma {dma:#x} is not a live streaming mapping")
    return s.bounce is not None
