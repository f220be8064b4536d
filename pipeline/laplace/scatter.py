"""The scatter term of the error budget: aleatoric label scatter calibrated on validation stars.

The Laplace likelihood has one noise level sigma_k per label (``Posterior.noise_std``), fitted
with the prior precision. The misfit of a real network is not that uniform: it is larger for
stars with weak lines and where the network is poorly constrained, so a single level gives
errors that are right on average but too large for most stars and too small for the rest.

The scatter model lets the level of label k depend on a few covariates,

    u_nk = [log m_nk, log e_nk, zhat_n1, ..., zhat_nK, zhat_n1^2, ..., zhat_nK^2]

m, e: the star's model (Laplace) and flux-noise stds of label k; zhat_n: its K predicted labels
in standardized units (the network output); the squares (config ``laplace.scatter_label_degree``
2, the default; 1 drops them) let the scatter grow towards both ends of a label's range, as a
network's does at the edges of its training box, where a log-linear term can follow only one.
The stars in the tail of a real network's residuals sit in parts of label space (metal-poor,
hot, high-gravity stars) where the Laplace stds are hardly larger than in the core, so the
model and noise errors alone cannot single them out; the predicted labels say where a star
lies (config ``laplace.scatter_labels``; false keeps the two-covariate model
u_nk = [log m_nk, log e_nk]). Each covariate is standardized by its validation mean and
standard deviation and clipped to the range the validation stars span, and the result is
capped:

    s_k(u) = min(exp(a_k + b_k . clip(u, u_lo, u_hi)), cap_k)

Why few covariates and a penalty: the nine covariates of an earlier, unpenalized design (the
predicted labels and the model and noise stds of all three labels) are nearly collinear (the
three noise stds correlate at r ~ 0.99), so that fit gave large slopes of opposite sign that
cancel on the validation stars and explode for any other combination inside the clip box. Here
each label keeps only its own model and noise stds, and a, b
minimize the mean Gaussian negative log-likelihood of the validation residuals r_nk under the
per-star variance V_nk = s_k(u_n)^2 + M_nk + E_nk (M, E: model and flux-noise variances) plus a
ridge penalty 0.5 lambda |b|^2 on the slopes (config ``laplace.scatter_ridge``; the covariates
are standardized, so lambda is scale free: it is compared with the curvature of the mean NLL,
at most 2 per unit of log s, and shrinks well-determined slopes by a few per cent (default 0.02)
but a direction along which two collinear covariates cancel, whose curvature is ~2 (1 - r),
towards 0).

The cap is what the validation stars support: cap_k is the q-quantile of |r_nk| over validation
stars (q = config ``laplace.scatter_cap_quantile``, 0.99 by default). No star's scatter exceeds
the size of the largest residuals seen on validation stars.

Calibration of the core: the residuals of a network are heavier-tailed than a Gaussian even
after the scatter model (a scale mixture: stars whose true scatter the covariates do not
resolve), and then no single Gaussian width gets both summaries of the standardized residuals
z = r / sqrt(V) right: the maximum-likelihood width gives std z near 1 but more than 68.3% of
the stars within 1 sigma (the tail stars widen every error bar), while the width that covers
68.3% gives std z above 1. With ``calibration`` 'balanced' (config
``laplace.scatter_calibration``, the default) each label's scatter is scaled after the fit by
c_k = sqrt(c_std c_cov), the geometric mean of the factors that make, on the validation stars,
std z = 1 (c_std) and the fraction with |z| < 1 equal to 68.3% (c_cov): halfway, in log
width, between the two, so that neither summary is off by more than the other ('fitted' keeps
c_k = 1). For Gaussian residuals both factors are 1. c_k is folded into the intercept a_k.

Correlations: the scatter covariance is D R D with D = diag(s_n) and R a correlation matrix
fitted on the validation residuals. The correlation rho of the standardized residuals
w_nk = r_nk / sqrt(V_nk) is estimated robustly (Spearman's rank correlation mapped to Pearson's
by rho = 2 sin(pi rho_S / 6), exact for Gaussian pairs), and R_ij is the value that makes the
mean predicted correlation of the total covariance equal it:

    R_ij = (rho_ij - mean_n[(M + E)_nij / sqrt(V_ni V_nj)]) / mean_n[s_ni s_nj / sqrt(V_ni V_nj)]

clipped to [-1, 1] and projected onto the positive semi-definite correlation matrices.

Kinds (config ``laplace.scatter``): ``likelihood`` uses the Laplace noise sigma_k
(``Posterior.scatter_covariance``); ``constant`` refits one level per label (b = 0) on
validation stars; ``linear`` fits a and b. Both fitted kinds fit R and the cap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.optimize import brentq, minimize

from pipeline.evaluation.calibration import nominal_coverage
from pipeline.exceptions import ConfigError, DataError, NumericalError

log = logging.getLogger(__name__)

KINDS = ("likelihood", "constant", "linear")
CALIBRATIONS = ("fitted", "balanced")
FIELDS = ("coef", "u_centre", "u_scale", "u_lo", "u_hi", "cap", "correlation")
TINY_VAR = 1e-300  # a star without flux noise (every pixel bad) gets the clip floor


def covariates(model_var: np.ndarray, noise_var: np.ndarray,
               labels: np.ndarray | None = None, degree: int = 1) -> np.ndarray:
    """u (N, K, 2) = [log model std, log noise std] of each label, uncentred; with predicted
    ``labels`` (N, K, standardized) u (N, K, 2 + degree K): the K labels and, for degree 2,
    their squares appended for every k."""
    u = 0.5 * np.log(np.maximum(np.stack([np.asarray(model_var, np.float64),
                                          np.asarray(noise_var, np.float64)], axis=-1),
                                TINY_VAR))
    if labels is None:
        return u
    labels = np.asarray(labels, np.float64)
    if labels.shape != u.shape[:2]:
        raise DataError(f"scatter covariates: predicted labels have shape {labels.shape}; "
                        f"expected {u.shape[:2]} (stars, labels), like the variances")
    if degree not in (1, 2):
        raise ConfigError(f"config key 'laplace.scatter_label_degree' = {degree!r}; valid: 1 "
                          "(the labels) or 2 (the labels and their squares)")
    powers = np.concatenate([labels**d for d in range(1, degree + 1)], axis=-1)
    return np.concatenate([u, np.broadcast_to(powers[:, None, :], u.shape[:2] + powers.shape[1:])],
                          axis=-1)


@dataclass
class ScatterModel:
    """Per label k: ``coef`` (K, 1 + C) = [a_k, b_k]; covariate centre, scale and clip range
    (K, C); ``cap`` (K,) the largest scatter; ``correlation`` (K, K) the matrix R. C = 2
    (model and noise stds), 2 + K (and the predicted labels) or 2 + 2K (and their squares):
    the stored arrays say which, so a model fitted before labels (or their squares) were
    covariates still loads and works."""

    coef: np.ndarray
    u_centre: np.ndarray
    u_scale: np.ndarray
    u_lo: np.ndarray
    u_hi: np.ndarray
    cap: np.ndarray
    correlation: np.ndarray

    @property
    def uses_labels(self) -> bool:
        """Whether the predicted labels are covariates (C > 2)."""
        return self.u_centre.shape[-1] > 2

    @property
    def label_degree(self) -> int:
        """0 (no label covariates), 1 (the labels) or 2 (and their squares)."""
        return (self.u_centre.shape[-1] - 2) // self.u_centre.shape[0]

    def design(self, u: np.ndarray) -> np.ndarray:
        """Design (N, K, 1 + C) = [1, clip(standardized u)] of covariates u (N, K, C)."""
        u = np.clip((u - self.u_centre) / self.u_scale, self.u_lo, self.u_hi)
        return np.concatenate([np.ones(u.shape[:-1] + (1,)), u], axis=-1)

    def std(self, model_var: np.ndarray, noise_var: np.ndarray,
            labels: np.ndarray | None = None) -> np.ndarray:
        """Scatter s (N, K), standardized units, of stars with model and flux-noise variances
        (N, K) and predicted labels (N, K), standardized units; never above ``cap``. The labels
        are needed when they are covariates (``uses_labels``) and ignored otherwise."""
        if self.uses_labels and labels is None:
            raise DataError("this scatter model has the predicted labels as covariates "
                            "(laplace.scatter_labels): pass the stars' predicted labels")
        u = covariates(model_var, noise_var, labels if self.uses_labels else None,
                       max(self.label_degree, 1))
        log_s = np.einsum("nkc,kc->nk", self.design(u), self.coef)
        return np.minimum(np.exp(log_s), self.cap)

    def covariance(self, model_var: np.ndarray, noise_var: np.ndarray,
                   labels: np.ndarray | None = None) -> np.ndarray:
        """Scatter covariance D R D (N, K, K), D = diag(``std``), standardized units."""
        s = self.std(model_var, noise_var, labels)
        return s[:, :, None] * self.correlation * s[:, None, :]

    # the name error_budget.scatter_covariance asks a posterior for: an ensemble passes its
    # ScatterModel where a single model passes its Posterior
    scatter_covariance = covariance

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in FIELDS}

    @classmethod
    def from_dict(cls, doc: dict) -> ScatterModel:
        missing = [k for k in FIELDS if k not in doc]
        if missing:
            raise DataError(f"posterior info['scatter'] lacks {missing}: it was written by an "
                            "older scatter model; rerun the laplace step to refit it")
        return cls(*(np.asarray(doc[k], np.float64) for k in FIELDS))


def _objective(c, f, r2, extra, ridge):
    """Mean Gaussian NLL (up to a constant) of residuals with variance exp(2 f c) + extra,
    plus 0.5 ridge |slopes|^2; and its gradient."""
    s2 = np.exp(2.0 * f @ c)
    v = s2 + extra
    n = len(r2)
    slopes = np.concatenate([[0.0], c[1:]])
    value = 0.5 * np.sum(np.log(v) + r2 / v) / n + 0.5 * ridge * slopes @ slopes
    grad = f.T @ ((1.0 / v - r2 / v**2) * s2) / n + ridge * slopes
    return value, grad


def robust_correlation(w: np.ndarray) -> np.ndarray:
    """Pearson correlation (K, K) of Gaussian columns of ``w`` (N, K) from Spearman's rho:
    2 sin(pi rho_S / 6), insensitive to a few outlying residuals."""
    rho_s = np.atleast_2d(stats.spearmanr(w).statistic)
    if w.shape[1] == 2:  # spearmanr returns a scalar for two columns
        rho_s = np.array([[1.0, rho_s[0, 0]], [rho_s[0, 0], 1.0]])
    return 2.0 * np.sin(np.pi * rho_s / 6.0)


def nearest_correlation(r: np.ndarray) -> np.ndarray:
    """Symmetric ``r`` clipped to [-1, 1], eigenvalues floored at 0, unit diagonal restored."""
    r = np.clip(0.5 * (r + r.T), -1.0, 1.0)
    vals, vecs = np.linalg.eigh(r)
    r = (vecs * np.maximum(vals, 0.0)) @ vecs.T
    d = np.sqrt(np.maximum(np.diag(r), TINY_VAR))
    r = r / d[:, None] / d[None, :]
    np.fill_diagonal(r, 1.0)
    return r


def fit_correlation(residual, s, model_cov, noise_cov) -> np.ndarray:
    """R (K, K) such that the mean predicted correlation of model + noise + D R D equals the
    robust correlation of the standardized validation residuals (module docstring)."""
    other = model_cov + noise_cov
    var = s**2 + np.diagonal(other, axis1=1, axis2=2)
    sd = np.sqrt(var)
    rho = robust_correlation(residual / sd)
    norm = sd[:, :, None] * sd[:, None, :]
    given = np.mean(other / norm, axis=0)
    share = np.mean(s[:, :, None] * s[:, None, :] / norm, axis=0)
    return nearest_correlation((rho - given) / np.maximum(share, TINY_VAR))


def _width_factor(residual, s, other_var, target, bound: float = 1e3) -> float:
    """c in [1 / bound, bound] with target(r / sqrt(c^2 s^2 + other_var)) = 0 (the summary
    decreases with c); the bound where none is inside, when the scatter term can hardly move
    the summary (a model and flux-noise variance that already exceed the residuals')."""
    def f(c):
        return target(residual / np.sqrt((c * s) ** 2 + other_var))
    lo, hi = 1.0 / bound, bound
    f_lo, f_hi = f(lo), f(hi)
    if f_lo <= 0 or f_hi >= 0:
        c = lo if f_lo <= 0 else hi
        log.warning("scatter calibration: no factor in [%g, %g] reaches the target; using %g",
                    lo, hi, c)
        return c
    return brentq(f, lo, hi, xtol=1e-12, rtol=1e-10)


def balanced_factor(residual: np.ndarray, s: np.ndarray, other_var: np.ndarray) -> float:
    """c = sqrt(c_std c_cov) for one label (module docstring): residuals r (N,), scatter s (N,)
    and the other variances (model and flux noise) (N,), all standardized units."""
    c_std = _width_factor(residual, s, other_var, lambda z: np.std(z) - 1.0)
    c_cov = _width_factor(residual, s, other_var,
                          lambda z: nominal_coverage(1.0) - np.mean(np.abs(z) < 1.0))
    return float(np.sqrt(c_std * c_cov))


def _as_covariance(a: np.ndarray, name: str, shape: tuple) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.shape == shape[:2]:
        return a[:, :, None] * np.eye(shape[1])
    if a.shape != shape:
        raise DataError(f"scatter fit: {name} has shape {a.shape}; expected {shape} "
                        f"(or variances {shape[:2]})")
    return a


def fit_scatter(residual: np.ndarray, model_cov: np.ndarray, noise_cov: np.ndarray,
                kind: str = "linear", ridge: float = 0.02,
                cap_quantile: float = 0.99, labels: np.ndarray | None = None,
                label_degree: int = 1, calibration: str = "balanced") -> ScatterModel:
    """Fit the scatter model to validation stars.

    Parameters
    ----------
    residual : (N, K) predicted minus true labels, standardized.
    model_cov, noise_cov : (N, K, K) each star's model (Laplace) and flux-noise covariances
        (or (N, K) variances, taken as diagonal), standardized units.
    kind : 'constant' or 'linear' ('likelihood' needs no fit).
    ridge : penalty lambda on the slopes (standardized covariates).
    cap_quantile : q of the cap, the q-quantile of |residual| per label.
    labels : (N, K) the stars' predicted labels, standardized, to be covariates too; None for
        the two-covariate model.
    label_degree : 1 (the labels) or 2 (the labels and their squares) when labels are given.
    calibration : 'balanced' scales each label's fitted scatter by :func:`balanced_factor`;
        'fitted' keeps the maximum-likelihood width.

    Returns
    -------
    ScatterModel; for 'constant' the slopes are zero.
    """
    if kind not in ("constant", "linear"):
        raise ConfigError(f"config key 'laplace.scatter' = {kind!r} is not fitted on validation "
                          f"stars; valid kinds: {', '.join(KINDS)}")
    if calibration not in CALIBRATIONS:
        raise ConfigError(f"config key 'laplace.scatter_calibration' = {calibration!r}; valid: "
                          f"{', '.join(CALIBRATIONS)}")
    residual = np.asarray(residual, np.float64)
    n, k_labels = residual.shape
    model_cov = _as_covariance(model_cov, "model_cov", (n, k_labels, k_labels))
    noise_cov = _as_covariance(noise_cov, "noise_cov", (n, k_labels, k_labels))
    model_var = np.diagonal(model_cov, axis1=1, axis2=2)
    noise_var = np.diagonal(noise_cov, axis1=1, axis2=2)
    u = covariates(model_var, noise_var, labels, label_degree)
    centre, scale = u.mean(axis=0), u.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # a constant covariate: its slope stays 0
    std_u = (u - centre) / scale
    model = ScatterModel(np.zeros((k_labels, 1 + u.shape[-1])), centre, scale, std_u.min(axis=0),
                         std_u.max(axis=0), np.quantile(np.abs(residual), cap_quantile, axis=0),
                         np.eye(k_labels))
    f_all = model.design(u)
    extra_var = model_var + noise_var
    for k in range(k_labels):
        f = f_all[:, k, :1] if kind == "constant" else f_all[:, k]
        r2 = residual[:, k] ** 2
        start = np.zeros(f.shape[1])
        start[0] = 0.5 * np.log(max(np.mean(np.maximum(r2 - extra_var[:, k], 0.0)), 1e-12))
        res = minimize(_objective, start, args=(f, r2, extra_var[:, k], ridge), jac=True,
                       method="L-BFGS-B", options={"maxiter": 500, "ftol": 1e-14, "gtol": 1e-10})
        if not np.all(np.isfinite(res.x)):
            raise NumericalError(f"the scatter fit of label {k} did not converge: {res.message}")
        model.coef[k, :f.shape[1]] = res.x
    if calibration == "balanced":
        s = model.std(model_var, noise_var, labels)
        factor = np.array([balanced_factor(residual[:, k], s[:, k], extra_var[:, k])
                           for k in range(k_labels)])
        model.coef[:, 0] += np.log(factor)
        log.info("balanced scatter calibration: the maximum-likelihood scatter scaled by %s",
                 np.array2string(factor, precision=3))
    model.correlation = fit_correlation(residual, model.std(model_var, noise_var, labels),
                                        model_cov, noise_cov)
    return model


def fit_configured(residual: np.ndarray, model_cov: np.ndarray, noise_cov: np.ndarray,
                   labels: np.ndarray, cfg: dict) -> ScatterModel:
    """``fit_scatter`` as the ``laplace`` config section says (``scatter``, ``scatter_ridge``,
    ``scatter_cap_quantile``, ``scatter_labels``, ``scatter_label_degree``,
    ``scatter_calibration``); ``labels`` are the stars' predicted labels, standardized, used
    when ``scatter_labels`` is true."""
    return fit_scatter(residual, model_cov, noise_cov, cfg["scatter"], ridge=cfg["scatter_ridge"],
                       cap_quantile=cfg["scatter_cap_quantile"],
                       labels=labels if cfg["scatter_labels"] else None,
                       label_degree=cfg.get("scatter_label_degree", 1),
                       calibration=cfg.get("scatter_calibration", "balanced"))
