"""The NVMe driver's own exceptions (all :class:`~uvdma.errors.UvdmaError`s)."""

from __future__ import annotations

from uvdma.errors import UvdmaError
from uvdma_nvme.status import status_name


class NvmeError(UvdmaError):
    """A controller error, or a command that completed with an error status."""


class CommandError(NvmeError):
    """A command completed with a non-zero status; ``sct``/``sc`` hold it, decoded by name."""

    def __init__(self, what: str, sct: int, sc: int) -> None:
        name = status_name(sct, sc)
        super().__init__(f"{what}: {name} (SCT {sct:#x}, SC {sc:#x})")
        self.sct, self.sc, self.name = sct, sc, name


class CommandTimeoutError(NvmeError, TimeoutError):
    """A command did not complete in time.  By the time this is raised the device can no
    longer touch the command's memory: the command was aborted (``aborted``) or the
    controller was reset (``reset``)."""

    def __init__(self, message: str, *, aborted: bool = False, reset: bool = False) -> None:
        super().__init__(message)
        self.aborted, self.reset = aborted, reset


class ControllerResetError(NvmeError):
    """A command was failed because the controller was reset under it (another command's
    timeout, or CSTS.CFS); the controller works again, the command did not happen or
    happened only in part."""


class ControllerGoneError(NvmeError):
    """The controller reads all-ones (surprise removal, a dead link) or could not be
    brought back after a reset: every command fails at once."""


class ControllerClosedError(NvmeError):
    """The controller was closed (or released at the kernel's request) and cannot be used."""
