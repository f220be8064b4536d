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
* predictive covariance: ``Posterior.feature_covariance`` of the last-2-layer head of the
  reference network (128 -> 32 -> 3, 4227 weights, a random SPD precision) on 2048 stars by
  the Kronecker route (``pipeline.laplace.kronecker``) against the triangular solves with the
  Cholesky factor, their largest difference relative to sigma_k sigma_l, and the one-off
  cost of forming Sigma for the route in stars' worth of solves.

The float64 Cholesky timings (CPU and GPU, last-2 and last-3-layer sizes) are in
benchmarks/bench_cholesky.py.

    python -m benchmarks.bench_laplace [--quick] [--predictive]   # --predictive: those rows only
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


def bench_predictive(quick: bool, hidden=(128, 32), n: int | None = None) -> list[dict]:
    """Kronecker route vs triangular solves (module docstring); ``hidden``: the head's input
    and hidden widths."""
    import keras

    from pipeline.laplace import Posterior
    from pipeline.laplace.curvature import Head

    n = n or (512 if quick else 2048)
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((hidden[0],)), keras.layers.Dense(hidden[1], "relu"),
                              keras.layers.Dense(3)])
    head = Head(model, 2)
    rng = np.random.default_rng(5)
    m = rng.standard_normal((head.n_params, head.n_params)) / np.sqrt(head.n_params)
    post = Posterior(head, np.linalg.cholesky(m @ m.T + 0.1 * np.eye(head.n_params)),
                     prior_precision=[1.0], groups=np.zeros(head.n_params, int),
                     noise_std=np.ones(3), log_evidence=0.0, curvature="ggn",
                     eigenvalues=np.ones(head.n_params),
                     evidence_curve={"prior_precision": [1.0], "log_evidence": [0.0]},
                     info={"device": "cpu"})
    phi = np.maximum(rng.standard_normal((n, hidden[0])), 0.0)
    build = best_time(lambda: post._kronecker, 1)  # the first access forms it
    kron_cov = post.feature_covariance(phi)
    kron = best_time(lambda: post.feature_covariance(phi))
    post.__dict__["_kronecker"] = None  # the triangular solves from here on
    solves_cov = post.feature_covariance(phi)
    solves = best_time(lambda: post.feature_covariance(phi))
    sd = np.sqrt(np.einsum("nkk->nk", solves_cov))
    diff = float((np.abs(kron_cov - solves_cov) / (sd[:, :, None] * sd[:, None, :])).max())
    saved = (solves - kron) / n  # seconds a star
    tag = f"last-2-layer head {hidden[0]}-{hidden[1]}-3 ({head.n_params} weights), {n} stars"
    return [row(f"predictive covariance, triangular solves / Kronecker route, {tag}", solves,
                kron, "s", solves / kron, "report (> 1: Kronecker faster)", None),
            row(f"predictive covariance, Kronecker route vs solves, {tag}", diff, None,
                "max abs diff / (s_k s_l)", None, "<= 1e-8", bool(diff <= 1e-8)),
            row(f"forming Sigma for the Kronecker route (potri, packing), {tag}", build,
                saved if saved > 0 else None, "s", build / saved if saved > 0 else None,
                "report (ratio: stars whose saved time pays for it)", None)]


def run(quick: bool = False) -> list[dict]:
    """Benchmark rows {'benchmark', 'value', 'baseline', 'ratio', 'target', 'unit', 'ok'}."""
    return [bench_curvature(quick), *bench_evidence(quick), bench_fit(quick),
            *bench_predictive(quick)]


if __name__ == "__main__":
    from benchmarks.run import table

    quick = "--quick" in sys.argv
    print(table(bench_predictive(quick) if "--predictive" in sys.argv else run(quick)))
