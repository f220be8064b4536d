"""Laplace benchmarks: curvature and the whole posterior fit against baselines.

* ``ggn_vs_matmul_floor``: head-only GGN of the last 2 layers (per-sample Jacobians + float64
  accumulation) against the bare float64 product J^T J of precomputed Jacobians, the floor of
  any GGN computation.
* evidence fit: ``pipeline.laplace.evidence.fit_evidence`` with the fixed-point solver against
  the former L-BFGS solver (``laplace.evidence_solver: lbfgs``) on the same curvature blocks,
  and against one float64 Cholesky of the posterior precision.
* laplace fit / epoch: the whole ``fit_laplace`` (features, curvature, evidence fit,
  Cholesky, eigenvalues) against one training epoch (Adam, batch 64) on the same stars; target
  <= 2 at 12,000 stars of the reference network (the full run), reported only with --quick.

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

    n, n_pix, hidden = (512, 500, [128, 64, 32]) if quick else (12000, 7213, [2048, 1024, 512,
                                                                            256, 128, 32])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, n_pix)).astype(np.float32)
    y = rng.normal(size=(n, 3)).astype(np.float32)
    model = _model(n_pix, hidden)
    model.compile("adam", "mse")
    model.fit(x[:64], y[:64], epochs=1, batch_size=64, verbose=0)  # build and trace
    epoch = best_time(lambda: model.fit(x, y, epochs=1, batch_size=64, verbose=0), 1)
    fit = best_time(lambda: fit_laplace(model, x, y, last_layers=2, device="cpu"), 1)
    name = (f"laplace fit (evidence included) / one training epoch on the same stars "
            f"(N={n}, P={n_pix}, last 2 layers)")
    if quick:  # the target is for the 12,000-star reference network: reported, not judged
        return row(name, fit, epoch, "s", fit / epoch, "report (<= 2 at N=12000)", None)
    return _row(name, fit, epoch, 2.0)


def evidence_problem(n, hidden, seed=2):
    """GGN blocks, MAP weights, RSS and prior groups of a last-2-layer head, unequal noise."""
    from pipeline.laplace import evidence
    from pipeline.laplace.curvature import Head, ggn_blocks

    rng = np.random.default_rng(seed)
    model = _model(200, hidden, seed)
    x = rng.normal(size=(n, 200)).astype(np.float32)
    f = np.asarray(model.predict(x, batch_size=256, verbose=0), np.float64)
    y = f + rng.normal(size=f.shape) * [0.05, 0.1, 0.2]
    head = Head(model, 2)
    blocks = ggn_blocks(head, head.features(x))
    groups = evidence.prior_groups(head.layer_index, "scalar")
    return blocks, head.map_values(), np.sum((f - y) ** 2, axis=0), n, groups


def bench_evidence(quick: bool, n: int | None = None, hidden=None) -> list[dict]:
    """Evidence fit alone, fixed point vs the former L-BFGS, and both against one Cholesky."""
    import scipy.linalg as sl

    from pipeline.laplace import evidence

    n = n or (512 if quick else 4096)
    hidden = hidden or ([128, 64, 32] if quick else [256, 128, 32])
    blocks, theta, rss, n, groups = evidence_problem(n, hidden)
    fits = {}

    def fit(solver):
        fits[solver] = evidence.fit_evidence(blocks, theta, rss, n, groups, solver=solver)

    t_new, t_old = best_time(lambda: fit("fixed_point"), 1), best_time(lambda: fit("lbfgs"), 1)
    a = evidence.precision_matrix(blocks, fits["fixed_point"]["beta"],
                                  fits["fixed_point"]["delta"], groups)
    chol = best_time(lambda: sl.cholesky(a, lower=True, check_finite=False), 2)
    new, old = (np.r_[fits[s]["delta"], fits[s]["beta"]] for s in ("fixed_point", "lbfgs"))
    diff = float(np.max(np.abs(new / old - 1)))
    counts = f"{fits['fixed_point']['n_evaluations']} vs {fits['lbfgs']['n_evaluations']}"
    return [row(f"evidence optimum, fixed point vs L-BFGS, P_L={theta.size}", diff, None,
                "max rel. diff", None, "<= 1e-06", bool(diff <= 1e-6)),
            row(f"evidence fit, L-BFGS / fixed point (P_L={theta.size}, {counts} Cholesky + "
                "inverse evaluations)", t_old, t_new, "s", t_old / t_new,
                "report (> 1: fixed point faster)", None),
            row(f"evidence fit (fixed point) / one float64 Cholesky, P_L={theta.size}", t_new,
                chol, "s", t_new / chol, "report", None)]


def run(quick: bool = False) -> list[dict]:
    """Benchmark rows {'benchmark', 'value', 'baseline', 'ratio', 'target', 'unit', 'ok'}."""
    return [bench_curvature(quick), *bench_evidence(quick), bench_fit(quick)]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()))
