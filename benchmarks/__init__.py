"""Speed and memory benchmarks, each a ratio against a naive baseline measured in the same run."""
