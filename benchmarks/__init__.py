"""Speed and memory benchmarks, each a ratio against a naive baseline measured in the same run."""

import pipeline  # noqa: F401, E402 (its OpenBLAS thread timeout, set before NumPy loads)
