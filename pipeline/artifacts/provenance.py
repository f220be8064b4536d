"""Provenance cards written into the header or metadata of every output file."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import numpy as np

import pipeline
from pipeline.config import config_hash


def git_commit() -> str:
    """The git commit of the checkout the package runs from, or 'unknown'."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(pipeline.__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@cache  # read once per process: every output of a step writes its provenance
def machine() -> str:
    """The processor model and the CPUs this process may use, e.g. 'AMD EPYC, 2 CPUs': with the
    package versions, what decides a trained network's bits (the processor's instruction set
    picks TensorFlow's kernels, and another summation order ends in another network)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                          if line.startswith("model name")), model)
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{' '.join(model.split())[:48]}, {cpus} CPUs"


def provenance(config: dict | None = None, *, device: str | None = None,
               timestamp: bool = True, **extra) -> dict[str, str]:
    """Provenance cards for every output: package version, config hash, git commit, seed,
    NumPy version, TensorFlow version (only if already imported: reading it must not import
    TF), the machine (:func:`machine`), device.

    Keys are at most 8 characters so they are valid FITS keywords. Set ``timestamp=False``
    for byte-identical reruns of outputs that are compared in tests.
    """
    cards = {
        "PKGVERS": pipeline.__version__,
        "GITCOMM": git_commit(),
        "PYVERS": platform.python_version(),
        "NPVERS": np.__version__,
        "MACHINE": machine(),
    }
    if config is not None:
        cards["CFGHASH"] = config_hash(config)
        cards["SEED"] = str(config.get("seed", ""))
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        cards["TFVERS"] = tf.__version__
    if device is not None:
        cards["DEVICE"] = device
    if timestamp:
        cards["DATE"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    cards.update({k.upper()[:8]: str(v) for k, v in extra.items()})
    return cards
