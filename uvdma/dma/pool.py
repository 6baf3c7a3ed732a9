"""The DMA atomic pools: kernel/dma/pool.c, for callers that cannot block.

Three pools, ``dma``, ``dma32`` and ``kernel``, each a :class:`~uvdma.genalloc.GenPool`
of page granularity using ``first_fit_order_align``, over memory mapped at IOVAs in
that pool's zone.  A caller that cannot block (no system call allowed) is served from
them; when an allocation leaves a pool with less than ``atomic_pool_size`` available,
expansion is scheduled on a background worker, as pool.c schedules its work item: the
worker adds a chunk the size of the pool, trying smaller orders when memory is short.

User space differs in one way: the kernel's pools are per system, these belong to an
IOMMU domain, because the IOVA space (the "physical" addresses devices see) is per
domain.  Everything else keeps pool.c's names and order: ``dma_guess_pool``'s choice
and fallback, the ``phys_addr_ok`` check with the memory given back if it fails,
zeroing, ``dma_free_from_pool`` answering False for memory that is not from a pool, and
sizes reported as debugfs's ``dma_pools/pool_size_{dma,dma32,kernel}``.

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
import re
import threading
from collections.abc import Callable

from uvdma._sys import RAW as _RAW
from uvdma._sys import WINDOW_BASE as _WINDOW_BASE
from uvdma._sys import ZEROS as _ZEROS
from uvdma._sys import zero
from uvdma.dma.gfp import MAX_PAGE_ORDER, PAGE_SHIFT, Gfp, get_order
from uvdma.dma.pages import PageAllocator
from uvdma.errors import UvdmaError
from uvdma.genalloc import GenPool, first_fit_order_align
from uvdma.memory.iova import Zone

SZ_128K = 128 << 10
SZ_1G = 1 << 30
MAX_ORDER_NR_PAGES = 1 << MAX_PAGE_ORDER
_MEMPARSE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+)\s*([kKmMgGtTpPeE]?)\s*$")

PhysAddrOk = Callable[[int, int], bool]  # (dma address, size) -> acceptable?
log = logging.getLogger(__name__)


def memparse(text: str) -> int:
    """``memparse``: ``512K``, ``4M``, ``1G``, or a plain number of bytes."""
    m = _MEMPARSE.match(text)
    if not m:
        raise UvdmaError(
            f"cannot read the size {text!r} (coherent_pool / UVDMA_COHERENT_POOL): "
            "write a number with K, M or G, e.g. 512K"
        )
    shift = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}[m.group(2).lower()]
    return int(m.group(1), 0) << shift


def default_pool_size(total_ram: int | None = None) -> int:
    """pool.c's default: 128 KiB per GiB of memory, at least 128 KiB, at most MAX_PAGE_ORDER."""
    if total_ram is None:
        total_ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    pages = (total_ram >> PAGE_SHIFT) // (SZ_1G // SZ_128K)
    pages = min(pages, MAX_ORDER_NR_PAGES)
    return max(pages << PAGE_SHIFT, SZ_128K)


def resolve_pool_size(coherent_pool: int | str | None = None) -> int:
    """The argument, else UVDMA_COHERENT_POOL, else the default."""
    if coherent_pool is None:
        coherent_pool = os.environ.get("UVDMA_COHERENT_POOL") or None
    if coherent_pool is None:
        return default_pool_size()
    size = memparse(coherent_pool) if isinstance(coherent_pool, str) else coherent_pool
    if size <= 0:
        raise UvdmaError(f"coherent_pool must be positive, not {size}")
    return size


_ZERO_MAX = len(_ZEROS)

_ZONE_OF = {"dma": Zone.DMA, "dma32": Zone.DMA32, "kernel": Zone.NORMAL}


class AtomicPools:
    """The three atomic pools of one IOMMU domain, and their refill worker."""

    def __init__(self, pages: PageAllocator, coherent_pool: int | str | None = None) -> None:
        self.pages = pages
        self.atomic_pool_size = resolve_pool_size(coherent_pool)
        self.pool_size = {"dma": 0, "dma32": 0, "kernel": 0}  # debugfs dma_pools/pool_size_*
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
        self.kernel = self._init_pool("kernel")
        self.dma = self._init_pool("dma")
        self.dma32 = self._init_pool("dma32")
        # dma_guess_pool's whole walk for each zone modifier, worked out once (the pools
        # never change after init) so the atomic path does not redo it per allocation.
        self.sequence: dict[int, tuple[GenPool, ...]] = {}
        for zone_bits in (0, int(Gfp.DMA), int(Gfp.DMA32)):
            seq: list[GenPool] = []
            pool = self.guess_pool(None, zone_bits)
            while pool is not None:
                seq.append(pool)
                pool = self.guess_pool(pool, zone_bits)
            self.sequence[zone_bits] = tuple(seq)

    def _init_pool(self, name: str) -> GenPool | None:
        """``__dma_atomic_pool_init``: None when no memory could be had (pool.c's pr_err)."""
        pool = GenPool(PAGE_SHIFT)
        pool.set_algo(first_fit_order_align)
        pool.name = name
        if not self._expand(pool, self.atomic_pool_size, name):
            pool.destroy()
            return None
        return pool

    def _expand(self, pool: GenPool, pool_size: int, name: str) -> bool:
        """``atomic_pool_expand``: add a chunk of ``pool_size`` bytes, or of smaller orders."""
        order = min(get_order(pool_size), MAX_PAGE_ORDER)
        while True:
            got = self.pages.alloc_pages(_ZONE_OF[name], order)
            if got is not None or order == 0:
                break
            order -= 1
        if got is None:
            return False
        size = 1 << (PAGE_SHIFT + order)
        pool.add_virt(got[0], got[1], size)
        self.pool_size[name] += size
        return True

    def _resize(self, pool: GenPool | None, name: str) -> None:
        """``atomic_pool_resize``."""
        if (
            pool is not None
            and pool.avail() < self.atomic_pool_size
            and self._expand(pool, pool.size(), name)
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
                for pool, name in (
                    (self.dma, "dma"),
                    (self.dma32, "dma32"),
                    (self.kernel, "kernel"),
                ):
                    if self._stop:
                        break
                    try:
                        self._resize(pool, name)
                    except Exception as e:  # reported, and the worker lives on
                        self._refill_failed(name, e)
            finally:
                if not self._work.is_set():
                    self._idle.set()

    def _refill_failed(self, name: str, e: Exception) -> None:
        self.refill_errors += 1
        self.last_refill_error = f"refilling the {name} atomic pool: {type(e).__name__}: {e}"
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

    def guess_pool(self, prev: GenPool | None, gfp: int) -> GenPool | None:
        """``dma_guess_pool``: the first pool to try for ``gfp``, then the fallbacks."""
        if prev is None:
            if gfp & Gfp.DMA:
                return self.dma or self.dma32 or self.kernel
            if gfp & Gfp.DMA32:
                return self.dma32 or self.dma or self.kernel
            return self.kernel or self.dma32 or self.dma
        if prev is self.kernel:
            return self.dma32 if self.dma32 is not None else self.dma
        if prev is self.dma32:
            return self.dma
        return None

    def _alloc_from(
        self, pool: GenPool, size: int, phys_addr_ok: PhysAddrOk | None
    ) -> tuple[int, int] | None:
        """``__dma_alloc_from_pool``."""
        got = pool.dma_alloc(size)  # gen_pool_alloc + gen_pool_virt_to_phys in one lookup
        if got is None:
            return None
        addr, phys = got
        if phys_addr_ok is not None and not phys_addr_ok(phys, size):
            pool.free(addr, size)
            return None
        if pool.avail() < self.atomic_pool_size:
            self.schedule_work()
        zero(addr, size)
        return addr, phys

    def alloc_from_pool(
        self, size: int, gfp: int, phys_addr_ok: PhysAddrOk | None = None
    ) -> tuple[int, int] | None:
        """``dma_alloc_from_pool``: (cpu address, dma address), or None when every pool
        that fits ``gfp`` is exhausted."""
        pool = self.guess_pool(None, gfp)
        while pool is not None:
            got = self._alloc_from(pool, size, phys_addr_ok)
            if got is not None:
                return got
            pool = self.guess_pool(pool, gfp)
        return None

    def alloc_atomic(
        self, size: int, zone_bits: int, limit: int
    ) -> tuple[int, int, GenPool] | None:
        """:meth:`alloc_from_pool` with ``dma_coherent_ok`` as ``phys_addr_ok`` (``dma + size
        - 1 <= limit``), written out for the atomic path; also returns the pool used."""
        for pool in self.sequence[zone_bits]:
            addr, phys = pool._alloc(size, first_fit_order_align, None, True)  # gen_pool_dma_alloc
            if not addr:
                continue
            if phys + size - 1 > limit:
                pool.free(addr, size)
                continue
            if pool._avail < self.atomic_pool_size:
                self.schedule_work()
            if size <= _ZERO_MAX:  # memset(addr, 0, size), inlined: see _sys.RAW
                o = addr - _WINDOW_BASE
                _RAW[o : o + size] = _ZEROS[:size]
            else:
                zero(addr, size)
            return addr, phys, pool
        return None

    def free_from_pool(self, start: int, size: int) -> bool:
        """``dma_free_from_pool``: False when ``start`` is not pool memory."""
        pool = self.guess_pool(None, 0)
        while pool is not None:
            if pool.has_addr(start, size):
                pool.free(start, size)
                return True
            pool = self.guess_pool(pool, 0)
        return False

    def stats(self) -> dict[str, int]:
        """debugfs ``dma_pools/``: ``pool_size_dma``, ``pool_size_dma32``, ``pool_size_kernel``."""
        return {f"pool_size_{k}": v for k, v in self.pool_size.items()}

    def refill_stats(self) -> dict[str, int | str | None]:
        """The refill worker: ``expansions`` done, ``refill_errors`` and the
        ``last_refill_error`` message (None when there has been none)."""
        return {
            "expansions": self.expansions,
            "refill_errors": self.refill_errors,
            "last_refill_error": self.last_refill_error,
        }

    def avail(self) -> dict[str, int]:
        """Bytes available in each pool now."""
        return {
            name: (pool.avail() if pool is not None else 0)
            for name, pool in (("dma", self.dma), ("dma32", self.dma32), ("kernel", self.kernel))
        }

    def close(self) -> None:
        """Stop the worker (waiting for a refill in progress). Idempotent."""
        self._stop = True
        self._work.set()
        if self._worker is not None:
            self._worker.join(timeout=60)
