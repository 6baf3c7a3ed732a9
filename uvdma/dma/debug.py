"""DMA-API debugging, after kernel/dma/debug.c (CONFIG_DMA_API_DEBUG).

On with ``UVDMA_DMA_DEBUG=1`` (and in uvdma's test suite).  Every allocation and
mapping is recorded with the call site that made it; a free with the wrong size or
handle, a double free, or an unmap of an unknown handle is reported naming that call
site; leaks are listed when the device closes; freed coherent memory is poisoned so a
use after free reads garbage instead of stale data.

The checks that keep pools intact (device, size and handle must match the allocation)
run always, on a plain dictionary per kind; debugging adds the call sites, the poison,
the record of where each handle was freed, and the leak report.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

from uvdma._sys import fill
from uvdma.errors import DmaApiError

POISON_FREE = 0x6B  # include/linux/poison.h: what freed memory is filled with
KINDS = ("coherent", "single", "sg")
_OPS = {"coherent": "dma_free_coherent", "single": "dma_unmap_single", "sg": "dma_unmap_sg"}

#: A live record: (cpu address, size, direction, call site, owner-specific data)
Record = tuple[int, int, int, str, Any]


def enabled_by_env() -> bool:
    """Whether UVDMA_DMA_DEBUG asks for debugging."""
    return os.environ.get("UVDMA_DMA_DEBUG", "") not in ("", "0")


def call_site() -> str:
    """``file:line in function`` of the nearest caller outside uvdma's DMA code."""
    here = f"{os.sep}uvdma{os.sep}dma{os.sep}"
    for frame in reversed(traceback.extract_stack()[:-1]):
        if here not in frame.filename:
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "unknown"


class DmaDebug:
    """The per-device record of live allocations and mappings."""

    def __init__(self, device_name: str, enabled: bool) -> None:
        self.device_name = device_name
        self.enabled = enabled
        self.live: dict[str, dict[int, Record]] = {k: {} for k in KINDS}
        self.freed: dict[tuple[str, int], str] = {}  # debugging: where each handle was freed

    def add(
        self, kind: str, dma: int, vaddr: int, size: int, direction: int = 0, extra: Any = None
    ) -> None:
        """Record an allocation or mapping."""
        site = ""
        if self.enabled:
            site = call_site()
            self.freed.pop((kind, dma), None)
        self.live[kind][dma] = (vaddr, size, direction, site, extra)

    def take(
        self,
        kind: str,
        dma: int,
        size: int,
        vaddr: int | None = None,
        direction: int | None = None,
    ) -> Record:
        """Remove and return the record a free or unmap refers to, or raise (changing
        nothing) naming what is wrong."""
        live = self.live[kind]
        rec = live.pop(dma, None)
        if (
            rec is not None
            and rec[1] == size
            and (vaddr is None or rec[0] == vaddr)
            and (direction is None or rec[2] == direction)
        ):
            if self.enabled:
                self.freed[(kind, dma)] = call_site()
                if len(self.freed) > 4096:
                    self.freed.pop(next(iter(self.freed)))
            return rec
        if rec is not None:
            live[dma] = rec  # put it back: nothing changes on a bad free
        raise self.mismatch(kind, dma, size, vaddr, direction, rec)

    def mismatch(
        self,
        kind: str,
        dma: int,
        size: int,
        vaddr: int | None,
        direction: int | None,
        rec: Record | None,
    ) -> DmaApiError:
        """The error for a free or unmap that matches no live record."""
        op = _OPS[kind]
        if rec is None:
            if (kind, dma) in self.freed:
                where = self.freed[(kind, dma)]
                return DmaApiError(
                    f"{self.device_name}: {op} of dma {dma:#x}: already freed at {where} "
                    "(a double free)"
                )
            return DmaApiError(
                f"{self.device_name}: {op} of dma {dma:#x} [size {size}]: this device has no "
                "such allocation or mapping (never made, or already freed: a double free)"
            )
        problems = []
        if size != rec[1]:
            problems.append(f"size {size}, allocated {rec[1]}")
        if vaddr is not None and vaddr != rec[0]:
            problems.append(f"cpu address {vaddr:#x}, allocated {rec[0]:#x}")
        if direction is not None and direction != rec[2]:
            problems.append(f"direction {direction}, mapped with {rec[2]}")
        site = f" (allocated at {rec[3]})" if rec[3] else ""
        return DmaApiError(
            f"{self.device_name}: {op} of dma {dma:#x} does not match the allocation: "
            + "; ".join(problems)
            + site
        )

    def poison(self, vaddr: int, size: int) -> None:
        """Fill freed memory with POISON_FREE when debugging."""
        if self.enabled:
            fill(vaddr, POISON_FREE, size)

    def leaks(self) -> list[tuple[str, int, Record]]:
        """What is still allocated or mapped: (kind, dma, record)."""
        return [(k, dma, rec) for k in KINDS for dma, rec in self.live[k].items()]

    def report_leaks(self) -> list[str]:
        """One line per leak, printed to stderr when debugging is on; returns the lines."""
        lines = [
            f"DMA-API: {self.device_name}: leaked {kind} dma {dma:#x} size {rec[1]}"
            + (f", allocated at {rec[3]}" if rec[3] else "")
            for kind, dma, rec in self.leaks()
        ]
        if self.enabled:
            for line in lines:
                print(line, file=sys.stderr)
        return lines
