"""The DMA API for a device: masks, coherent allocations, streaming mappings.

After kernel/dma/direct.c and kernel/dma/mapping.c, with
Documentation/core-api/dma-api.rst as the contract.  :class:`DmaDevice` plays
``struct device``: it has a ``dma_mask``, a ``coherent_dma_mask`` and a
``bus_dma_limit``; the functions take it first, as the kernel's do.

Coherent memory (``dma_alloc_coherent``) follows ``dma_direct_alloc``: the zone comes
from the coherent mask (``dma_direct_optimal_gfp_mask``), pages come from the domain's
page allocator, ``dma_coherent_ok`` checks the address, and a miss is retried in DMA32
and then DMA.  A caller that cannot block (GFP flags without ``__GFP_DIRECT_RECLAIM``,
e.g. ``GFP_ATOMIC``) makes no system call: it is served from the atomic pools.

Streaming mappings (``dma_map_single``, ``dma_map_sg``) of the caller's own buffers
(numpy arrays, bytearrays, mmaps) are done one of two ways, and the choice is ours:

* **direct**: a buffer that starts and ends on page boundaries and is at least
  ``DIRECT_MIN`` bytes is mapped into the IOMMU where it is (one ioctl, no copy); the
  device sees exactly the caller's pages and nothing else.
* **bounce**: anything else (unaligned, small, or when the direct map fails) is copied
  through pre-mapped memory from the page allocator: in at map time for
  ``DMA_TO_DEVICE``/``DMA_BIDIRECTIONAL``, out at unmap or ``dma_sync_single_for_cpu``
  for ``DMA_FROM_DEVICE``/``DMA_BIDIRECTIONAL``.  Mapping part of a page would expose
  the rest of it to the device (the kernel bounces for untrusted devices for the same
  reason), and for small buffers a copy is cheaper than an ioctl.

Both honour the streaming ``dma_mask``.  Mapping errors are exceptions, not
``DMA_MAPPING_ERROR``.

A request that cannot be satisfied (larger than the zones the mask allows, than the free
hugepages and the memory the process may lock, than RLIMIT_MEMLOCK) raises
:class:`DmaAllocError` before any memory is touched, naming the limit.

After :meth:`DmaDevice.close`, or once its :class:`~uvdma.vfio.VfioDevice` is closed (or
given back to the kernel), allocations, mappings and mask changes raise
:class:`~uvdma.errors.ClosedError` (:class:`~uvdma.errors.DeviceReleasedError`) naming
the device; frees and unmaps of what it handed out stay allowed while the IOMMU domain
(where the memory lives) is open, and raise ``ClosedError`` after.  These are flag checks,
not locks: every function here may be called from several threads at once, but closing
while another thread is inside an allocation is the caller's race (quiesce, then close).
"""

from __future__ import annotations

import ctypes
import errno
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from uvdma._sys import copy, zero
from uvdma.dma.debug import DmaApiError, DmaDebug, enabled_by_env
from uvdma.dma.gfp import (
    __GFP_DIRECT_RECLAIM,
    __GFP_ZERO,
    DMA_ATTR_SKIP_CPU_SYNC,
    DMA_BIDIRECTIONAL,
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    GFP_DMA,
    GFP_DMA32,
    GFP_KERNEL,
    PAGE_SIZE,
    DmaDataDirection,
    get_order,
)
from uvdma.dma.pages import PageAllocator
from uvdma.dma.pool import AtomicPools
from uvdma.errors import ClosedError, UvdmaError, UvdmaOSError
from uvdma.memory.hugepages import MemoryShortError
from uvdma.memory.iova import Zone
from uvdma.vfio.device import VfioDevice
from uvdma.vfio.domain import DmaMapping, IommuDomain

DIRECT_MIN = 64 << 10  # smaller page-aligned buffers are bounced: a copy beats an ioctl
U64_MAX = (1 << 64) - 1


class DmaAllocError(UvdmaError, MemoryError):
    """No DMA memory that satisfies the request (the kernel's NULL)."""


class DmaMaskError(UvdmaError, ValueError):
    """A DMA mask the IOMMU domain cannot satisfy (``dma_set_mask`` returning -EIO)."""


class DmaContext:
    """Per IOMMU domain: the page allocator and the atomic pools."""

    def __init__(self, domain: IommuDomain, coherent_pool: int | str | None) -> None:
        self.domain = domain
        self.pages = PageAllocator(domain)
        try:
            self.pools = AtomicPools(self.pages, coherent_pool)
        except BaseException:
            self.pages.close()
            raise
        self.closed = False
        self.devices: weakref.WeakSet[DmaDevice] = weakref.WeakSet()
        domain.add_close_hook(self.close)

    def close(self) -> None:
        """Refuse every DmaDevice of the domain from now on, stop the refill worker, then
        unmap and free every page. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for dev in list(self.devices):
            dev._dead = (
                f"DmaDevice {dev.name}: its IOMMU domain is closed (its DMA memory went with it)"
            )
        self.pools.close()
        self.pages.close()


def dma_context(domain: IommuDomain, coherent_pool: int | str | None = None) -> DmaContext:
    """The domain's DMA context, made on first use (``coherent_pool`` counts only then)."""
    ctx = domain.extensions.get("dma")
    if ctx is None:
        ctx = DmaContext(domain, coherent_pool)
        domain.extensions["dma"] = ctx
    if not isinstance(ctx, DmaContext):  # pragma: no cover - only this module sets it
        raise TypeError("the domain's DMA context is of the wrong type")
    return ctx


@dataclass
class _Streaming:
    """One streaming mapping: where the caller's buffer is, and how the device sees it."""

    dma: int
    size: int
    direction: int
    buf_addr: int
    keep: Any  # the caller's buffer (kept alive while mapped)
    mapping: DmaMapping | None = None  # direct
    bounce: tuple[int, int] | None = None  # (vaddr, order) for bounce


class DmaDevice:
    """``struct device`` as the DMA API sees it: masks, and the domain its DMA goes through.

    Built from a :class:`~uvdma.vfio.VfioDevice` (or an IOMMU domain and a name).  The
    masks start at 32 bits, the kernel's default for PCI devices; a driver widens them
    with :func:`dma_set_mask_and_coherent`.
    """

    def __init__(
        self,
        target: VfioDevice | IommuDomain,
        name: str | None = None,
        *,
        coherent_pool: int | str | None = None,
        debug: bool | None = None,
    ) -> None:
        self._vfio: VfioDevice | None = None
        if isinstance(target, VfioDevice):
            if target.closed:
                raise target.closed_error(f"DmaDevice({name or target.address})")
            self._vfio = target
            self.domain = target.domain
            self.name = name or str(target.address)
        else:
            self.domain = target
            self.name = name or "dma-device"
        if self.domain.closed:
            raise ClosedError(f"DmaDevice({self.name}): {self.domain!r} is closed")
        # None while usable; else why not (the check on every call is this one attribute)
        self._dead: str | None = None
        self.ctx = dma_context(self.domain, coherent_pool)
        self.ctx.devices.add(self)
        self.dma_mask = (1 << 32) - 1
        self.coherent_dma_mask = (1 << 32) - 1
        self.bus_dma_limit = 0
        self.debug = DmaDebug(self.name, enabled_by_env() if debug is None else debug)
        self._coherent = self.debug.live["coherent"]
        self._zone_bits, self._limit = dma_direct_optimal_gfp_mask(self)
        self._lock = threading.Lock()
        self._streaming: dict[int, _Streaming] = {}
        self.closed = False

    def close(self) -> list[str]:
        """Report leaks (DMA-API debug); returns the leak lines. Idempotent.

        From now on allocations, mappings and mask changes raise ClosedError; frees and
        unmaps of what is still out remain allowed while the domain is open."""
        if self.closed:
            return []
        self.closed = True
        if self._dead is None:
            self._dead = f"DmaDevice {self.name} is closed"
        return self.debug.report_leaks()

    def closed_error(self, what: str) -> ClosedError:
        """The error for ``what`` on this device now that it cannot be used."""
        vd = self._vfio
        if not self.closed and vd is not None and vd.closed:  # the cause, when it is that
            return vd.closed_error(f"{what} on DmaDevice {self.name}")
        return ClosedError(f"{what}: {self._dead or f'DmaDevice {self.name} is closed'}")

    def __enter__(self) -> DmaDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DmaDevice({self.name}, dma_mask={self.dma_mask:#x}, "
            f"coherent={self.coherent_dma_mask:#x})"
        )


def _check(dev: DmaDevice, what: str) -> None:
    """Allocations, mappings, masks: refused once the device or its VfioDevice is closed."""
    vd = dev._vfio
    if dev._dead is not None or (vd is not None and vd.closed):
        raise dev.closed_error(what)


def _check_free(dev: DmaDevice, what: str) -> None:
    """Frees and unmaps: refused once the memory is gone with the domain."""
    if dev.ctx.closed:
        raise ClosedError(
            f"{what} on DmaDevice {dev.name}: its IOMMU domain is closed, and the DMA memory "
            "went with it"
        )


# -- masks ----------------------------------------------------------------------------------


def min_not_zero(a: int, b: int) -> int:
    """The kernel's ``min_not_zero``."""
    if a == 0:
        return b
    if b == 0:
        return a
    return min(a, b)


def dma_supported(dev: DmaDevice, mask: int) -> bool:
    """Whether some usable IOVA page lies at or below ``mask`` (and the mask is >= 24 bits)."""
    if mask < (1 << 24) - 1:
        return False
    lowest = min(start for start, _last in dev.domain.iova.ranges)
    return lowest + PAGE_SIZE - 1 <= mask


def _check_mask(dev: DmaDevice, mask: int, what: str) -> None:
    if not 0 < mask <= U64_MAX:
        raise DmaMaskError(f"{what}({dev.name}, {mask:#x}): a mask is 1..64 bits")
    if not dma_supported(dev, mask):
        raise DmaMaskError(
            f"{what}({dev.name}, {mask:#x}): no usable IOVA range of this IOMMU lies at or "
            "below the mask (the kernel supports no mask narrower than DMA_BIT_MASK(24)); "
            "the device cannot do DMA with it"
        )


def dma_set_mask(dev: DmaDevice, mask: int) -> None:
    """Set the streaming mask; raises :class:`DmaMaskError` (changing nothing) if unsatisfiable."""
    _check(dev, "dma_set_mask")
    _check_mask(dev, mask, "dma_set_mask")
    dev.dma_mask = mask


def dma_set_coherent_mask(dev: DmaDevice, mask: int) -> None:
    """Set the coherent mask; raises :class:`DmaMaskError` (changing nothing) if unsatisfiable."""
    _check(dev, "dma_set_coherent_mask")
    _check_mask(dev, mask, "dma_set_coherent_mask")
    dev.coherent_dma_mask = mask
    dev._zone_bits, dev._limit = dma_direct_optimal_gfp_mask(dev)


def dma_set_mask_and_coherent(dev: DmaDevice, mask: int) -> None:
    """Both masks at once; neither changes if the mask is refused."""
    _check(dev, "dma_set_mask_and_coherent")
    _check_mask(dev, mask, "dma_set_mask_and_coherent")
    dev.dma_mask = mask
    dev.coherent_dma_mask = mask
    dev._zone_bits, dev._limit = dma_direct_optimal_gfp_mask(dev)


# -- coherent allocations ----------------------------------------------------------------------


def dma_direct_optimal_gfp_mask(dev: DmaDevice) -> tuple[int, int]:
    """(zone GFP bits, phys_limit) for the device's coherent mask."""
    phys_limit = min_not_zero(dev.coherent_dma_mask, dev.bus_dma_limit)
    if phys_limit <= (1 << 24) - 1:
        return GFP_DMA, phys_limit
    if phys_limit <= (1 << 32) - 1:
        return GFP_DMA32, phys_limit
    return 0, phys_limit


def dma_coherent_ok(dev: DmaDevice, dma: int, size: int) -> bool:
    """``dma_coherent_ok``: the whole range within the coherent mask and bus limit."""
    return dma + size - 1 <= min_not_zero(dev.coherent_dma_mask, dev.bus_dma_limit)


def _zone(gfp: int) -> Zone:
    if gfp & GFP_DMA:
        return Zone.DMA
    if gfp & GFP_DMA32:
        return Zone.DMA32
    return Zone.NORMAL


def _alloc_pages(
    pages: PageAllocator, zone: Zone, order: int, why: list[UvdmaError]
) -> tuple[int, int] | None:
    """alloc_pages, with a shortage of memory (or of RLIMIT_MEMLOCK) as the kernel's NULL;
    the reason goes into ``why`` for the error message."""
    try:
        return pages.alloc_pages(zone, order)
    except MemoryShortError as e:
        why.append(e)
    except UvdmaOSError as e:
        if e.errno != errno.ENOMEM:
            raise
        why.append(e)
    return None


def _direct_alloc_pages(
    dev: DmaDevice, size: int, gfp: int, why: list[UvdmaError]
) -> tuple[int, int] | None:
    """``__dma_direct_alloc_pages``: pages in the optimal zone, retried in DMA32 then DMA."""
    zone_bits, phys_limit = dma_direct_optimal_gfp_mask(dev)
    gfp |= zone_bits
    order = get_order(size)
    pages = dev.ctx.pages
    while True:
        got = _alloc_pages(pages, _zone(gfp), order, why)
        if got is not None and dma_coherent_ok(dev, got[1], size):
            return got
        if got is not None:
            pages.free_pages(got[0], order)
        if phys_limit < U64_MAX and not gfp & (GFP_DMA32 | GFP_DMA):
            gfp |= GFP_DMA32
            continue
        if not gfp & GFP_DMA:
            gfp = (gfp & ~GFP_DMA32) | GFP_DMA
            continue
        return None


def dma_alloc_coherent(dev: DmaDevice, size: int, gfp: int = GFP_KERNEL) -> tuple[int, int]:
    """``dma_alloc_coherent``: zeroed coherent memory; returns (cpu address, dma address).

    Raises :class:`DmaAllocError` where the kernel returns NULL, and ``ValueError``
    for a size of 0.
    """
    if size <= 0:
        raise ValueError(f"dma_alloc_coherent({dev.name}): size must be positive, not {size}")
    vd = dev._vfio  # _check, inlined: this is the atomic hot path
    if dev._dead is not None or (vd is not None and vd.closed):
        raise dev.closed_error("dma_alloc_coherent")
    size = (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)  # PAGE_ALIGN
    if not gfp & __GFP_DIRECT_RECLAIM:
        # dma_direct_alloc_from_pool: the caller cannot block, so no system call here
        got = dev.ctx.pools.alloc_atomic(size, dev._zone_bits, dev._limit)
        if got is None:
            raise DmaAllocError(
                f"dma_alloc_coherent({dev.name}, {size}, GFP_ATOMIC): the atomic pools have no "
                f"{size} bytes within mask {dev.coherent_dma_mask:#x} (the kernel returns NULL): "
                "allocate with GFP_KERNEL where you may block, or raise coherent_pool / "
                "UVDMA_COHERENT_POOL"
            )
        cpu, dma, pool = got
        if dev.debug.enabled:
            dev.debug.add("coherent", dma, cpu, size, 0, pool)
        else:
            dev._coherent[dma] = (cpu, size, 0, "", pool)
        return cpu, dma
    why: list[UvdmaError] = []
    pages = _direct_alloc_pages(dev, size, gfp & ~__GFP_ZERO, why)
    if pages is None:
        if why:
            raise DmaAllocError(f"dma_alloc_coherent({dev.name}, {size}): {why[-1]}") from why[-1]
        raise DmaAllocError(
            f"dma_alloc_coherent({dev.name}, {size}): no DMA memory within mask "
            f"{dev.coherent_dma_mask:#x} (every zone it can use is full or too small for "
            f"{size} bytes): free some, or widen the mask with dma_set_coherent_mask"
        )
    zero(pages[0], size)
    dev.debug.add("coherent", pages[1], pages[0], size)
    return pages


def dma_alloc_attrs(
    dev: DmaDevice, size: int, gfp: int = GFP_KERNEL, attrs: int = 0
) -> tuple[int, int]:
    """``dma_alloc_attrs``: :func:`dma_alloc_coherent` (no attribute changes the outcome)."""
    return dma_alloc_coherent(dev, size, gfp)


def dma_free_coherent(dev: DmaDevice, size: int, cpu_addr: int, dma_handle: int) -> None:
    """``dma_free_coherent``: device, size and handle must match the allocation (else
    :class:`DmaApiError`, nothing freed)."""
    if dev.ctx.closed:
        _check_free(dev, "dma_free_coherent")
    size = (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    rec = dev._coherent.pop(dma_handle, None)
    if rec is None or rec[1] != size or rec[0] != cpu_addr or dev.debug.enabled:
        if rec is not None:
            dev._coherent[dma_handle] = rec
        rec = dev.debug.take("coherent", dma_handle, size, cpu_addr)
        dev.debug.poison(cpu_addr, size)
    pool = rec[4]
    if pool is not None:
        pool.free(cpu_addr, size)  # dma_free_from_pool, knowing which pool it was
    elif not dev.ctx.pools.free_from_pool(cpu_addr, size):
        dev.ctx.pages.free_pages(cpu_addr, get_order(size))


def dma_free_attrs(
    dev: DmaDevice, size: int, cpu_addr: int, dma_handle: int, attrs: int = 0
) -> None:
    """``dma_free_attrs``: :func:`dma_free_coherent`."""
    dma_free_coherent(dev, size, cpu_addr, dma_handle)


# -- the convenient form ------------------------------------------------------------------------


class DmaBuffer:
    """Coherent DMA memory as an object: ``cpu`` (memoryview), ``array`` (numpy), ``dma``, ``size``.

    Freed by :meth:`free` or by leaving a ``with`` block.  After that ``cpu``, ``array``
    and ``dma`` raise :class:`~uvdma.errors.ClosedError`; a second free does nothing, and so
    does a free after the IOMMU domain closed (the memory went with it).
    """

    def __init__(self, dev: DmaDevice, size: int, gfp: int = GFP_KERNEL) -> None:
        self.dev = dev
        self.size = size
        self.vaddr, self._dma = dma_alloc_coherent(dev, size, gfp)
        self._freed = False

    def _check(self) -> None:
        if self._freed:
            raise ClosedError(f"{self!r} is freed")
        if self.dev.ctx.closed:
            raise ClosedError(f"{self!r}: its IOMMU domain is closed (the memory went with it)")

    @property
    def dma(self) -> int:
        """The address the device uses."""
        if self._freed or self.dev.ctx.closed:
            self._check()
        return self._dma

    @property
    def freed(self) -> bool:
        """Whether :meth:`free` has run (or the memory went with its domain)."""
        return self._freed or self.dev.ctx.closed

    @property
    def cpu(self) -> memoryview:
        """The memory, as a writable memoryview (valid until :meth:`free`)."""
        self._check()
        return memoryview((ctypes.c_char * self.size).from_address(self.vaddr)).cast("B")

    def array(self, dtype: npt.DTypeLike = np.uint8) -> npt.NDArray[Any]:
        """The memory as a numpy array of ``dtype`` (no copy; valid until :meth:`free`)."""
        return np.frombuffer(self.cpu, dtype=dtype)

    def free(self) -> None:
        """``dma_free_coherent``. Idempotent; nothing to do once the domain is closed."""
        if self._freed:
            return
        if not self.dev.ctx.closed:
            dma_free_coherent(self.dev, self.size, self.vaddr, self._dma)
        self._freed = True

    def __enter__(self) -> DmaBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __repr__(self) -> str:
        return f"DmaBuffer(dma={self._dma:#x}, size={self.size}, dev={self.dev.name})"


# -- streaming mappings --------------------------------------------------------------------------


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


def _map_one(dev: DmaDevice, buf: Any, direction: int) -> _Streaming:
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
                zone=Zone.for_mask(dev.dma_mask),
                limit=dev.dma_mask,
                owner=keep,
            )
            return _Streaming(m.iova, size, direction, addr, keep, mapping=m)
        except UvdmaError:
            pass  # fall back to bouncing
    order = get_order(size)
    pages = dev.ctx.pages
    why: list[UvdmaError] = []
    got = _alloc_pages(pages, Zone.for_mask(dev.dma_mask), order, why)
    if got is None or got[1] + size - 1 > dev.dma_mask:
        if got is not None:
            pages.free_pages(got[0], order)
        what = f"dma_map_single({dev.name}, {size} bytes)"
        if why:
            raise DmaAllocError(f"{what}: bounce memory: {why[-1]}") from why[-1]
        raise DmaAllocError(
            f"{what}: no bounce memory within mask {dev.dma_mask:#x}: free some mappings, "
            "or widen the mask"
        )
    if direction in (DMA_TO_DEVICE, DMA_BIDIRECTIONAL):
        copy(got[0], addr, size)
    return _Streaming(got[1], size, direction, addr, keep, bounce=(got[0], order))


def _unmap_one(dev: DmaDevice, s: _Streaming, sync: bool = True) -> None:
    if s.mapping is not None:
        dev.domain.unmap(s.mapping)
    elif s.bounce is not None:
        if sync and s.direction in (DMA_FROM_DEVICE, DMA_BIDIRECTIONAL):
            copy(s.buf_addr, s.bounce[0], s.size)
        dev.ctx.pages.free_pages(*s.bounce)


def dma_map_single(dev: DmaDevice, buf: Any, direction: int) -> int:
    """``dma_map_single``: the dma address at which the device sees ``buf``.

    ``buf`` is anything with a C-contiguous buffer (numpy array, bytearray, mmap, ...);
    it is kept alive until unmapped.  Errors are exceptions, never DMA_MAPPING_ERROR.
    """
    _check(dev, "dma_map_single")
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
    _check_free(dev, "dma_unmap_single")
    with dev._lock:
        dev.debug.take("single", dma, size, direction=direction)
        s = dev._streaming.pop(dma)
    _unmap_one(dev, s, sync=not attrs & DMA_ATTR_SKIP_CPU_SYNC)


def dma_map_sg(dev: DmaDevice, bufs: Sequence[Any], direction: int) -> list[tuple[int, int]]:
    """``dma_map_sg``: map each buffer; returns [(dma address, length)]. All or nothing."""
    _check(dev, "dma_map_sg")
    done: list[_Streaming] = []
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
    return [(s.dma, s.size) for s in done]


def dma_unmap_sg(dev: DmaDevice, sg: Sequence[tuple[int, int]], direction: int) -> None:
    """``dma_unmap_sg``: what :func:`dma_map_sg` returned. Checked entirely before anything
    is unmapped."""
    _check_free(dev, "dma_unmap_sg")
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
    _check_free(dev, "dma_sync_single_for_" + ("cpu" if for_cpu else "device"))
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
