"""Last-layer Laplace posterior: ``pipeline.laplace`` against laplace-torch on the same weights.

Both fit the full-covariance last-layer Laplace approximation of a regression network with the
same fixed hyperparameters (scalar prior precision delta, one noise sigma for all labels, no
hyperparameter optimization: laplace-torch takes one scalar sigma):

    A = sum_n J_n^T J_n / sigma^2 + delta I,    Var f(x) = J_x A^-1 J_x^T     (3 x 3)

where J_n = d f(x_n) / d theta_L for the weights and biases theta_L of the output layer. Ours:
the numerical path of ``pipeline.laplace.fit_laplace(model, x, y, last_layers=1)`` on the
Keras model with the hyperparameters fixed (see :func:`fit_ours`). laplace-torch
(optional, ``pip install -e .[bench]``): ``Laplace(net, "regression", subset_of_weights=
"last_layer", hessian_structure="full")`` on a float64 ``torch.nn.Sequential`` holding a copy
of the Keras output layer, fed the penultimate-layer features of the Keras model. A third,
independent reference is the closed form (Bayesian linear regression on the features, one
(h+1) x (h+1) inverse shared by the three labels).

Rows: the largest relative difference of the predictive covariances (target 1e-5) for ours
vs laplace-torch and ours vs the closed form, and the fit-time ratio ours / laplace-torch
(laplace-torch timed including the Keras forward pass that makes its features, since ours
computes them inside the fit), once at fixed hyperparameters and once for the full
``fit_laplace`` with its evidence fit. Without torch or laplace-torch the rows say so and are
skipped.
"""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np

from benchmarks.common import row

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

VARIANCE_RTOL = 1e-5
PRIOR_PRECISION = 2.0
SIGMA_NOISE = 0.3
REFERENCE_HIDDEN = (2048, 1024, 512, 256, 128, 32)


def skipped(why: str) -> list[dict]:
    return [row(f"laplace-torch last-layer comparison: SKIPPED ({why})", None, None, "", None,
                f"rel. diff <= {VARIANCE_RTOL:g}", None)]


def missing_dependency() -> str | None:
    """Why the comparison cannot run, or None."""
    for module, hint in (("torch", "torch not installed; pip install -e .[bench]"),
                         ("laplace", "laplace-torch not installed; pip install -e .[bench]"),
                         ("pipeline.laplace", "pipeline.laplace not available")):
        try:
            if importlib.util.find_spec(module) is None:
                return hint
        except ImportError:
            return hint
    return None


def features(model, x: np.ndarray) -> np.ndarray:
    """Inputs of the output layer, phi (N, h) float64, from a Keras sub-model."""
    import keras

    body = keras.Model(model.inputs, model.layers[-1].input)
    return np.asarray(body.predict(x, batch_size=256, verbose=0), np.float64)


def fit_ours(model, x, y, last_layers: int = 1):
    """Our posterior at the fixed hyperparameters; returns (posterior, seconds).

    ``pipeline.laplace.fit_laplace`` always fits the prior precision and noise (evidence or
    validation NLL), so this runs its numerical path with them fixed: head features, GGN
    blocks (``pipeline.laplace.curvature``), A = sum_k C_k / sigma^2 + delta I
    (``evidence.precision_matrix``), float64 Cholesky (``laplace.cholesky_with_jitter``).
    """
    from pipeline.laplace import Posterior, evidence
    from pipeline.laplace.curvature import Head, curvature_blocks
    from pipeline.laplace.posterior import cholesky_with_jitter
    from pipeline.runtime import choose_device

    t0 = time.perf_counter()
    device = choose_device("auto")
    head = Head(model, last_layers)
    phi = head.features(x)
    blocks, report = curvature_blocks(head, phi, np.asarray(y, np.float64), "ggn")
    beta = np.full(y.shape[1], SIGMA_NOISE**-2)
    groups = evidence.prior_groups(head.layer_index, "scalar")
    precision = evidence.precision_matrix(blocks, beta, [PRIOR_PRECISION], groups)
    chol, jitter = cholesky_with_jitter(precision, device)
    posterior = Posterior(head, chol, prior_precision=[PRIOR_PRECISION], groups=groups,
                          noise_std=beta**-0.5, log_evidence=np.nan, curvature="ggn",
                          eigenvalues=np.zeros(0), evidence_curve={},
                          info={"device": device, "jitter": jitter, "curvature_report": report})
    return posterior, time.perf_counter() - t0


def fit_ours_evidence(model, x, y) -> float:
    """Seconds of the full ``fit_laplace(last_layers=1)``, evidence fit included."""
    from pipeline.laplace import fit_laplace

    t0 = time.perf_counter()
    fit_laplace(model, x, y, last_layers=1)
    return time.perf_counter() - t0


def float64_default():
    """Context manager: torch's default dtype float64 (laplace-torch makes its sigma and prior
    tensors in the default dtype; float32 there costs ~1e-7 relative in the variances)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def scope():
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)

    return scope()


def fit_laplace_torch(model, x, y):
    """laplace-torch on a torch copy of the output layer; returns (laplace object, seconds)."""
    import torch
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    kernel, bias = (np.asarray(v, np.float64) for v in model.layers[-1].get_weights())
    t0 = time.perf_counter()
    phi = features(model, x)
    with float64_default():
        # Identity first: laplace-torch needs a module before the last layer to hook features
        net = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(*kernel.shape))
        with torch.no_grad():
            net[1].weight.copy_(torch.from_numpy(kernel.T))
            net[1].bias.copy_(torch.from_numpy(bias))
        la = Laplace(net, "regression", subset_of_weights="last_layer",
                     hessian_structure="full", sigma_noise=SIGMA_NOISE,
                     prior_precision=PRIOR_PRECISION, last_layer_name="1")
        data = TensorDataset(torch.from_numpy(phi), torch.from_numpy(np.asarray(y, np.float64)))
        la.fit(DataLoader(data, batch_size=256))
    return la, time.perf_counter() - t0


def laplace_torch_covariance(la, phi_test: np.ndarray) -> np.ndarray:
    import torch

    with float64_default():
        _, f_var = la(torch.from_numpy(phi_test), pred_type="glm")
    return f_var.detach().numpy()


def closed_form_covariance(phi: np.ndarray, phi_test: np.ndarray, n_out: int) -> np.ndarray:
    """Bayesian linear regression: Var f_k(x) = phi~^T (Phi~^T Phi~ / s^2 + delta I)^-1 phi~."""
    design = np.hstack([phi, np.ones((phi.shape[0], 1))])
    test = np.hstack([phi_test, np.ones((phi_test.shape[0], 1))])
    precision = design.T @ design / SIGMA_NOISE**2 + PRIOR_PRECISION * np.eye(design.shape[1])
    var = np.einsum("ni,ni->n", test, np.linalg.solve(precision, test.T).T)
    return var[:, None, None] * np.eye(n_out)


def relative_difference(cov: np.ndarray, ref: np.ndarray) -> float:
    """max |cov - ref| over every entry, relative to the reference variance of that star."""
    scale = np.max(np.diagonal(ref, axis1=1, axis2=2), axis=1)[:, None, None]
    return float(np.max(np.abs(cov - ref) / scale))


def run(quick: bool, n_pixels: int = 7213, hidden=REFERENCE_HIDDEN, n_train: int | None = None,
        n_test: int = 64) -> list[dict]:
    """Benchmark rows; ``n_pixels``, ``hidden``, ``n_train`` shrink it for tests."""
    why = missing_dependency()
    if why:
        return skipped(why)
    from pipeline.nn.model import build_model

    n_train = n_train or (512 if quick else 4096)
    rng = np.random.default_rng(0)
    model = build_model(n_pixels, {"type": "dense", "hidden": list(hidden)}, 0)
    x = (1.0 - 0.1 * rng.random((n_train + n_test, n_pixels))).astype(np.float32)
    y = rng.standard_normal((n_train, 3))  # standardized labels; the GGN does not depend on y
    x_train, x_test = x[:n_train], x[n_train:]

    fit_ours(model, x_train[:64], y[:64])  # warm-up of both: traces, imports, kernels
    fit_laplace_torch(model, x_train[:64], y[:64])
    posterior, t_ours = fit_ours(model, x_train, y)
    la, t_torch = fit_laplace_torch(model, x_train, y)
    ours = np.asarray(posterior.predictive_covariance(x_test), np.float64)
    phi_test = features(model, x_test)
    theirs = laplace_torch_covariance(la, phi_test)
    exact = closed_form_covariance(features(model, x_train), phi_test, y.shape[1])

    tag = f"{n_train} stars, P={n_pixels}, hidden {'-'.join(map(str, hidden))}"
    rows = []
    for name, ref in (("laplace-torch", theirs), ("closed form", exact)):
        diff = relative_difference(ours, ref)
        rows.append(row(f"last-layer predictive covariance, ours vs {name}, {tag}", diff, None,
                        "max rel. diff", None, f"<= {VARIANCE_RTOL:g}",
                        bool(diff <= VARIANCE_RTOL)))
    rows.append(row(f"last-layer Laplace fit time, ours vs laplace-torch (incl. features), {tag}",
                    t_ours, t_torch, "s", t_ours / t_torch, "report", None))
    t_evidence = fit_ours_evidence(model, x_train, y)
    rows.append(row(f"last-layer fit_laplace with evidence fit vs laplace-torch fixed, {tag}",
                    t_evidence, t_torch, "s", t_evidence / t_torch, "report", None))
    return rows
