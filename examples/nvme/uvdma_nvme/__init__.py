"""A minimal userspace NVMe driver on uvdma (examples/nvme).

Its queues come from ``dma_alloc_coherent`` and its PRP lists from a ``dma_pool``, as in
Linux's nvme driver; data lives in the caller's buffers (``dma_map_single``) or in
``DmaBuffer``s.  References are to the NVM Express Base Specification 2.0 ("NVMe 2.0")
and the NVM Command Set Specification 1.0 ("NVM 1.0").

    from uvdma_nvme import Controller

    with Controller.open("0000:01:00.0") as ctrl:
        ns = ctrl.namespace(1)
        q = ctrl.create_io_queues(1)[0]
        data = np.zeros(ns.lba_size * 8, dtype=np.uint8)
        q.read(ns, lba=0, buf=data)

Modules, one concern each: :mod:`.spec` (registers and data structures, by the spec's
names), :mod:`.status` (status codes by name), :mod:`.prp` (PRP lists, pure functions),
:mod:`.queue` (requests and queue pairs), :mod:`.controller` (bring-up, admin commands,
recovery, shutdown), :mod:`.errors`, :mod:`.pattern` (a test pattern).

The rule it is built on: memory a command lets the device reach belongs to the command
until the device can no longer touch it (its completion reaped, or the controller
disabled).  A command that times out is aborted, and if that does not end it the
controller is reset, as Linux's nvme_timeout does.  See docs/nvme.md.
"""

from uvdma_nvme.controller import Controller, Namespace
from uvdma_nvme.errors import (
    CommandError,
    CommandTimeoutError,
    ControllerClosedError,
    ControllerGoneError,
    ControllerResetError,
    NvmeError,
)
from uvdma_nvme.pattern import pattern
from uvdma_nvme.queue import QueuePair, Request
from uvdma_nvme.spec import IoOpcode
from uvdma_nvme.status import status_name

IO_FLUSH, IO_WRITE, IO_READ = IoOpcode.FLUSH, IoOpcode.WRITE, IoOpcode.READ

__all__ = [
    "IO_FLUSH",
    "IO_READ",
    "IO_WRITE",
    "CommandError",
    "CommandTimeoutError",
    "Controller",
    "ControllerClosedError",
    "ControllerGoneError",
    "ControllerResetError",
    "IoOpcode",
    "Namespace",
    "NvmeError",
    "QueuePair",
    "Request",
    "pattern",
    "status_name",
]
