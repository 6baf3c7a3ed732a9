"""PRP lists as pure functions (NVMe 2.0, 4.1.1): where a transfer's pages are, how many
list pages it needs, and the lists themselves, each list page filled by C code in one run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from uvdma_nvme.spec import PAGE

PRP_ENTRIES = PAGE // 8  # entries in one PRP list page
# The addresses a list holds are a run: first + PAGE * i.  A run of up to _SHORT entries is
# one integer: first * R + S, where R has a 1 in each 64-bit field and S holds PAGE * i in
# field i (one multiply, one add and one to_bytes, in C, then one copy).  Longer runs are one
# numpy add of these offsets (its ~0.6-1 us call cost is spread over up to 511 pages; the
# integer's cost grows with its length and passes numpy's at about 48 entries).
_OFFSETS = np.arange(PRP_ENTRIES, dtype=np.uint64) * np.uint64(PAGE)
_RUNS = [_OFFSETS[:n] for n in range(PRP_ENTRIES + 1)]  # the views, made once
_SHORT = 48
_TERMS = [
    (sum(1 << (64 * i) for i in range(n)), sum((PAGE * i) << (64 * i) for i in range(n)))
    for n in range(_SHORT + 1)
]


class PrpPlan(NamedTuple):
    """Where a transfer's memory pages are: PRP1, then ``pages`` more pages starting at
    ``next_page`` (each the previous plus 4 KiB)."""

    prp1: int
    next_page: int
    pages: int


def plan_prps(dma: int, length: int) -> PrpPlan:
    """The pages a ``length``-byte transfer at ``dma`` touches, after the first."""
    first = PAGE - (dma % PAGE)
    if length <= first:
        return PrpPlan(dma, 0, 0)
    return PrpPlan(dma, dma - (dma % PAGE) + PAGE, (length - first + PAGE - 1) // PAGE)


def prp_list_pages_needed(pages: int) -> int:
    """PRP list pages for a transfer with ``pages`` pages after the first: none for one
    (PRP2 points at it), else lists of 512 entries whose last entry chains to the next."""
    if pages <= 1:
        return 0
    if pages <= PRP_ENTRIES:
        return 1
    return 1 + (pages - PRP_ENTRIES + PRP_ENTRIES - 2) // (PRP_ENTRIES - 1)


def fill_prp_lists(
    plan: PrpPlan,
    lists: Sequence[tuple[npt.NDArray[np.uint64], int]],
    scratch: npt.NDArray[np.uint64] | None = None,
) -> int:
    """Write the PRP list(s) of ``plan`` into ``lists`` ((entries view, dma) per page, as
    many as :func:`prp_list_pages_needed` says); returns PRP2.  ``scratch``: a 0-d uint64
    array the caller owns (one per queue, used under its lock), else one is made."""
    if plan.pages == 0:
        return 0
    if plan.pages == 1:
        return plan.next_page
    page, left = plan.next_page, plan.pages
    for i, (entries, _dma) in enumerate(lists):
        room = PRP_ENTRIES if left <= PRP_ENTRIES else PRP_ENTRIES - 1
        n = min(room, left)
        fill_run(entries, page, n, scratch)
        page += n * PAGE
        left -= n
        if left:
            entries[PRP_ENTRIES - 1] = lists[i + 1][1]  # chain to the next list
        else:
            break
    return lists[0][1]


def fill_run(
    entries: npt.NDArray[np.uint64],
    first: int,
    n: int,
    scratch: npt.NDArray[np.uint64] | None = None,
    raw: memoryview | None = None,
) -> None:
    """``entries[:n] = first, first + 4 KiB, ...`` in C: for a short run one integer's
    bytes copied in; for a long one a numpy add (after one store of ``first`` into the 0-d
    ``scratch``: numpy adds an array faster than it converts a Python int).  ``raw``: the
    same memory as bytes, kept by the caller (making the view costs more than the copy)."""
    if n <= _SHORT:
        ones, steps = _TERMS[n]
        if raw is None:
            raw = entries.data.cast("B")
        raw[: n * 8] = (first * ones + steps).to_bytes(n * 8, "little")
        return
    if scratch is None:
        scratch = np.zeros((), dtype=np.uint64)
    scratch[()] = first
    np.add(_RUNS[n], scratch, out=entries[:n])
