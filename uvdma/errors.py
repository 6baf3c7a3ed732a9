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
