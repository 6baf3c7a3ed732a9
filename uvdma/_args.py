"""argparse types shared by the ``uvdma`` commands: nonsense is refused with a clear
message (argparse prints it with the usage and exits 2), never a traceback."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

_INT_RE = re.compile(r"[+-]?\d{1,30}")


def int_arg(lo: int, hi: int) -> Callable[[str], int]:
    """A whole number from ``lo`` to ``hi`` (decimal digits only: no 1e3, 0x10 or 1.5)."""

    def parse(text: str) -> int:
        t = text.strip()
        if not _INT_RE.fullmatch(t):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        n = int(t)
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, not {n}")
        return n

    parse.__name__ = "whole number"
    return parse
