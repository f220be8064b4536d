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
``fit_laplace`` with its evidence fit.

**Last 2 layers** (:func:`run_last2`): laplace-torch's fastest route for a head deeper than one
layer is the whole network with the earlier layers frozen (``requires_grad`` False),
``subset_of_weights="all"``, ``hessian_structure="full"`` and its default full-GGN backend
(curvlinops); ours is ``fit_ours(last_layers=2)``, the same GGN and A. Both networks are
float64 throughout (a float64 Keras copy of the network), so the two predictive variances can
agree to rounding. Rows: the largest relative difference of the predictive covariances (target
1e-6), fit time (target ours >= 4x faster), predictive time, and the peak resident memory
above the process's memory before each call (sampled every 5 ms by psutil).

Without torch or laplace-torch the rows say so and are skipped.
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


def skipped(why: str, what: str = "last-layer") -> list[dict]:
    return [row(f"laplace-torch {what} comparison: SKIPPED ({why})", None, None, "", None,
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
    return rows + run_last2(quick, n_pixels, hidden, n_train, n_test)


# ------------------------------------------------------------------------------ last 2 layers
LAST2_RTOL = 1e-6
LAST2_SPEEDUP = 4.0
LAST2_STARS = 4096


def float64_keras_model(n_pixels: int, hidden, seed: int = 0):
    """The dense network of ``build_model`` (ReLU, He-normal) with float64 weights and maths."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = [keras.Input((n_pixels,), dtype="float64")]
    layers += [keras.layers.Dense(h, "relu", kernel_initializer="he_normal", dtype="float64")
               for h in hidden]
    return keras.Sequential(layers + [keras.layers.Dense(3, dtype="float64")])


def torch_network(model, last_layers: int):
    """float64 torch copy of a Keras Dense stack, all but the last ``last_layers`` frozen."""
    import torch

    dense = [la for la in model.layers if la.get_weights()]
    modules = []
    with float64_default():
        for i, layer in enumerate(dense):
            kernel, bias = (np.asarray(v, np.float64) for v in layer.get_weights())
            linear = torch.nn.Linear(*kernel.shape)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(kernel.T))
                linear.bias.copy_(torch.from_numpy(bias))
            trainable = i >= len(dense) - last_layers
            for p in linear.parameters():
                p.requires_grad_(trainable)
            modules.append(linear)
            if i < len(dense) - 1:
                modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules)


def fit_laplace_torch_last2(model, x, y, last_layers: int = 2):
    """laplace-torch, earlier layers frozen, subset 'all', full GGN; (laplace, seconds)."""
    import torch
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    t0 = time.perf_counter()
    with float64_default():
        net = torch_network(model, last_layers)
        la = Laplace(net, "regression", subset_of_weights="all", hessian_structure="full",
                     sigma_noise=SIGMA_NOISE, prior_precision=PRIOR_PRECISION)
        data = TensorDataset(torch.from_numpy(np.asarray(x, np.float64)),
                             torch.from_numpy(np.asarray(y, np.float64)))
        la.fit(DataLoader(data, batch_size=256))
    return la, time.perf_counter() - t0


def laplace_torch_predict(la, x_test: np.ndarray) -> np.ndarray:
    import torch

    with float64_default():
        _, f_var = la(torch.from_numpy(np.asarray(x_test, np.float64)), pred_type="glm")
    return f_var.detach().numpy()


def peak_memory(fn):
    """(fn(), peak RSS above the RSS before the call, MB), RSS sampled every 5 ms."""
    import threading

    import psutil

    proc = psutil.Process()
    start, peak, done = proc.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
    finally:
        done.set()
        thread.join()
    return out, max(peak[0] - start, 0) / 1e6


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None when either is 0 (no growth of the resident memory was seen)."""
    return a / b if a > 0 and b > 0 else None


def run_last2(quick: bool, n_pixels: int = 7213, hidden=REFERENCE_HIDDEN,
              n_train: int | None = None, n_test: int = 64) -> list[dict]:
    """Last-2-layer rows (see the module docstring); the arguments shrink it for tests."""
    why = missing_dependency() or (None if importlib.util.find_spec("psutil") else
                                   "psutil not installed; pip install -e .[bench]")
    if why:
        return skipped(why, "last-2-layer")
    n_train = n_train or (512 if quick else LAST2_STARS)
    rng = np.random.default_rng(0)
    model = float64_keras_model(n_pixels, hidden)
    x = 1.0 - 0.1 * rng.random((n_train + n_test, n_pixels))
    y = rng.standard_normal((n_train, 3))
    x_train, x_test = x[:n_train], x[n_train:]

    fit_ours(model, x_train[:64], y[:64], last_layers=2)  # warm-up: traces, imports, kernels
    la = fit_laplace_torch_last2(model, x_train[:64], y[:64])[0]
    laplace_torch_predict(la, x_test[:4])
    (posterior, t_ours), m_ours = peak_memory(lambda: fit_ours(model, x_train, y, 2))
    (la, t_torch), m_torch = peak_memory(lambda: fit_laplace_torch_last2(model, x_train, y))
    posterior.predictive_covariance(x_test[:4])  # trace the predictive path
    t0 = time.perf_counter()
    ours, mp_ours = peak_memory(lambda: posterior.predictive_covariance(x_test))
    tp_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs, mp_torch = peak_memory(lambda: laplace_torch_predict(la, x_test))
    tp_torch = time.perf_counter() - t0

    tag = (f"last 2 layers ({posterior.n_params} weights), {n_train} stars, P={n_pixels}, "
           f"hidden {'-'.join(map(str, hidden))}, float64")
    diff = relative_difference(np.asarray(ours, np.float64), theirs)
    # the speed target is the issue's, at 4,096 stars; smaller runs are dominated by start-up
    judged = n_train >= LAST2_STARS
    target = f">= {LAST2_SPEEDUP:g}x faster" + ("" if judged else f" at {LAST2_STARS} stars")
    return [
        row(f"predictive covariance, ours vs laplace-torch (frozen body, subset all, full "
            f"GGN), {tag}", diff, None, "max rel. diff", None, f"<= {LAST2_RTOL:g}",
            bool(diff <= LAST2_RTOL)),
        row(f"Laplace fit time, laplace-torch / ours (fixed hyperparameters), {tag}", t_torch,
            t_ours, "s", t_torch / t_ours, target,
            bool(t_torch / t_ours >= LAST2_SPEEDUP) if judged else None),
        row(f"predictive time for {n_test} stars, laplace-torch / ours, {tag}", tp_torch,
            tp_ours, "s", tp_torch / tp_ours, "report", None),
        row(f"peak memory of the fit above the process, laplace-torch vs ours, {tag}", m_torch,
            m_ours, "MB", _ratio(m_torch, m_ours), "report", None),
        row(f"peak memory of the predictive above the process, laplace-torch vs ours, {tag}",
            mp_torch, mp_ours, "MB", _ratio(mp_torch, mp_ours), "report", None),
    ]
