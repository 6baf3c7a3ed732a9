"""An NVMe controller driven from user space through VFIO: bring-up, admin commands, I/O
queues, recovery (abort, reset) and shutdown (NVMe 2.0, 3.5 and 3.6; Linux's
drivers/nvme/host/pci.c for the recovery path)."""

from __future__ import annotations

import contextlib
import math
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from uvdma.dma import (
    DMA_ATTR_SKIP_CPU_SYNC,
    DMA_BIT_MASK,
    DMA_TO_DEVICE,
    DmaBuffer,
    DmaDevice,
    DmaDomain,
    dma_map_single,
    dma_pool_create,
    dma_set_mask_and_coherent,
    dma_unmap_single,
    dma_unmap_single_attrs,
)
from uvdma.dma.gfp import DmaDataDirection
from uvdma.errors import ClosedError, UvdmaError
from uvdma.vfio import Bar, VfioDevice, open_device
from uvdma.vfio.faults import IommuFault, IommuFaultLog
from uvdma_nvme.errors import (
    CommandError,
    CommandTimeoutError,
    ControllerClosedError,
    ControllerGoneError,
    ControllerResetError,
    NvmeError,
)
from uvdma_nvme.queue import DONE, FAILED, INFLIGHT, LOST, QueuePair, Request, _integer, _Transfer
from uvdma_nvme.spec import (
    ALL_ONES,
    AQA,
    CAP,
    CC,
    CSTS,
    CSTS_CFS,
    CSTS_RDY,
    NSID_ALL,
    PAGE,
    SHN_NORMAL,
    SHST_COMPLETE,
    AdminOpcode,
    Cns,
    ErrorLogEntry,
    Feature,
    IdentifyController,
    IdentifyNamespace,
    LogPage,
    Reg,
    SmartLog,
    text,
    u128,
)
from uvdma_nvme.status import SC_ABORT_REQUESTED

PCI_COMMAND, PCI_COMMAND_MASTER = 0x04, 0x4  # PCI Local Bus 3.0, 6.2.2: Command register
MAX_QUEUES = 65535  # NVMe 2.0, 5.27.1.5: NSQR/NCQR are 16-bit, 0's based
DEFAULT_IO_QUEUES = 1024  # asked for at enable (SPDK's default); created only on request


@dataclass(frozen=True)
class Namespace:
    """An active namespace (Identify Namespace, NVM command set 1.0, 4.1.5.1)."""

    nsid: int
    blocks: int  # NSZE
    lba_size: int

    @property
    def size(self) -> int:
        """Bytes."""
        return self.blocks * self.lba_size


# The Controller driving each open VfioDevice (by id: the Controller holds its device, so the
# id cannot be reused while the entry lives; weak, so a dropped Controller drops out).
_owners: weakref.WeakValueDictionary[int, Controller] = weakref.WeakValueDictionary()
_owners_lock = threading.Lock()


class Controller:
    """An NVMe controller driven from user space through VFIO.

    Public methods may be called from several threads.  After :meth:`close` (or after the
    kernel asked for the device back) every method raises :class:`ControllerClosedError`.

    The controller makes its own :class:`~uvdma.dma.DmaDomain` over the device's IOMMU
    domain (``dma_domain``; ``coherent_pool`` sizes its atomic pools, as the kernel's boot
    parameter does) and closes it with the device: one per controller, never shared
    silently with another user of that IOMMU domain.
    """

    def __init__(
        self,
        vfio: VfioDevice,
        *,
        dma_bits: int = 64,
        admin_depth: int = 32,
        interrupts: bool = False,
        command_timeout: float = 10.0,
        io_queues: int = DEFAULT_IO_QUEUES,
        coherent_pool: int | str | None = None,
    ) -> None:
        if not 2 <= admin_depth <= 4096:
            raise ValueError(f"admin_depth must be 2..4096, not {admin_depth}")
        if (
            not isinstance(command_timeout, (int, float))
            or isinstance(command_timeout, bool)
            or not 0 < command_timeout < math.inf
        ):
            raise ValueError(
                f"command_timeout must be a positive, finite number of seconds, "
                f"not {command_timeout!r}"
            )
        if not 1 <= io_queues <= MAX_QUEUES:
            raise ValueError(f"io_queues must be 1..{MAX_QUEUES}, not {io_queues}")
        self.vfio = vfio
        self.address = str(vfio.address)
        self.interrupts = interrupts
        self.command_timeout = command_timeout
        self.io_queues_wanted = io_queues
        self._lock = threading.RLock()  # configuration, recovery and close
        self._failed: NvmeError | None = None  # set when the controller cannot be used
        self._closed = False
        self._resets = 0
        self._resetting = False
        self._worker: str | None = None  # in a worker process: which (see become_worker)
        self._transfers: set[_Transfer] = set()
        self._quarantine: list[_Transfer] = []
        self.io_queues: list[QueuePair] = []
        self.queues_granted = 0
        self.max_transfer = PAGE  # until Identify Controller reports MDTS
        self.leaks: list[str] = []
        self.resets: list[str] = []  # why each reset happened
        with _owners_lock:  # one Controller per device: a second would reset it under us
            owner = _owners.get(id(vfio))
            if owner is not None and not owner._closed:
                raise NvmeError(
                    f"controller {self.address} is already driven by another Controller in "
                    "this process: close that one first, or share it (its methods may be "
                    "called from several threads)"
                )
            _owners[id(vfio)] = self
        self.bar: Bar = vfio.bar(0)
        # the kernel asking for the device back (uvdma unbind, hot-unplug) shuts us down
        vfio.on_release_request(self._release_requested)
        self.fault_log = IommuFaultLog(vfio.address)  # what the IOMMU blocked, from now on
        # The controller's own DMA domain, made here and closed in _release_all: its page
        # allocator serves queues, PRP lists and bounce buffers; its atomic pools (sized by
        # coherent_pool, pool.c's default when None) serve GFP_ATOMIC callers.
        domain: DmaDomain | None = None
        try:
            domain = self.dma_domain = DmaDomain(vfio.domain, coherent_pool=coherent_pool)
            self.dma = DmaDevice(vfio, domain)
        except BaseException:  # a bad coherent_pool, no memory: give back what we took
            if domain is not None:
                domain.close()
            self.fault_log.close()
            vfio.on_release_request(None)
            self._disown()
            raise
        try:
            dma_set_mask_and_coherent(self.dma, DMA_BIT_MASK(dma_bits))
            raw = self.bar.read64(Reg.CAP)
            if raw == (1 << 64) - 1:
                raise ControllerGoneError(f"{self.address} reads all-ones: the device is gone")
            cap = self.cap = CAP.from_value(raw)
            self.mqes = cap.MQES + 1  # entries a queue may have
            self.timeout = max(cap.TO * 0.5, 0.5)  # CAP.TO is in 500 ms units
            self.dstrd = cap.DSTRD
            if not cap.CSS & 1:
                raise NvmeError("the controller does not support the NVM command set (CAP.CSS)")
            mpsmin = 1 << (12 + cap.MPSMIN)
            if mpsmin > PAGE:
                raise NvmeError(
                    f"the controller's smallest page is {mpsmin} bytes; this driver uses 4 KiB"
                )
            self.prp_pool = dma_pool_create("nvme-prp", self.dma, PAGE, PAGE, 0)
            if interrupts:
                vfio.enable_irqs(min(vfio.irq_info(2).count, 32))
            self.admin = QueuePair(self, 0, min(admin_depth, self.mqes), 0 if interrupts else None)
        except BaseException:
            self.leaks = self.dma.close()
            self.dma_domain.close()
            self.fault_log.close()
            self._disown()
            raise
        try:
            self._enable()
            ident = self.identify = self.identify_controller()
            # MDTS is in units of the minimum page size; 0: no limit (1 MiB here)
            mdts = ident.MDTS
            self.max_transfer = min(PAGE << mdts, 1 << 20) if mdts else 1 << 20
            self.nn = ident.NN
            self.serial, self.model, self.firmware = text(ident.SN), text(ident.MN), text(ident.FR)
            vs = self.bar.read32(Reg.VS)
            self.version = (vs >> 16, (vs >> 8) & 0xFF, vs & 0xFF)  # VS: MJR, MNR, TER
            self._set_queue_count()
        except BaseException:
            # a controller that never becomes ready (or answers nothing): give everything back
            self.close()
            raise

    @classmethod
    def open(cls, address: str, **kwargs: Any) -> Controller:
        """Open the controller at ``address`` (bound to vfio-pci) and bring it up."""
        vfio = open_device(address)
        try:
            return cls(vfio, **kwargs)
        except BaseException:
            vfio.close()
            raise

    # -- state -------------------------------------------------------------------------------
    def _unusable(self) -> NvmeError:
        """The error for a use of a controller that cannot be used (a fresh instance)."""
        failed = self._failed
        if failed is None:
            return ControllerClosedError(f"controller {self.address} is closed")
        return type(failed)(str(failed))

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise self._unusable()

    # -- worker processes (uvdma_nvme.jobs) ----------------------------------------------------
    def become_worker(self, name: str, queues: Sequence[QueuePair]) -> None:
        """In a child forked after bring-up: this process now drives ``queues`` and nothing
        else.  The parent keeps the admin queue, the DMA allocators and the controller's
        life: here admin commands, resets and DMA allocation are refused (an IOVA chosen
        here would collide with the parent's), an I/O timeout raises without recovery
        (the command stays outstanding; only the parent can abort or reset), and close()
        only forgets the device (the parent closes it).  See :mod:`uvdma_nvme.jobs`."""
        self._worker = name
        for q in self._all_queues():
            q._given = q not in queues
            q._owner = "the parent process" if q._given else name
            if q._given:
                q._stop()

    def hand_over(self, queues: Sequence[QueuePair], name: str) -> None:
        """In the parent: ``queues`` now belong to worker ``name``; using them here is an
        error (their state moves on in the worker's copy)."""
        for q in queues:
            with q._lock:
                q._given = True
                q._owner = name
                q._stop()

    def _check_admin_owner(self) -> None:
        if self._worker is not None:
            raise NvmeError(
                f"{self._worker}: admin commands are the parent process's (it owns the admin "
                "queue); a worker only does I/O on its own queues"
            )

    def _check_may_allocate(self, what: str) -> None:
        if self._worker is not None:
            raise NvmeError(
                f"{self._worker}: {what} cannot be allocated in a worker process (its IOVA "
                "would collide with the parent's); allocate before forking "
                "(QueuePair.reserve_prp_lists, DmaBuffers)"
            )

    def _check_health(self) -> None:
        """One register read: CSTS.CFS starts a reset, all-ones marks the controller gone
        (both retire the commands in flight)."""
        if self._failed is not None:
            raise self._unusable()
        csts = self.bar.read32(Reg.CSTS)
        if csts == ALL_ONES:
            self._gone(
                f"controller {self.address} reads all-ones: the device is gone "
                "(surprise removal or a dead link)"
            )
        elif csts & CSTS_CFS:
            self.reset("the controller reported a fatal status (CSTS.CFS)")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def _all_queues(self) -> list[QueuePair]:
        return [self.admin, *self.io_queues]

    @contextlib.contextmanager
    def _quiesced(self) -> Iterator[None]:
        """Hold the controller and every queue: nobody submits or reaps meanwhile."""
        with self._lock, contextlib.ExitStack() as stack:
            for q in self._all_queues():
                stack.enter_context(q._lock)
            yield

    # -- bring-up and shutdown (NVMe 2.0, 3.5.1 and 3.6) -------------------------------------
    def check_fatal(self) -> None:
        """CSTS.CFS at any point is a clear error (used during bring-up)."""
        csts = self.bar.read32(Reg.CSTS)
        if csts == ALL_ONES:
            raise ControllerGoneError(f"controller {self.address} reads all-ones: it is gone")
        if csts & CSTS_CFS:
            raise NvmeError("the controller reports a fatal status (CSTS.CFS)")

    def _wait_ready(self, ready: bool) -> None:
        deadline = time.monotonic() + self.timeout
        while bool(self.bar.read32(Reg.CSTS) & CSTS_RDY) != ready:
            self.check_fatal()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"CSTS.RDY did not become {int(ready)} within CAP.TO ({self.timeout} s)"
                )
            time.sleep(0.0005)

    def _disable(self) -> bool:
        """CC.EN = 0 and wait for CSTS.RDY = 0: the controller stops all DMA.  When it does
        not stop in CAP.TO (or reads all-ones), turn bus mastering off so it cannot DMA
        either way.  Returns whether the controller stopped by itself."""
        try:
            cc = CC.from_value(self.bar.read32(Reg.CC))
            if cc.EN:
                cc.EN = 0
                self.bar.write32(Reg.CC, cc.value)
            self._wait_ready(False)
            return True
        except (TimeoutError, NvmeError, UvdmaError):
            with contextlib.suppress(UvdmaError, OSError):
                cmd = self.vfio.config_read(PCI_COMMAND, 2)
                self.vfio.config_write(PCI_COMMAND, 2, cmd & ~PCI_COMMAND_MASTER)
            return False

    def _enable(self) -> None:
        self.vfio.enable_bus_master()
        if CC.from_value(self.bar.read32(Reg.CC)).EN:
            self.bar.write32(Reg.CC, 0)  # CC.EN = 0: reset, then wait CSTS.RDY = 0
        self._wait_ready(False)
        d = self.admin.depth - 1  # 0's based
        self.bar.write32(Reg.AQA, AQA(ASQS=d, ACQS=d).value)
        self.bar.write64(Reg.ASQ, self.admin.sq.dma_addr)
        self.bar.write64(Reg.ACQ, self.admin.cq.dma_addr)
        # 64-byte SQEs and 16-byte CQEs, 4 KiB pages, round robin, the NVM command set
        cc = CC(EN=1, CSS=0, MPS=0, AMS=0, SHN=0, IOSQES=6, IOCQES=4)
        self.bar.write32(Reg.CC, cc.value)
        self._wait_ready(True)

    def _set_queue_count(self) -> None:
        """Set Features Number of Queues, once per enable (NVMe 2.0, 5.27.1.5): ask for
        ``io_queues``; ``queues_granted`` is what the controller allows."""
        want = self.io_queues_wanted - 1
        dw0 = self.admin.run(
            AdminOpcode.SET_FEATURES,
            cdw=(Feature.NUMBER_OF_QUEUES, (want << 16) | want),  # NCQR, NSQR (0's based)
            what="Set Features Number of Queues",
        )
        self.queues_granted = min((dw0 & 0xFFFF) + 1, ((dw0 >> 16) & 0xFFFF) + 1, want + 1)

    def _create_on_device(self, q: QueuePair) -> None:
        vector = q.vector
        cq_flags = 0x1 | (0x2 if vector is not None else 0)  # PC=1, IEN when interrupts
        self.admin.run(
            AdminOpcode.CREATE_IO_CQ,
            prp1=q.cq.dma_addr,
            cdw=(((q.depth - 1) << 16) | q.qid, ((vector or 0) << 16) | cq_flags),
            what=f"Create I/O CQ {q.qid}",
        )
        try:
            self.admin.run(
                AdminOpcode.CREATE_IO_SQ,
                prp1=q.sq.dma_addr,
                cdw=(((q.depth - 1) << 16) | q.qid, (q.qid << 16) | 0x1),
                what=f"Create I/O SQ {q.qid}",
            )
        except CommandError:
            with contextlib.suppress(NvmeError, TimeoutError):
                self.admin.run(AdminOpcode.DELETE_IO_CQ, cdw=(q.qid,), what=f"delete CQ {q.qid}")
            raise

    def create_io_queues(self, count: int, depth: int = 256) -> list[QueuePair]:
        """Create ``count`` I/O CQ/SQ pairs of ``depth`` entries from the queues the
        controller granted; may be called again for more.  A failure frees what it took."""
        count = _integer(count, "queue count", "create_io_queues")
        depth = _integer(depth, "queue depth", "create_io_queues")
        if not 1 <= count <= MAX_QUEUES:
            raise NvmeError(f"create_io_queues: ask for 1..{MAX_QUEUES} queues, not {count}")
        if not 2 <= depth <= self.mqes:
            raise NvmeError(
                f"create_io_queues: depth {depth} is outside 2..{self.mqes} "
                "(a queue holds at least one command and at most CAP.MQES+1 entries)"
            )
        with self._lock:
            self._check_usable()
            self._check_admin_owner()
            left = self.queues_granted - len(self.io_queues)
            if count > left:
                raise NvmeError(
                    f"create_io_queues({count}): the controller granted "
                    f"{self.queues_granted} I/O queues and {len(self.io_queues)} exist: "
                    f"ask for at most {left}"
                )
            made: list[QueuePair] = []
            for _ in range(count):
                qid = len(self.io_queues) + 1
                irq = self.interrupts and qid < self.vfio.enabled_vectors()
                q = QueuePair(self, qid, depth, qid if irq else None)
                resets = self._resets
                try:
                    self._create_on_device(q)
                except BaseException:
                    if self._resets == resets or self._failed is None:
                        q._free_memory()  # the device never had the queue, or was reset
                    raise
                self.io_queues.append(q)
                made.append(q)
            return made

    # -- recovery (drivers/nvme/host/pci.c: nvme_timeout, nvme_reset_work) -------------------
    def _recover(self, q: QueuePair, req: Request, timeout: float) -> None:
        """``req`` timed out: abort it; if that does not complete it, reset.  Returns with
        ``req`` done (completed, or failed with the error to raise)."""
        what = f"{req.what} (cid {req.cid}) on queue {q.qid}: no completion within {timeout} s"
        with self._lock:
            if req.state == INFLIGHT:
                q.reap()
            if req.state != INFLIGHT:
                return  # completed meanwhile (the kernel's "completion polled")
            self._check_usable()
            if self._worker is not None:
                # the admin queue is the parent's: no abort, no reset from here.  The command
                # stays in flight (its slot and memory kept) until the parent closes.
                req.state = LOST
                req.error = CommandTimeoutError(
                    f"{what}; in {self._worker}, which cannot abort or reset (the parent "
                    "owns the admin queue): the command stays outstanding and its memory "
                    "is kept until it completes or the parent closes the controller"
                )
                return
            if self._resetting:  # a command of the reset itself: the reset fails
                req.state = FAILED
                req.error = CommandTimeoutError(f"{what}, during a reset")
                return
            if q.qid != 0 and not self._closed:
                try:
                    not_aborted = (
                        self.admin.run(
                            AdminOpcode.ABORT,
                            cdw=((req.cid << 16) | q.qid,),
                            what=f"Abort of cid {req.cid} on queue {q.qid}",
                            timeout=self.command_timeout,
                        )
                        & 1
                    )
                except (NvmeError, TimeoutError):
                    not_aborted = 1
                if not not_aborted:
                    deadline = time.monotonic() + self.command_timeout
                    while req.state == INFLIGHT and time.monotonic() < deadline:
                        if not q.reap():
                            time.sleep(0.0005)
                if req.state == DONE:
                    if req.status & 0x7FF == SC_ABORT_REQUESTED:  # SCT 0, SC 07h
                        req.state = FAILED
                        req.error = CommandTimeoutError(
                            f"{what}; it was aborted (Abort command), the device no longer "
                            "touches its memory",
                            aborted=True,
                        )
                    return
            if req.state == INFLIGHT:
                self.reset(f"{what}", culprit=req)

    def reset(self, reason: str, culprit: Request | None = None) -> None:
        """Reset the controller: disable it (all DMA stops), bring it back with the same I/O
        queues, so the QueuePair objects callers hold keep working, and fail every command
        that was in flight, naming it and ``reason``.  If it cannot be brought back it is
        marked gone and its commands say so."""
        with self._quiesced():
            self._check_usable()
            self._check_admin_owner()
            if self._resetting:  # a fault while bringing it back: the reset fails
                raise NvmeError(f"{reason}, during a reset of controller {self.address}")
            self._resetting = True
            try:
                self._reset(reason, culprit)
            finally:
                self._resetting = False

    def _reset(self, reason: str, culprit: Request | None) -> None:
        self._resets += 1
        self.resets.append(reason)
        stopped = self._disable()
        # The device does no DMA now.  The commands stay "in flight" in software until the
        # verdict below; nobody sees them meanwhile (every queue's lock is held).
        stale = [(q, r) for q in self._all_queues() for r in q._requests if r.state == INFLIGHT]
        for q in self._all_queues():
            q._reset_state()
        failure = ""
        if not stopped:
            failure = "it did not stop within CAP.TO; bus mastering is off"
        else:
            try:
                self._enable()
                self._set_queue_count()
                if self.queues_granted < len(self.io_queues):
                    raise NvmeError(
                        f"it now grants {self.queues_granted} I/O queues, fewer than the "
                        f"{len(self.io_queues)} in use"
                    )
                for q in self.io_queues:
                    self._create_on_device(q)
            except (NvmeError, TimeoutError, UvdmaError) as e:
                self._disable()
                failure = f"it did not come back: {e}"
        after = (
            f"controller {self.address} was reset ({reason}) and is gone: {failure}"
            if failure
            else f"controller {self.address} was reset ({reason})"
        )
        kind: type[NvmeError] = ControllerGoneError if failure else ControllerResetError
        for q, r in stale:
            r.state = FAILED
            if r is culprit:
                r.error = CommandTimeoutError(
                    f"{reason}; the abort did not complete it, so {after}: the command did not "
                    "finish and the device no longer touches its memory",
                    reset=True,
                )
            else:
                r.error = kind(
                    f"{r.what} (cid {r.cid}) on queue {q.qid}: failed: {after}; the command did "
                    "not finish and the device no longer touches its memory"
                )
        if failure:
            self._mark_gone(after)

    def _gone(self, reason: str) -> None:
        """The controller cannot be used any more: fail everything now; memory its commands
        could reach is kept until close(), when the IOMMU mappings go first."""
        with self._quiesced():
            self._mark_gone(reason)

    def _mark_gone(self, reason: str) -> None:
        """:meth:`_gone` for a caller that holds every lock already (a reset)."""
        if self._failed is None:
            self._failed = ControllerGoneError(reason)
        err = ControllerGoneError(f"failed: {reason}")
        for q in self._all_queues():
            q._retire(err)
        self._quarantine.extend(self._transfers)
        self._transfers.clear()

    # -- streaming mappings of read()/write() ------------------------------------------------
    def _map(self, buf: Any, size: int, direction: DmaDataDirection) -> _Transfer:
        """``dma_map_single`` of a read()/write() buffer, held by the controller while the
        device may reach it (close() can then release it whatever the caller does)."""
        with self._lock, self._closing_as_closed():
            self._check_usable()
            self._check_may_allocate("a streaming DMA mapping (read()/write() of a plain buffer)")
            t = _Transfer(dma_map_single(self.dma, buf, direction), size, direction)
            self._transfers.add(t)
            return t

    @contextlib.contextmanager
    def _closing_as_closed(self) -> Iterator[None]:
        """A uvdma object closing under a call (the controller closed from another thread,
        or released at the kernel's request) is the controller's own error."""
        try:
            yield
        except ClosedError:
            if self._failed is not None:
                raise self._unusable() from None
            raise

    def _let_go(self, t: _Transfer, *, copy_out: bool) -> None:
        """Unmap a transfer whose commands the device can no longer touch; what the device
        wrote is copied to the caller's buffer only when the transfer succeeded."""
        with self._lock:
            if t.released or t not in self._transfers:
                # quarantined (controller gone) or released by close() from another thread
                # after the device finished: what a read brought never reached the caller's
                # buffer, so the read must not look successful.
                if copy_out and t.direction != DMA_TO_DEVICE:
                    raise self._unusable()
                return
            self._transfers.discard(t)
            t.released = True
            if copy_out:
                dma_unmap_single(self.dma, t.handle, t.size, t.direction)
            else:
                _unmap_no_sync(self.dma, t)

    # -- close --------------------------------------------------------------------------------
    def close(self) -> None:
        """Delete the I/O queues, shut down normally (CC.SHN), free all DMA memory, close
        the VFIO device.  Runs to the end whatever the controller does. Idempotent."""
        self._close(ControllerClosedError(f"controller {self.address} is closed"))

    def _release_requested(self, _dev: VfioDevice) -> None:
        """The kernel wants the device back (VFIO's device request, from uvdma's watcher
        thread): shut down cleanly and let go; later calls say why."""
        self._close(
            ControllerClosedError(
                f"controller {self.address} was released: the kernel asked for the device "
                "back (uvdma unbind or hot-unplug); open it again once it is bound to vfio-pci"
            )
        )

    def _close(self, why: ControllerClosedError) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._worker is not None:
                # the parent owns the device and every allocation: touch neither
                self._failed = why
                for q in self._all_queues():
                    q._stop()
                return
            try:
                if self._failed is None:
                    self._shutdown()
            finally:
                with self._quiesced():
                    if self._failed is None:
                        self._failed = why
                    err = ControllerClosedError(f"failed: {why}")
                    for q in self._all_queues():
                        q._retire(err)
                    self._release_all()

    def _shutdown(self) -> None:
        with contextlib.suppress(NvmeError, TimeoutError, UvdmaError):
            for q in reversed(self.io_queues):
                if q.outstanding:
                    break  # deleting a busy queue aborts its commands; the reset below stops them
                for op, kind in (
                    (AdminOpcode.DELETE_IO_SQ, "SQ"),
                    (AdminOpcode.DELETE_IO_CQ, "CQ"),
                ):
                    self.admin.run(op, cdw=(q.qid,), what=f"delete {kind} {q.qid}", timeout=1)
        with contextlib.suppress(NvmeError, TimeoutError, UvdmaError):
            cc = CC.from_value(self.bar.read32(Reg.CC))
            cc.SHN = SHN_NORMAL
            self.bar.write32(Reg.CC, cc.value)
            deadline = time.monotonic() + self.timeout
            while CSTS.from_value(self.bar.read32(Reg.CSTS)).SHST != SHST_COMPLETE:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.001)

    def _release_all(self) -> None:
        """The device can no longer touch anything (disabled, or bus mastering off): give
        every piece of memory back, then the VFIO device."""
        with contextlib.ExitStack() as stack:
            stack.callback(self._disown)  # runs last
            stack.callback(self.vfio.close)
            stack.callback(self.fault_log.close)

            def dma_close() -> None:
                try:
                    self.leaks = self.dma.close()
                finally:
                    self.dma_domain.close()  # its memory: unmapped, then freed

            stack.callback(dma_close)
            # The VfioDevice closed first (its IOMMU domain, and the DMA memory, went with it):
            # nothing is left to free one by one, and nothing left to disable through BAR0.
            gone = self.dma.dma_domain.closed
            if not gone:
                stack.callback(self.prp_pool.destroy)
                for q in self._all_queues():
                    stack.callback(q._free_memory)
            for t in [*self._transfers, *self._quarantine]:
                if not t.released:
                    t.released = True
                    if not gone:
                        stack.callback(_unmap_no_sync, self.dma, t)
            self._transfers.clear()
            self._quarantine.clear()
            if not gone:
                stack.callback(self._disable)  # runs first

    def _disown(self) -> None:
        with _owners_lock:
            if _owners.get(id(self.vfio)) is self:
                del _owners[id(self.vfio)]

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def iommu_faults(self, wait: float = 0.0) -> list[IommuFault]:
        """DMA the IOMMU blocked for this controller since the last call (the kernel log).

        A controller may complete a command whose DMA was blocked with success (QEMU
        7.2's does); this is how the driver learns of it.  The kernel logs faults from an
        interrupt of its own, a moment after: ``wait`` gives them that moment.
        """
        self._check_usable()
        return self.fault_log.faults(wait)

    # -- admin commands ----------------------------------------------------------------------
    def _admin_data(
        self, opcode: int, nsid: int, cdw: Sequence[int], what: str, size: int = PAGE
    ) -> bytes:
        self._check_usable()
        self._check_admin_owner()
        with self._closing_as_closed(), DmaBuffer(self.dma, size) as buf:
            self.admin.run(opcode, nsid, buf.dma, 0, cdw, what)
            return bytes(buf.cpu)

    def identify_controller(self) -> IdentifyController:
        """Identify Controller (CNS 01h)."""
        data = self._admin_data(AdminOpcode.IDENTIFY, 0, (Cns.CONTROLLER,), "Identify Controller")
        return IdentifyController.from_buffer_copy(data)

    def active_namespaces(self) -> list[int]:
        """Identify Active Namespace ID list (CNS 02h)."""
        data = self._admin_data(
            AdminOpcode.IDENTIFY, 0, (Cns.ACTIVE_NAMESPACES,), "Identify Active Namespaces"
        )
        ids = np.frombuffer(data, dtype="<u4")
        return [int(n) for n in ids[ids != 0]]

    def identify_namespace(self, nsid: int) -> IdentifyNamespace:
        """Identify Namespace (CNS 00h) of an active namespace."""
        nsid = _integer(nsid, "namespace id", "namespace")
        active = self.active_namespaces()
        if nsid not in active:
            raise NvmeError(f"namespace {nsid} does not exist; active: {active}")
        data = self._admin_data(
            AdminOpcode.IDENTIFY, nsid, (Cns.NAMESPACE,), f"Identify Namespace {nsid}"
        )
        return IdentifyNamespace.from_buffer_copy(data)

    def namespace(self, nsid: int) -> Namespace:
        """The namespace for I/O; one that does not exist is a clear error."""
        ident = self.identify_namespace(nsid)
        return Namespace(int(nsid), ident.NSZE, 1 << ident.lba_format.LBADS)

    def log_page(self, lid: int, size: int) -> bytes:
        """Get Log Page (NVMe 2.0, 5.16) of ``size`` bytes, for every namespace."""
        numd = size // 4 - 1  # dwords, 0's based: NUMDL in CDW10 31:16, NUMDU in CDW11 15:0
        return self._admin_data(
            AdminOpcode.GET_LOG_PAGE,
            NSID_ALL,
            ((numd & 0xFFFF) << 16 | lid, numd >> 16),
            f"Get Log Page {lid:#x}",
            size,
        )

    def smart(self) -> SmartLog:
        """SMART / Health Information (log 02h)."""
        return SmartLog.from_buffer_copy(self.log_page(LogPage.SMART_HEALTH, 512))

    def error_log(self, entries: int = 4) -> list[ErrorLogEntry]:
        """Error Information log (01h): the non-empty entries of the first ``entries``."""
        data = self.log_page(LogPage.ERROR_INFORMATION, 64 * entries)
        log = (ErrorLogEntry * entries).from_buffer_copy(data)
        return [e for e in log if e.ERROR_COUNT]

    def health(self) -> dict[str, int]:
        """The SMART fields people look at, by name."""
        d = self.smart()
        return {
            "critical_warning": d.CRITICAL_WARNING,
            "temperature_k": d.COMPOSITE_TEMPERATURE,
            "available_spare_pct": d.AVAILABLE_SPARE,
            "percentage_used": d.PERCENTAGE_USED,
            "data_units_read": u128(d.DATA_UNITS_READ),
            "data_units_written": u128(d.DATA_UNITS_WRITTEN),
            "host_read_commands": u128(d.HOST_READ_COMMANDS),
            "host_write_commands": u128(d.HOST_WRITE_COMMANDS),
            "power_on_hours": u128(d.POWER_ON_HOURS),
        }

    def pool_stats(self) -> dict[str, int]:
        """The DMA atomic pools' sizes (debugfs dma_pools/)."""
        self._check_usable()
        return self.dma.dma_domain.pools.stats()


def _unmap_no_sync(dev: DmaDevice, t: _Transfer) -> None:
    """Unmap a failed transfer without copying what the device wrote into the caller's
    buffer (``DMA_ATTR_SKIP_CPU_SYNC``)."""
    dma_unmap_single_attrs(dev, t.handle, t.size, t.direction, DMA_ATTR_SKIP_CPU_SYNC)
