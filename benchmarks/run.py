"""Run every benchmark and print one table of ratios measured in this run.

    python -m benchmarks            # the full set (26-48 minutes on 2 idle cores)
    python -m benchmarks --quick    # smaller sizes, a smoke test
    python -m benchmarks --only jacobian --markdown benchmarks/RESULTS.md
    python -m benchmarks --only shift --model-dir results/model \
        --posterior results/laplace/posterior.npz --configfile config/config.yaml

Each module ``benchmarks/bench_*.py`` runs in its own interpreter and exposes
``run(quick: bool) -> list[dict]`` with rows
``{"benchmark", "value", "baseline", "ratio", "target", "unit", "ok"}``. Absolute times depend
on the machine; the ratios against the naive baseline measured in the same run are the result.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))


def machine() -> str:
    cpus = os.cpu_count()
    gpu = "no GPU"
    try:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            gpu = f"{len(gpus)} GPU ({details.get('device_name', 'GPU')})"
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {cpus} cores, {gpu}, Python {platform.python_version()}"


def fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else str(x)


def table(rows: list[dict]) -> str:
    cols = ["benchmark", "value", "baseline", "unit", "ratio", "target", "ok"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def module_rows(name: str, quick: bool, given: dict) -> list[dict]:
    """The rows of ``benchmarks.<name>.run`` with the options of ``given`` it accepts."""
    module = importlib.import_module(f"benchmarks.{name}")
    accepted = inspect.signature(module.run).parameters
    return module.run(quick=quick, **{k: v for k, v in given.items() if k in accepted})


def isolated_rows(name: str, quick: bool, given: dict) -> list[dict]:
    """:func:`module_rows` in a fresh interpreter. Benchmarks that run pipeline steps in
    their process leave process-wide TensorFlow state behind (op determinism, which makes
    Keras drop ``jit_compile``; the XLA setting of the Jacobian pass), and in one process
    that state changed the timings of the modules after them."""
    with tempfile.TemporaryDirectory(prefix="bench-rows-") as tmp:
        out = Path(tmp) / "rows.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)}
        subprocess.run([sys.executable, "-c", _CHILD, name, json.dumps(quick),
                        json.dumps(given), str(out)], check=True, env=env)
        return json.loads(out.read_text())


_CHILD = """import json, sys
from benchmarks.run import module_rows
rows = module_rows(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]))
with open(sys.argv[4], "w") as f:
    json.dump(rows, f, default=lambda x: x.item() if hasattr(x, "item") else str(x))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--only", action="append", default=[], help="run modules matching this")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    run_args = parser.add_argument_group(
        "an existing run, for the benchmarks that measure a trained model (shift)")
    run_args.add_argument("--model-dir", help="trained model directory")
    run_args.add_argument("--posterior", help="its Laplace posterior (.npz)")
    run_args.add_argument("--configfile", help="the run's configuration")
    args = parser.parse_args(argv)
    given = {k: getattr(args, k) for k in ("model_dir", "posterior", "configfile")
             if getattr(args, k) is not None}

    sys.path.insert(0, str(HERE.parent))
    rows: list[dict] = []
    t0 = time.perf_counter()
    for name in discover():
        if args.only and not any(o in name for o in args.only):
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += isolated_rows(name, args.quick, given)
    text = table(rows)
    print(text)
    elapsed = time.perf_counter() - t0
    if args.markdown:
        Path(args.markdown).write_text(
            f"# Benchmark results\n\nMachine: {machine()}\n\nCommand: `python -m benchmarks"
            f"{' --quick' if args.quick else ''}`, total {elapsed:.0f} s, "
            f"{time.strftime('%Y-%m-%d')}.\n\n{text}\n"
        )
    return 0 if all(r.get("ok", True) is not False for r in rows) else 1
