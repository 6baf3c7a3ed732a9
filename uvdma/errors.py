"""The uvdma exception tree.

Every error uvdma raises derives from :class:`UvdmaError`.  Errors that come from
a system call keep the kernel's ``errno`` (:class:`UvdmaOSError` is also an
:class:`OSError`), and every message names the operation, the object and the fix.
Where the kernel would ``BUG()`` (a bad free in genalloc, say), uvdma raises a
specific subclass and leaves the object exactly as it was.
"""

from __future__ import annotations

import os


class UvdmaError(Exception):
    """Base class of every exception uvdma raises."""


class UvdmaOSError(UvdmaError, OSError):
    """A system call failed; ``errno`` is the kernel's, the message says what to do."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(errno, f"{message} ({os.strerror(errno)})")
        self.message = message

    def __str__(self) -> str:
        return str(self.args[1])


class GenPoolError(UvdmaError, ValueError):
    """A genalloc call the kernel would answer with ``BUG()``; the pool is unchanged."""


class FreeNotInPoolError(GenPoolError):
    """gen_pool_free() of an address that lies in no chunk of the pool."""


class FreeNotAllocatedError(GenPoolError):
    """gen_pool_free() of a range that is not wholly allocated (a double free, a wrong size)."""


class FreeCrossesChunkError(GenPoolError):
    """gen_pool_free() of a range that runs past the end of its chunk."""


class PoolBusyError(GenPoolError):
    """gen_pool_destroy() while allocations are outstanding."""


class VmError(UvdmaError):
    """The QEMU test VM could not be set up, or did not finish in time."""


class VmTimeoutError(VmError, TimeoutError):
    """A test VM timeout fired; the message says which one and how to raise it."""


class PciError(UvdmaError):
    """A PCI device could not be found, parsed, bound or unbound."""


class DeviceInUseError(PciError):
    """``bind`` refused: a block device of the PCI device is mounted, swap, held or open.

    ``users`` lists each use found, one line each (mount point, swap, holder, pid).
    """

    def __init__(self, message: str, users: list[str]) -> None:
        super().__init__(message)
        self.users = users


class UnbindPendingError(PciError):
    """``unbind`` gave up waiting: a process still holds the device.

    The unbind goes on in the background and gives the device back to its driver as soon
    as the holders let go; ``holders`` names them as ``(pid, comm)``.
    """

    def __init__(self, message: str, holders: list[tuple[int, str]]) -> None:
        super().__init__(message)
        self.holders = holders


class ClosedError(UvdmaError):
    """An object was used after ``close()`` (or ``free()``/``destroy()``); the message
    names the object.  A second ``close()`` is never an error."""


class DeviceReleasedError(ClosedError):
    """The kernel asked for the device back (``uvdma unbind``, hot-unplug) and uvdma gave
    it up: every later use of the device, its BARs and its DMA raises this."""


class DomainInUseError(UvdmaError):
    """An IOMMU domain was asked to close while devices still use it; nothing changed."""


class KernelBuildError(VmError):
    """A step of building the guest kernel failed; the message names it and the fix."""


class NoIommuWarning(UserWarning):
    """A device is used with no IOMMU: nothing protects memory from its DMA."""


class GroupNotViableError(UvdmaError):
    """A device in the group is bound to a driver other than vfio-pci."""


# -- memory (uvdma.memory) -------------------------------------------------------------------


class HugepagesUnavailableError(UvdmaError):
    """No hugepages of the size asked for, and no fallback allowed."""


class MemoryShortError(UvdmaError, MemoryError):
    """The machine does not have the memory asked for; nothing was allocated."""


class SizeError(UvdmaError, ValueError):
    """A size written as text (``512K``, ``2G``) could not be read; the message names the
    setting and shows a good value."""


# -- IOMMU domains (uvdma.vfio) --------------------------------------------------------------


class DmaMapError(UvdmaError):
    """A DMA map or unmap was refused; the domain is unchanged."""


class IovaError(UvdmaError):
    """An IOVA could not be given out or taken back."""


class IovaExhaustedError(IovaError):
    """No free, suitably aligned IOVA range of the size asked for in the windows allowed."""


# -- the DMA API (uvdma.dma) -----------------------------------------------------------------


class DmaApiError(UvdmaError, ValueError):
    """A misuse of the DMA API: the pools and mappings are unchanged."""


class DmaAllocError(UvdmaError, MemoryError):
    """No DMA memory that satisfies the request (the kernel's NULL)."""


class DmaMaskError(UvdmaError, ValueError):
    """A DMA mask the IOMMU domain cannot satisfy (``dma_set_mask`` returning -EIO)."""


class DmaDomainError(UvdmaError, ValueError):
    """A DMA domain was asked for in a way that contradicts how it was made (a second,
    different ``coherent_pool``); nothing was changed."""
