"""Parsing shared by uvdma's settings and commands: sizes as the kernel reads them, and
argparse types that refuse nonsense with a clear message (argparse prints it with the
usage and exits 2), never a traceback."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import NamedTuple

from uvdma.errors import SizeError

_INT_RE = re.compile(r"[+-]?\d{1,30}")
# simple_strtoull with base 0 (lib/kstrtox.c _parse_integer_fixup_radix): "0x" before a hex
# digit is hexadecimal, any other leading 0 octal, else decimal; no sign, no blanks.
_HEX = re.compile(r"0[xX]([0-9a-fA-F]+)")
_OCT = re.compile(r"0([0-7]*)")
_DEC = re.compile(r"[0-9]+")
# memparse's switch: each suffix falls through to the next smaller one
_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
U64_MAX = (1 << 64) - 1


class Memparse(NamedTuple):
    """What :func:`memparse` read: the ``value`` and the text after it (``retptr``)."""

    value: int
    rest: str


def memparse(text: str) -> Memparse:
    """``memparse`` (lib/cmdline.c): a number with an optional K, M, G, T, P or E suffix
    (either case, binary units); ``0x`` prefixes hexadecimal and a leading ``0`` octal.

    As in the kernel, reading stops at the first character that does not belong (what
    follows is returned in ``rest`` and otherwise ignored: ``"1.5G"`` is 1), and text with
    no number is 0 with ``rest`` the whole text.  Unlike the kernel, which wraps at 2**64,
    the value is exact; callers refuse what is too large (:func:`parse_size` does).
    """
    m = _HEX.match(text)
    if m:
        value, end = int(m.group(1), 16), m.end()
    else:
        m = _OCT.match(text) or _DEC.match(text)
        if m is None:
            return Memparse(0, text)
        value, end = int(m.group(0), 8 if m.group(0).startswith("0") else 10), m.end()
    shift = _SHIFT.get(text[end : end + 1].lower())
    if shift is not None:
        value <<= shift
        end += 1
    return Memparse(value, text[end:])


def parse_size(text: str, what: str, example: str = "512K") -> int:
    """A size for the setting ``what``, read by :func:`memparse`: text that starts with no
    number, or a size past 2**64 - 1, raises :class:`~uvdma.errors.SizeError` naming
    ``what`` and showing ``example``; trailing text is ignored, as the kernel ignores it."""
    value, rest = memparse(text)
    if rest == text:
        raise SizeError(
            f"cannot read the size {text!r} ({what}): write a number with K, M, G, T, P or "
            f"E, e.g. {example}"
        )
    if value > U64_MAX:
        raise SizeError(
            f"the size {text!r} ({what}) is past 2**64 - 1 bytes (the kernel would wrap it): "
            f"write a real size with K, M, G, T, P or E, e.g. {example}"
        )
    return value


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


def seconds_arg(hi: float) -> Callable[[str], float]:
    """A number of seconds above 0 and at most ``hi`` (no nan, no infinity)."""

    def parse(text: str) -> float:
        try:
            s = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not 0 < s <= hi:  # nan fails both comparisons
            raise argparse.ArgumentTypeError(f"must be above 0 and at most {hi:g}, not {text}")
        return s

    parse.__name__ = "seconds"
    return parse
