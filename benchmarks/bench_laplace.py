"""Laplace benchmarks: curvature and the whole posterior fit against baselines.

* ``ggn_vs_matmul_floor``: head-only GGN of the last 2 layers (per-sample Jacobians + float64
  accumulation) against the bare float64 product J^T J of precomputed Jacobians, the floor of
  any GGN computation.
* ``laplace_fit_vs_epoch``: the whole ``fit_laplace`` (features, curvature, evidence fit,
  Cholesky, eigenvalues) against one training epoch (Adam, batch 64) on the same stars.

The float64 Cholesky timings (CPU and GPU, last-2 and last-3-layer sizes) are in
benchmarks/bench_cholesky.py.

    python -m benchmarks.bench_laplace [--quick]
"""

from __future__ import annotations

import os
import sys

import numpy as np

from benchmarks.common import best_time, row

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _row(name, value, baseline, target, unit="s"):
    ratio = value / baseline
    return row(name, value, baseline, unit, ratio, target, bool(ratio <= target))


def _model(n_pix, hidden, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    layers = [keras.Input((n_pix,))] + [keras.layers.Dense(h, "relu") for h in hidden]
    return keras.Sequential(layers + [keras.layers.Dense(3)])


def bench_curvature(quick: bool) -> dict:
    from pipeline.laplace.curvature import Head, ggn_blocks

    n, hidden = (512, [64, 128, 32]) if quick else (4096, [256, 128, 32])
    rng = np.random.default_rng(0)
    model = _model(200, hidden)
    head = Head(model, 2)
    phi = head.features(rng.normal(size=(n, 200)).astype(np.float32))
    jac = head.jacobian(phi)[0]
    ggn_blocks(head, phi[:256])  # trace once
    value = best_time(lambda: ggn_blocks(head, phi), 2)
    jk = np.swapaxes(jac.numpy(), 0, 1)
    floor = best_time(lambda: [j.T @ j for j in jk], 2)
    return _row(f"ggn_last2_vs_matmul_floor (N={n}, P_L={head.n_params})", value, floor, 3.0)


def bench_fit(quick: bool) -> dict:
    from pipeline.laplace import fit_laplace

    n, n_pix, hidden = (512, 500, [128, 64, 32]) if quick else (4096, 7213, [2048, 1024, 512,
                                                                           256, 128, 32])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, n_pix)).astype(np.float32)
    y = rng.normal(size=(n, 3)).astype(np.float32)
    model = _model(n_pix, hidden)
    model.compile("adam", "mse")
    model.fit(x[:64], y[:64], epochs=1, batch_size=64, verbose=0)  # build and trace
    epoch = best_time(lambda: model.fit(x, y, epochs=1, batch_size=64, verbose=0), 1)
    fit = best_time(lambda: fit_laplace(model, x, y, last_layers=2, device="cpu"), 1)
    # the issue asks for this ratio, with no target: reported, not judged
    return row(f"laplace_fit_vs_epoch (N={n}, P={n_pix})", fit, epoch, "s", fit / epoch,
               "report", None)


def run(quick: bool = False) -> list[dict]:
    """Benchmark rows {'benchmark', 'value', 'baseline', 'ratio', 'target', 'unit', 'ok'}."""
    return [bench_curvature(quick), bench_fit(quick)]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()))
