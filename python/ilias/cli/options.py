"""Numeric options with their bounds, checked by argparse: a bad value is one line naming the
option and the range, before any work starts."""

from __future__ import annotations

import argparse

# more threads than this is a typo, not a machine (0 means all cores)
MAX_THREADS = 1024
# k beyond this is no longer a top k: its buffers alone would take tens of GB for ILIAS's 2,232 queries
MAX_K = 100_000


def whole(lo: int, hi: int | None = None):
    """An argparse type: a whole number from `lo` to `hi` (no upper bound when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", "").replace(",", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bounds = f"{lo:,} to {hi:,}" if hi is not None else f"at least {lo:,}"
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {value:,}")
        return value

    parse.__name__ = "whole number"
    return parse


THREADS = whole(0, MAX_THREADS)
K = whole(1, MAX_K)
POSITIVE = whole(1)
NON_NEGATIVE = whole(0)
SEED = whole(0, 2**64 - 1)


def number(lo: float, strict: bool = False):
    """An argparse type: a finite number at least `lo` (above it when `strict`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or (value <= lo if strict else value < lo):
            raise argparse.ArgumentTypeError(f"expected a finite number {'above' if strict else 'at least'} {lo:g}, got {text}")
        return value

    parse.__name__ = "number"
    return parse
