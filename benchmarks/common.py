"""Helpers shared by the benchmark modules: robust timing and the result row format."""

from __future__ import annotations

import time


def best_time(fn, repeat: int = 3) -> float:
    """Smallest wall time of ``repeat`` calls of ``fn()`` (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def row(name, value, baseline, unit, ratio, target, ok) -> dict:
    """One result row, as benchmarks/run.py tabulates it."""
    return {"benchmark": name, "value": value, "baseline": baseline, "unit": unit,
            "ratio": ratio, "target": target, "ok": ok}
