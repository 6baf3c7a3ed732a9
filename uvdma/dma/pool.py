"""The DMA atomic pools: kernel/dma/pool.c, for callers that cannot block.

Three pools, one per :class:`~uvdma.dma.zones.Zone` (debugfs names them ``dma``,
``dma32`` and ``kernel``), each a :class:`~uvdma.genalloc.GenPool` of page granularity
using ``first_fit_order_align``, over memory mapped at IOVAs in that pool's zone.  The
zone travels from init to the work function as pool.c carries its gfp.  A caller that
cannot block (no system call allowed) is served from them; when an allocation leaves a
pool with less than ``atomic_pool_size`` available, expansion is scheduled on a
background worker, as pool.c schedules its work item: the worker adds a chunk the size
of the pool, trying smaller orders when memory is short.

User space differs in one way: the kernel's pools are per system, these belong to a DMA
domain (:class:`~uvdma.dma.domain.DmaDomain` owns them), because the IOVA space (the
"physical" addresses devices see) is per IOMMU domain.  Everything else keeps pool.c's
names and order: ``dma_guess_pool``'s choice and fallback, one allocation path
(``dma_alloc_from_pool``) with the ``phys_addr_ok`` check and the memory given back if it
fails, zeroing, ``dma_free_from_pool`` answering False for memory that is not from a
pool, and sizes reported as debugfs's ``dma_pools/pool_size_{dma,dma32,kernel}``.

The worker, like pool.c's ``atomic_pool_work_fn``, refills every pool on each pass.  A
refill that fails (no memory, a closed domain, any exception) does not skip the other
pools and never ends the worker: it is logged (logger ``uvdma.dma.pool``), counted in
``refill_errors`` with its message in ``last_refill_error`` (both in
:meth:`AtomicPools.refill_stats`), and retried when an allocation next finds the pool
low.  :meth:`AtomicPools.close` stops the worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import NamedTuple

from uvdma._args import parse_size
from uvdma._sys import zero
from uvdma.dma.gfp import MAX_PAGE_ORDER, PAGE_SHIFT, get_order
from uvdma.dma.pages import PageAllocator
from uvdma.dma.zones import Zone
from uvdma.errors import SizeError, UvdmaError
from uvdma.genalloc import GenPool, first_fit_order_align

SZ_128K = 128 << 10
SZ_1G = 1 << 30
MAX_ORDER_NR_PAGES = 1 << MAX_PAGE_ORDER
ENV = "UVDMA_COHERENT_POOL"

PhysAddrOk = Callable[[int, int], bool]  # (dma address, size) -> acceptable?
log = logging.getLogger(__name__)


class PoolBlock(NamedTuple):
    """What :meth:`AtomicPools.alloc_from_pool` hands out, and the pool it came from (so
    the free need not search)."""

    cpu_addr: int
    dma_handle: int
    pool: GenPool


def default_pool_size(total_ram: int | None = None) -> int:
    """pool.c's default: 128 KiB per GiB of memory, at least 128 KiB, at most MAX_PAGE_ORDER."""
    if total_ram is None:
        total_ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    pages = (total_ram >> PAGE_SHIFT) // (SZ_1G // SZ_128K)
    pages = min(pages, MAX_ORDER_NR_PAGES)
    return max(pages << PAGE_SHIFT, SZ_128K)


def resolve_pool_size(coherent_pool: int | str | None = None) -> int:
    """The argument, else UVDMA_COHERENT_POOL, else the default.  Text is read as the
    kernel reads ``coherent_pool=`` (memparse); 0 means the default, as in pool.c."""
    if coherent_pool is None:
        coherent_pool = os.environ.get(ENV) or None
    if isinstance(coherent_pool, str):
        coherent_pool = parse_size(coherent_pool, f"coherent_pool / {ENV}")
    if coherent_pool is None or coherent_pool == 0:
        return default_pool_size()
    if coherent_pool < 0:
        raise SizeError(
            f"coherent_pool must be a size in bytes (0: the default), not {coherent_pool}"
        )
    return coherent_pool


class AtomicPools:
    """The three atomic pools of one DMA domain, and their refill worker."""

    def __init__(self, pages: PageAllocator, coherent_pool: int | str | None = None) -> None:
        self.pages = pages
        self.atomic_pool_size = resolve_pool_size(coherent_pool)
        self.pool_size = {z.value: 0 for z in Zone}  # debugfs dma_pools/pool_size_*, by name
        self._stop = False
        self._work = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self.expansions = 0
        self.refill_errors = 0  # refills that raised, all pools together
        self.last_refill_error: str | None = None
        # dma_atomic_pool_init: kernel, then dma, then dma32
        self.kernel = self._init_pool(Zone.NORMAL)
        self.dma = self._init_pool(Zone.DMA)
        self.dma32 = self._init_pool(Zone.DMA32)
        # dma_guess_pool's whole walk for each zone, worked out once (the pools never
        # change after init) so an allocation does not redo it.
        self.sequence: dict[Zone, tuple[GenPool, ...]] = {}
        for zone in Zone:
            seq: list[GenPool] = []
            pool = self.guess_pool(None, zone)
            while pool is not None:
                seq.append(pool)
                pool = self.guess_pool(pool, zone)
            self.sequence[zone] = tuple(seq)

    def _pools(self) -> tuple[tuple[Zone, GenPool | None], ...]:
        return ((Zone.DMA, self.dma), (Zone.DMA32, self.dma32), (Zone.NORMAL, self.kernel))

    def _init_pool(self, zone: Zone) -> GenPool | None:
        """``__dma_atomic_pool_init``: None when no memory could be had (pool.c's pr_err)."""
        pool = GenPool(PAGE_SHIFT)
        pool.set_algo(first_fit_order_align)
        pool.name = zone.value
        if not self._expand(pool, self.atomic_pool_size, zone):
            pool.destroy()
            return None
        return pool

    def _expand(self, pool: GenPool, pool_size: int, zone: Zone) -> bool:
        """``atomic_pool_expand``: add a chunk of ``pool_size`` bytes, or of smaller orders."""
        order = min(get_order(pool_size), MAX_PAGE_ORDER)
        while True:
            got = self.pages.alloc_pages(zone, order)
            if got is not None or order == 0:
                break
            order -= 1
        if got is None:
            return False
        pool.add_virt(got.cpu_addr, got.dma_addr, got.size)
        self.pool_size[zone.value] += got.size
        return True

    def _resize(self, pool: GenPool | None, zone: Zone) -> None:
        """``atomic_pool_resize``."""
        if (
            pool is not None
            and pool.avail() < self.atomic_pool_size
            and self._expand(pool, pool.size(), zone)
        ):
            self.expansions += 1

    def _work_fn(self) -> None:
        """``atomic_pool_work_fn``: every pool on every pass; a failure is reported and
        the next pool still gets its turn."""
        while True:
            self._work.wait()
            self._work.clear()
            if self._stop:
                return
            try:
                for zone, pool in self._pools():
                    if self._stop:
                        break
                    try:
                        self._resize(pool, zone)
                    except Exception as e:  # reported, and the worker lives on
                        self._refill_failed(zone, e)
            finally:
                if not self._work.is_set():
                    self._idle.set()

    def _refill_failed(self, zone: Zone, e: Exception) -> None:
        self.refill_errors += 1
        self.last_refill_error = f"refilling the {zone.value} atomic pool: {type(e).__name__}: {e}"
        with contextlib.suppress(Exception):  # a broken log handler must not end the worker
            log.warning(
                "uvdma: %s (retried when an allocation next finds the pool low)",
                self.last_refill_error,
                exc_info=not isinstance(e, UvdmaError),
            )

    def schedule_work(self) -> None:
        """``schedule_work(&atomic_pool_work)``: no system call on this path."""
        if self._worker is None:
            with self._worker_lock:
                if self._worker is None and not self._stop:
                    self._worker = threading.Thread(
                        target=self._work_fn, name="uvdma-atomic-pool", daemon=True
                    )
                    self._worker.start()
        self._idle.clear()
        self._work.set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until scheduled refills are done (``flush_work``); False on timeout."""
        return self._idle.wait(timeout)

    def guess_pool(self, prev: GenPool | None, zone: Zone) -> GenPool | None:
        """``dma_guess_pool``: the first pool to try for ``zone``, then the fallbacks."""
        if prev is None:
            if zone is Zone.DMA:
                return self.dma or self.dma32 or self.kernel
            if zone is Zone.DMA32:
                return self.dma32 or self.dma or self.kernel
            return self.kernel or self.dma32 or self.dma
        if prev is self.kernel:
            return self.dma32 if self.dma32 is not None else self.dma
        if prev is self.dma32:
            return self.dma
        return None

    def alloc_from_pool(
        self, size: int, zone: Zone, phys_addr_ok: PhysAddrOk | None = None
    ) -> PoolBlock | None:
        """``dma_alloc_from_pool``: zeroed memory from the first pool of ``zone``'s walk
        that has it and whose address ``phys_addr_ok`` accepts (``__dma_alloc_from_pool``
        gives a refused block back and tries the next pool); None when none does."""
        for pool in self.sequence[zone]:
            got = pool.dma_alloc(size)  # gen_pool_alloc + gen_pool_virt_to_phys in one lookup
            if got is None:
                continue
            addr, phys = got
            if phys_addr_ok is not None and not phys_addr_ok(phys, size):
                pool.free(addr, size)
                continue
            if pool.avail() < self.atomic_pool_size:
                self.schedule_work()
            zero(addr, size)
            return PoolBlock(addr, phys, pool)
        return None

    def free_from_pool(self, start: int, size: int) -> bool:
        """``dma_free_from_pool``: False when ``start`` is not pool memory."""
        for pool in self.sequence[Zone.NORMAL]:
            if pool.has_addr(start, size):
                pool.free(start, size)
                return True
        return False

    def stats(self) -> dict[str, int]:
        """debugfs ``dma_pools/``: ``pool_size_dma``, ``pool_size_dma32``, ``pool_size_kernel``."""
        return {f"pool_size_{z.value}": self.pool_size[z.value] for z, _ in self._pools()}

    def refill_stats(self) -> dict[str, int | str | None]:
        """The refill worker: ``expansions`` done, ``refill_errors`` and the
        ``last_refill_error`` message (None when there has been none)."""
        return {
            "expansions": self.expansions,
            "refill_errors": self.refill_errors,
            "last_refill_error": self.last_refill_error,
        }

    def avail(self) -> dict[str, int]:
        """Bytes available in each pool now, by pool name."""
        return {z.value: (p.avail() if p is not None else 0) for z, p in self._pools()}

    def close(self) -> None:
        """Stop the worker (waiting for a refill in progress). Idempotent."""
        self._stop = True
        self._work.set()
        if self._worker is not None:
            self._worker.join(timeout=60)
