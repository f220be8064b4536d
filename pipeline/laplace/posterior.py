"""Last-k-layer Laplace posterior: fit, predictive covariance, save/load.

    theta_L | D ~ N(theta_L*, A^-1),   A = sum_k sigma_k^-2 C_k + diag(prior precision)

with C_k the per-label curvature blocks of :mod:`pipeline.laplace.curvature` (GGN or exact
Hessian) and the hyperparameters from :mod:`pipeline.laplace.evidence`. A = L L^T is factorized
once in float64 (on the GPU when one is visible); prediction solves with it,

    Cov[f(x_n)] = J_n A^-1 J_n^T = V_n^T V_n,   V_n = L^-1 J_n^T   (triangular solves)

Weights that no training star's output depends on (those into and out of ReLU units that never
activate on the training set; most of the head of a network trained without recycling of
dormant units, see pipeline.nn.dormant) have a zero curvature row, so A is block diagonal:
their block is the prior's diagonal and L's rows and columns for them are zero off the
diagonal. The predictive covariance splits exactly,

    J_n A^-1 J_n^T = V_c^T V_c + sum_{i decoupled} J_ni J_ni^T / L_ii^2,   V_c = L_c^-1 J_nc^T,

with L_c the coupled rows and columns of L (itself the Cholesky factor of the coupled block),
so the solves cost (coupled / all)^2 of the full ones; a new star that switches such a unit on
gets its prior variance there. On the CPU, a head whose first Dense layer's weights dominate
takes the cheaper exact route of :mod:`pipeline.laplace.kronecker` through the outer-product
structure of their Jacobian instead of the solves.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields, replace
from functools import cached_property

import numpy as np
import scipy.linalg as sl
import tensorflow as tf

from pipeline.artifacts.posterior_file import read_posterior_arrays, write_posterior_arrays
from pipeline.exceptions import ConfigError, ModelFileError, NumericalError
from pipeline.laplace import evidence
from pipeline.laplace.curvature import Head, curvature_blocks
from pipeline.laplace.error_budget import predict_standardized, weighted_gram
from pipeline.laplace.kronecker import KroneckerCovariance, multiply_adds, with_bias_input
from pipeline.laplace.noise_response import NoiseResponse
from pipeline.laplace.scatter import ScatterModel, fit_configured
from pipeline.runtime import choose_device
from pipeline.streaming import batches

log = logging.getLogger(__name__)

HYPERPARAMETERS = ("evidence", "validation")
KRONECKER_MAX_WEIGHTS = 12000
"""Largest head whose explicit Sigma (8 P_L^2 bytes: 1.2 GB here) the Kronecker route forms."""


# --------------------------------------------------------------------------- linear algebra
def _cholesky(a: np.ndarray, device: str) -> np.ndarray | None:
    if device == "gpu":
        with tf.device("/GPU:0"):
            chol = tf.linalg.cholesky(tf.constant(a, tf.float64)).numpy()
        return chol if np.all(np.isfinite(chol)) and np.all(np.diag(chol) > 0) else None
    try:
        return sl.cholesky(a, lower=True, check_finite=True)
    except (sl.LinAlgError, ValueError):
        return None


def cholesky_with_jitter(a, device="cpu", jitter_initial=1e-10, jitter_max=1e-2,
                         jitter_factor=10.0) -> tuple[np.ndarray, float]:
    """Lower Cholesky factor of A (float64); on failure add jitter * mean(diag A) to the
    diagonal, jitter growing geometrically from ``jitter_initial`` to ``jitter_max``.

    Returns (L, absolute jitter added). Raises NumericalError beyond ``jitter_max``.
    """
    a = np.asarray(a, np.float64)
    chol = _cholesky(a, device)
    if chol is not None:
        return chol, 0.0
    scale, jitter = float(np.mean(np.diag(a))), jitter_initial
    while jitter <= jitter_max:
        added = jitter * scale
        chol = _cholesky(a + added * np.eye(len(a)), device)
        if chol is not None:
            log.warning("posterior precision not positive definite: added jitter %.3g "
                        "(%.1e x mean diagonal) to its diagonal", added, jitter)
            return chol, added
        jitter *= jitter_factor
    raise NumericalError(
        f"posterior precision is not positive definite even with jitter {jitter_max:g} x mean "
        "diagonal (laplace.jitter_max); raise laplace.jitter_max or use laplace.curvature: ggn")


def _solve_lower(chol, rhs, device):
    if device == "gpu":
        with tf.device("/GPU:0"):
            return tf.linalg.triangular_solve(tf.constant(chol), tf.constant(rhs)).numpy()
    return sl.solve_triangular(chol, rhs, lower=True, check_finite=False)


# -------------------------------------------------------------------------------- posterior
class Posterior:
    """Gaussian posterior N(theta*, A^-1) over the head weights, with fitted hyperparameters.

    Attributes: ``head``, ``theta_map`` (P_L,), ``cholesky`` L (P_L, P_L) float64 lower,
    ``prior_precision`` (n_groups,), ``groups`` (P_L,), ``noise_std`` (K,) standardized,
    ``log_evidence``, ``curvature``, ``eigenvalues`` of sum_k sigma_k^-2 C_k, ``evidence_curve``
    {'prior_precision', 'log_evidence'}, ``info`` (jitter, device, indefinite report, ...).
    """

    def __init__(self, head: Head, cholesky, *, prior_precision, groups, noise_std,
                 log_evidence, curvature, eigenvalues, evidence_curve, info):
        self.head = head
        self.theta_map = head.map_values()
        self.cholesky = np.asarray(cholesky, np.float64)
        self.prior_precision = np.atleast_1d(np.asarray(prior_precision, np.float64))
        self.groups = np.asarray(groups)
        self.noise_std = np.asarray(noise_std, np.float64)
        self.log_evidence = float(log_evidence)
        self.curvature = curvature
        self.eigenvalues = np.asarray(eigenvalues, np.float64)
        self.evidence_curve = {k: np.asarray(v, np.float64) for k, v in evidence_curve.items()}
        self.info = dict(info)
        self.device = self.info.get("device", "cpu")

    @property
    def n_params(self) -> int:
        return self.theta_map.size

    # ``info`` is what the file stores (JSON); these properties are its typed view.
    @property
    def scatter_model(self) -> ScatterModel | None:
        """The validation-calibrated scatter model (pipeline.laplace.scatter), if fitted."""
        doc = self.info.get("scatter")
        return None if doc is None else ScatterModel.from_dict(doc)

    @scatter_model.setter
    def scatter_model(self, model: ScatterModel | None) -> None:
        self.info["scatter"] = None if model is None else model.to_dict()

    @property
    def noise_response(self) -> NoiseResponse | None:
        """The network's measured response to flux noise (pipeline.laplace.noise_response),
        the factor on the delta-method noise term; None (factor 1) if not measured."""
        doc = self.info.get("noise_response")
        return None if doc is None else NoiseResponse.from_dict(doc)

    @noise_response.setter
    def noise_response(self, response: NoiseResponse | None) -> None:
        self.info["noise_response"] = None if response is None else response.to_dict()

    @property
    def train_model_std_q99(self) -> np.ndarray | None:
        """(K,) 99th percentile of the training stars' model errors (standardized), if known."""
        value = self.info.get("train_model_std_q99")
        return None if value is None else np.asarray(value, np.float64)

    def scatter_covariance(self, model_var, noise_var, labels=None, offset=None) -> np.ndarray:
        """Aleatoric scatter covariance (N, K, K), standardized, of stars with model and
        flux-noise variances (N, K, standardized units), predicted labels and their offsets
        from the emulator's best-fit labels (N, K, standardized; used when the scatter model
        has them as covariates).

        The validation-calibrated scatter model (``info['scatter']``, pipeline.laplace.scatter)
        when the laplace step fitted one: D R D. Else the Laplace noise: diag(sigma_k^2) when
        sigma was fitted on validation stars with their flux noise as a separate term
        (``hyperparameters: validation``), and diag(max(sigma_k^2 - E_nk, 0)) when it was
        fitted by the evidence on training residuals, which already contain the flux noise
        E: the scatter is then what the star's own flux noise does not account for, so flux
        noise is not counted twice (scatter + noise = max(sigma_k^2, E_nk)).
        """
        noise_var = np.asarray(noise_var, np.float64)
        scatter = self.scatter_model
        if scatter is not None:
            return scatter.covariance(model_var, noise_var, labels, offset)
        var = np.broadcast_to(self.noise_std**2, noise_var.shape)
        if self.info.get("hyperparameters", "evidence") == "evidence":
            var = np.maximum(var - noise_var, 0.0)
        return var[:, :, None] * np.eye(var.shape[1])

    def predictive_covariance(self, x, scaler=None, batch_size: int = 256) -> np.ndarray:
        """Epistemic covariance J_n A^-1 J_n^T (N, K, K) float64, streamed over batches.

        Standardized units, or physical units if a ``LabelScaler`` is given.
        """
        return self.feature_covariance(self.head.features(x, batch_size), scaler, batch_size)

    def feature_covariance(self, phi, scaler=None, batch_size: int = 256) -> np.ndarray:
        """:meth:`predictive_covariance` of stars whose head features phi = body(x) (N, d)
        are already known (``pipeline.nn.derivatives.forward_jacobian`` taps them from the
        forward pass of the input Jacobian), so the body is not run a second time."""
        phi = np.asarray(phi, np.float64)
        out = []
        for s in batches(len(phi), batch_size):
            if self._kronecker is not None:  # the bias block g_k and phi give the kernel's
                jac = self.head.jacobian(phi[s], outer_kernel=False)[0].numpy()
                out.append(self._kronecker.covariance(phi[s], jac))
                continue
            out.append(self._solves_covariance(phi[s]))
        cov = np.concatenate(out) if out else np.zeros((0, 3, 3))
        return cov if scaler is None else np.asarray(scaler.covariance_to_physical(cov))

    def _solves_covariance(self, phi: np.ndarray) -> np.ndarray:
        """(B, K, K) J Sigma J^T by triangular solves with the coupled weights' Cholesky
        factor, plus sum_p v_p J_kp J_lp over the decoupled weights (prior variances v_p)."""
        coupled, chol, decoupled_var = self._split
        if self.head.outer_product_layer is None:
            jac = self.head.jacobian(phi)[0].numpy()  # (B, K, P)
            jac_c, decoupled = jac[:, :, coupled], weighted_gram(jac, decoupled_var)
        else:
            jac_c, decoupled = self._outer_columns(phi)
        b, k, p = jac_c.shape
        v = _solve_lower(chol, jac_c.reshape(b * k, p).T, self.device).T.reshape(b, k, p)
        return weighted_gram(v) + decoupled

    def _outer_columns(self, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The coupled columns of J (B, K, P_c) and the decoupled term (B, K, K) of
        :meth:`_solves_covariance` from the head Jacobian without its first layer's kernel
        block (``Head.jacobian(..., outer_kernel=False)``): that layer's columns are
        a~_i g_kj (``pipeline.laplace.kronecker``), formed here only where coupled, and their
        decoupled sum is sum_j u_j g_kj g_lj with u = (a~ * a~) V, V (m, d) the variances of
        the layer's decoupled weights (0 where coupled)."""
        m, d = self.head.outer_product_layer
        coupled, _, decoupled_var = self._split
        jac = self.head.jacobian(phi, outer_kernel=False)[0].numpy()  # (B, K, d + R)
        a = with_bias_input(phi)  # a~ (B, m)
        g, r = jac[:, :, :d], jac[:, :, d:]
        first = m * d
        rows, cols = np.nonzero(coupled[:first].reshape(m, d))  # row-major: the weight order
        jac_c = np.concatenate([a[:, None, rows] * g[:, :, cols], r[:, :, coupled[first:]]],
                               axis=2)
        u = (a * a) @ decoupled_var[:first].reshape(m, d)  # (B, d)
        return jac_c, weighted_gram(g, u[:, None, :]) + weighted_gram(r, decoupled_var[first:])

    @cached_property
    def _kronecker(self) -> KroneckerCovariance | None:
        """The Kronecker route of :meth:`feature_covariance` (module docstring) when the head
        starts with a Dense layer's kernel and bias, Sigma fits ``KRONECKER_MAX_WEIGHTS``,
        the solves would run on the CPU and would cost more multiply-adds a star; else None
        (triangular solves)."""
        shape = self.head.outer_product_layer
        if self.device == "gpu" or self.n_params > KRONECKER_MAX_WEIGHTS or shape is None:
            return None
        m, n_out = shape
        rest = self.n_params - m * n_out
        n_coupled = self.n_params - self.n_decoupled
        solves = self.noise_std.size * n_coupled**2 / 2
        if multiply_adds(m, n_out, rest, self.noise_std.size) >= solves:
            return None
        return KroneckerCovariance(self.cholesky, m, n_out)

    @property
    def n_decoupled(self) -> int:
        """Weights decoupled from the training data (module docstring)."""
        return int((~self._split[0]).sum())

    @cached_property
    def _split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(coupled (P_L,) bool, L_c, the prior variance 1 / L_ii^2 of each decoupled weight
        and 0 for the coupled ones (P_L,): the decoupled term sums over all weights without a
        column gather): a weight is decoupled when its row and column of L are zero off the
        diagonal (module docstring)."""
        off = self.cholesky != 0
        np.fill_diagonal(off, False)
        coupled = off.any(axis=0) | off.any(axis=1)
        chol = np.ascontiguousarray(self.cholesky[np.ix_(coupled, coupled)])
        return coupled, chol, np.where(coupled, 0.0, 1.0 / np.diag(self.cholesky) ** 2)

    def covariance(self) -> np.ndarray:
        """Sigma = A^-1 (P_L, P_L): the explicit inverse, formed only when asked for."""
        return sl.cho_solve((self.cholesky, True), np.eye(self.n_params))

    inverse_hessian = covariance

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """n draws theta* + L^-T z, z ~ N(0, I): shape (n, P_L)."""
        z = np.random.default_rng(seed).standard_normal((self.n_params, n))
        return self.theta_map + sl.solve_triangular(self.cholesky.T, z, lower=False).T

    # --------------------------------------------------------------------------- persistence
    def save(self, path, provenance: dict | None = None) -> None:
        """Write every array needed to reproduce the predictive variances, atomically."""
        write_posterior_arrays(path, {
            "weight_names": np.array(self.head.names), "map_values": self.theta_map,
            "weight_shapes": json.dumps(self.head.shapes), "cholesky": self.cholesky,
            "prior_precision": self.prior_precision, "prior_groups": self.groups,
            "noise_std": self.noise_std, "log_evidence": self.log_evidence,
            "curvature": self.curvature, "eigenvalues": self.eigenvalues,
            "evidence_curve_prior_precision": self.evidence_curve["prior_precision"],
            "evidence_curve_log_evidence": self.evidence_curve["log_evidence"],
            "last_layers": self.info["last_layers"],
            "info": dict(self.info, provenance=provenance or {}),
        })

    @classmethod
    def load(cls, path, model) -> Posterior:
        """Read a posterior saved for ``model``; ModelFileError if it belongs to another."""
        data = read_posterior_arrays(path)
        names = [str(n) for n in data["weight_names"]]
        try:
            head = Head(model, int(data["last_layers"]), weights=names)
        except (ValueError, ConfigError):
            head = None
        if (head is None or head.names != names
                or [list(s) for s in head.shapes] != json.loads(str(data["weight_shapes"]))
                or not np.array_equal(head.map_values(), data["map_values"])):
            raise ModelFileError(f"'{path}': posterior saved for a different model (weight "
                                 "names, shapes or MAP values differ); rerun the laplace step")
        info = dict(data["info"])
        info.pop("provenance", None)
        return cls(head, data["cholesky"], prior_precision=data["prior_precision"],
                   groups=data["prior_groups"], noise_std=data["noise_std"],
                   log_evidence=float(data["log_evidence"]), curvature=str(data["curvature"]),
                   eigenvalues=data["eigenvalues"],
                   evidence_curve={"prior_precision": data["evidence_curve_prior_precision"],
                                   "log_evidence": data["evidence_curve_log_evidence"]},
                   info=info)


# -------------------------------------------------------------------------------------- fit
@dataclass(frozen=True)
class LaplaceOptions:
    """Settings of :func:`fit_laplace`; each is the config key ``laplace.<name>``.

    curvature: 'ggn' or 'hessian' (``indefinite``: 'fail' | 'clip' | 'ggn' for an indefinite
    Hessian); prior: 'scalar' or 'layer' (one prior precision per Dense layer);
    hyperparameters: 'evidence' (training data) or 'validation'; evidence_solver: 'fixed_point'
    or 'lbfgs' (pipeline.laplace.evidence.fit_evidence); ``max_weights`` bounds the
    head size (the curvature blocks take 3 x 8 P_L^2 bytes), so reaching into the wide first
    layer is a ConfigError, not an out-of-memory crash.
    """

    last_layers: int = 2
    curvature: str = "ggn"
    prior: str = "scalar"
    hyperparameters: str = "evidence"
    evidence_solver: str = "fixed_point"
    indefinite: str = "clip"
    batch_size: int = 256
    jitter_initial: float = 1e-10
    jitter_max: float = 1e-2
    jitter_factor: float = 10.0
    device: str = "auto"
    hessian_chunk_size: int = 256
    max_iterations: int = 200
    validation_iterations: int = 10
    prior_precision_init: float | None = None
    evidence_curve_points: int = 61
    evidence_curve_decades: float = 3.0
    reference_stars: int = 2000
    max_weights: int = 50000

    @classmethod
    def from_config(cls, laplace_cfg: dict) -> LaplaceOptions:
        """The options of the validated ``laplace`` config section."""
        return cls(**{f.name: laplace_cfg[f.name] for f in fields(cls) if f.name in laplace_cfg})

    def with_overrides(self, overrides: dict) -> LaplaceOptions:
        """A copy with ``overrides`` replaced; TypeError naming an unknown option."""
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"fit_laplace got unknown option(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(f.name for f in fields(self))}")
        return replace(self, **overrides)


def fit_laplace(model, x, y, options: LaplaceOptions | None = None, *, weights=None,
                x_valid=None, y_valid=None, extra_covariance_valid=None,
                **overrides) -> Posterior:
    """Fit the Laplace posterior of the last ``options.last_layers`` Dense layers of ``model``.

    Parameters
    ----------
    model : trained Keras model, (N, P) flux -> (N, K) standardized labels.
    x, y : training inputs and standardized labels (N, K).
    options : :class:`LaplaceOptions` (defaults if None); keyword ``overrides`` replace single
        options, e.g. ``fit_laplace(model, x, y, last_layers=1, device="cpu")``.
    weights : optional subset of the head kernels/biases (variables or path names).
    x_valid, y_valid : validation stars, needed by ``hyperparameters='validation'``;
        ``extra_covariance_valid`` (N_v, K, K) adds e.g. flux noise to each star's covariance.
    """
    o = (options or LaplaceOptions()).with_overrides(overrides)
    if o.hyperparameters not in HYPERPARAMETERS:
        raise ConfigError(f"config key 'laplace.hyperparameters' = {o.hyperparameters!r}; "
                          f"valid: {', '.join(HYPERPARAMETERS)}")
    if o.hyperparameters == "validation" and (x_valid is None or y_valid is None):
        raise ValueError("hyperparameters='validation' needs x_valid and y_valid")
    device = choose_device(o.device)
    head = Head(model, o.last_layers, weights)
    if head.map_values().size > o.max_weights:
        n = head.map_values().size
        raise ConfigError(
            f"config key 'laplace.last_layers' = {o.last_layers} puts {n} weights in the Laplace "
            f"head (curvature blocks of {3 * 8 * n**2 / 1e9:.1f} GB); use fewer last layers or "
            f"raise laplace.max_weights (now {o.max_weights}) on a machine with that memory")
    head.check(x, o.batch_size)
    phi = head.features(x, o.batch_size)
    y = np.asarray(y, np.float64)
    blocks, report = curvature_blocks(head, phi, y, o.curvature, o.batch_size, o.indefinite,
                                      o.hessian_chunk_size)
    theta = head.map_values()
    f = np.concatenate([head.jacobian(phi[s])[1].numpy()
                        for s in batches(len(phi), o.batch_size)])
    rss, n = np.sum((f - y) ** 2, axis=0), len(y)
    groups = evidence.prior_groups(head.layer_index, o.prior)
    if o.hyperparameters == "evidence":
        fit = evidence.fit_evidence(blocks, theta, rss, n, groups, o.max_iterations,
                                    o.prior_precision_init, o.evidence_solver, device)
    else:
        phi_v = head.features(x_valid, o.batch_size)
        parts = [head.jacobian(phi_v[s]) for s in batches(len(phi_v), o.batch_size)]
        jac_v = np.concatenate([p[0].numpy() for p in parts])
        res_v = np.concatenate([p[1].numpy() for p in parts]) - np.asarray(y_valid, np.float64)
        fit = evidence.fit_validation(blocks, theta, rss, n, groups, jac_v, res_v,
                                      extra_covariance_valid, o.validation_iterations,
                                      delta_init=o.prior_precision_init)
    precision = evidence.precision_matrix(blocks, fit["beta"], fit["delta"], groups)
    chol, jitter = cholesky_with_jitter(precision, device, o.jitter_initial, o.jitter_max,
                                        o.jitter_factor)
    eig = np.linalg.eigvalsh(np.tensordot(fit["beta"], blocks, axes=1))
    centre = np.exp(np.mean(np.log(fit["delta"])))
    grid = centre * np.logspace(-o.evidence_curve_decades, o.evidence_curve_decades,
                                o.evidence_curve_points)
    curve = evidence.evidence_curve(eig, theta, rss, n, fit["beta"], grid)
    info = {"device": device, "jitter": jitter, "last_layers": o.last_layers,
            "hyperparameters": o.hyperparameters, "prior": o.prior, "n_train": n,
            "curvature_report": report,
            **{k: v for k, v in fit.items() if k in ("validation_nll", "n_evaluations")}}
    log.info("Laplace posterior: %d weights, prior precision %s, noise std %s, log Z %.6g, "
             "Cholesky on %s (jitter %g)", theta.size, fit["delta"], fit["beta"] ** -0.5,
             fit["log_evidence"], device, jitter)
    posterior = Posterior(head, chol, prior_precision=fit["delta"], groups=groups,
                          noise_std=fit["beta"] ** -0.5, log_evidence=fit["log_evidence"],
                          curvature=o.curvature, eigenvalues=eig,
                          evidence_curve={"prior_precision": grid, "log_evidence": curve},
                          info=info)
    log.info("%d of %d weights are decoupled from the training data (prior variance only; the "
             "predictive covariance solves with the other %d)", posterior.n_decoupled,
             theta.size, theta.size - posterior.n_decoupled)
    posterior.info["train_model_std_q99"] = reference_model_std(
        posterior, x, o.reference_stars, o.batch_size).tolist()
    return posterior


def reference_model_std(posterior: Posterior, x, n_stars: int, batch_size: int) -> np.ndarray:
    """99th percentile (K,) of the epistemic std of up to ``n_stars`` training stars.

    Standardized units. A star whose model error exceeds this by a large factor lies where the
    training set gave the head no information: the predict step flags it as out of
    distribution even when its predicted labels look ordinary.
    """
    rows = np.unique(np.linspace(0, len(x) - 1, min(n_stars, len(x))).astype(int))
    cov = posterior.predictive_covariance(np.asarray(x)[rows], batch_size=batch_size)
    return np.percentile(np.sqrt(np.diagonal(cov, axis1=1, axis2=2)), 99, axis=0)


def calibrate_scatter(posterior: Posterior, model, x_valid, y_valid, noise_valid, cfg: dict,
                      emulator_labels=None):
    """Fit the scatter model (pipeline.laplace.scatter) on validation stars, given their model
    and flux-noise covariances; their predicted labels are covariates too unless
    ``cfg['scatter_labels']`` is false (their squares too with ``scatter_label_degree`` 2),
    and with ``cfg['scatter_emulator']`` their offsets from ``emulator_labels``, a callable
    that maps the stars' standardized predictions (N, K) to the emulator's best-fit labels
    there (N, K, standardized)."""
    batch = cfg["batch_size"]
    z = np.concatenate([predict_standardized(model, x_valid[s])
                        for s in batches(len(x_valid), batch)])
    model_cov = posterior.predictive_covariance(x_valid, batch_size=batch)
    offset = None if emulator_labels is None else z - emulator_labels(z)
    scatter = fit_configured(z - y_valid, model_cov, noise_valid, z, cfg, offset)
    log.info("scatter model (%s) fitted on %d validation stars: %s", cfg["scatter"], len(z),
             scatter.describe())
    return scatter
