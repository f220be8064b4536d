"""Iterating over stars in batches, with a progress bar only on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Contiguous slices of ``range(n)`` of at most ``batch_size`` items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def progress(iterable, total: int, desc: str):
    """Wrap ``iterable`` in a tqdm bar on a terminal; unchanged (quiet logs) otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, file=sys.stderr)
    return iterable
