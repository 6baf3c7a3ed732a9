"""The DMA API's entry points (kernel/dma/mapping.c): masks, coherent allocations and
their frees, and :class:`DmaBuffer`, the convenient form.

With Documentation/core-api/dma-api.rst as the contract: the functions keep the kernel's
names and arguments and take the :class:`~uvdma.dma.device.DmaDevice` first.  Coherent
allocations return a :class:`~uvdma.dma.region.DmaAllocation`, which unpacks as the
kernel's pair (``cpu, dma = dma_alloc_coherent(dev, size)``) and names it
(``.cpu_addr``, ``.dma_handle``).  The allocation itself is dma-direct's
(:mod:`uvdma.dma.direct`); streaming mappings are :mod:`uvdma.dma.streaming`.
"""

from __future__ import annotations

import ctypes
import operator
from typing import Any

import numpy as np
import numpy.typing as npt

from uvdma.dma.device import (
    U64_MAX,
    DmaDevice,
    check_memory,
    check_usable,
    update_coherent_limit,
)
from uvdma.dma.direct import dma_direct_alloc, dma_direct_free
from uvdma.dma.gfp import GFP_KERNEL, PAGE_SIZE
from uvdma.dma.region import DmaAllocation, DmaRegion
from uvdma.errors import ClosedError, DmaMaskError

# -- masks ----------------------------------------------------------------------------------


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
    check_usable(dev, "dma_set_mask")
    _check_mask(dev, mask, "dma_set_mask")
    dev.dma_mask = mask


def dma_set_coherent_mask(dev: DmaDevice, mask: int) -> None:
    """Set the coherent mask; raises :class:`DmaMaskError` (changing nothing) if unsatisfiable."""
    check_usable(dev, "dma_set_coherent_mask")
    _check_mask(dev, mask, "dma_set_coherent_mask")
    dev.coherent_dma_mask = mask
    update_coherent_limit(dev)


def dma_set_mask_and_coherent(dev: DmaDevice, mask: int) -> None:
    """Both masks at once; neither changes if the mask is refused."""
    check_usable(dev, "dma_set_mask_and_coherent")
    _check_mask(dev, mask, "dma_set_mask_and_coherent")
    dev.dma_mask = mask
    dev.coherent_dma_mask = mask
    update_coherent_limit(dev)


# -- coherent allocations ----------------------------------------------------------------------


def dma_alloc_coherent(dev: DmaDevice, size: int, gfp: int = GFP_KERNEL) -> DmaAllocation:
    """``dma_alloc_coherent``: zeroed coherent memory, as ``(cpu_addr, dma_handle)``.

    Raises :class:`~uvdma.errors.DmaAllocError` where the kernel returns NULL, and
    ``ValueError`` for a size of 0.
    """
    if size.__class__ is not int:
        size = _byte_count(size, f"dma_alloc_coherent({dev.name})")
    if size <= 0:
        raise ValueError(f"dma_alloc_coherent({dev.name}): size must be positive, not {size}")
    vd = dev._vfio  # check_usable, inlined: this is the atomic hot path
    if dev._dead is not None or (vd is not None and vd.closed) or dev.domain.closed:
        raise dev.closed_error("dma_alloc_coherent")
    size = (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)  # PAGE_ALIGN
    return dma_direct_alloc(dev, size, gfp)


def _byte_count(size: object, what: str) -> int:
    """``size`` as a plain int: an integer type (numpy's too), never a bool or a float."""
    if not isinstance(size, bool):
        try:
            return operator.index(size)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise TypeError(
        f"{what}: size must be a whole number of bytes (an int), not {size!r} "
        f"({type(size).__name__})"
    )


def dma_free_coherent(dev: DmaDevice, size: int, cpu_addr: int, dma_handle: int) -> None:
    """``dma_free_coherent``: device, size and handle must match the allocation (else
    :class:`~uvdma.errors.DmaApiError`, nothing freed)."""
    if dev.dma_domain.closed:
        check_memory(dev, "dma_free_coherent")
    dma_direct_free(dev, (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1), cpu_addr, dma_handle)


def dma_alloc_attrs(
    dev: DmaDevice, size: int, gfp: int = GFP_KERNEL, attrs: int = 0
) -> DmaAllocation:
    """``dma_alloc_attrs``: :func:`dma_alloc_coherent` (no attribute changes the outcome)."""
    return dma_alloc_coherent(dev, size, gfp)


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
        if self.dev.dma_domain.closed:
            raise ClosedError(f"{self!r}: its IOMMU domain is closed (the memory went with it)")

    @property
    def dma(self) -> int:
        """The address the device uses."""
        if self._freed or self.dev.dma_domain.closed:
            self._check()
        return self._dma

    @property
    def region(self) -> DmaRegion:
        """The memory as a :class:`~uvdma.dma.region.DmaRegion` (cpu, dma, size)."""
        self._check()
        return DmaRegion(self.vaddr, self._dma, self.size)

    @property
    def freed(self) -> bool:
        """Whether :meth:`free` has run (or the memory went with its domain)."""
        return self._freed or self.dev.dma_domain.closed

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
        if not self.dev.dma_domain.closed:
            dma_free_coherent(self.dev, self.size, self.vaddr, self._dma)
        self._freed = True

    def __enter__(self) -> DmaBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __repr__(self) -> str:
        return f"DmaBuffer(dma={self._dma:#x}, size={self.size}, dev={self.dev.name})"
