"""Argument types for the example programs: a bad number is a clear argparse error (exit
2, the option named), never a traceback."""

from __future__ import annotations

import argparse


def _number(text: str, kind: type[int] | type[float], what: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    n = int(_number(text, int, "a whole number"))
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not a whole number of at least 1")
    return n


def nonnegative_int(text: str) -> int:
    """An integer of at least 0."""
    n = int(_number(text, int, "a whole number"))
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative")
    return n


def positive_float(text: str) -> float:
    """A number above 0 (and not infinite or NaN)."""
    x = float(_number(text, float, "a number"))
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number above 0")
    return x


def mask_bits(text: str) -> int:
    """A DMA mask width the DMA API accepts: 24 to 64 bits."""
    n = int(_number(text, int, "a whole number"))
    if not 24 <= n <= 64:
        raise argparse.ArgumentTypeError(
            f"{n} bits: a DMA mask is 24 to 64 bits wide (the kernel's narrowest is 24)"
        )
    return n
