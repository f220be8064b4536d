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

(with the emulator offset, a second component under the cap, below).

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

The emulator offset (config ``laplace.scatter_emulator``): the label -> flux emulator
(pipeline.evaluation.emulator) fits the whole spectrum by chi^2 and is a second, independent
estimate of the labels. On the default run its median error is a third of the network's but
its tail (a fit in a local minimum) as heavy, and where the two disagree the network is
usually the one that missed: |z| correlates with the offset at Spearman 0.46-0.71 on
validation and test stars, with nothing else above 0.12. Where they agree, they may still
both be wrong, in the same direction: hot metal-poor stars, whose weak lines leave both with
the same degeneracy. So the offset adds a second scatter component instead of scaling the
first, a hinge that is zero for the bulk of the stars:

    s_k^2 = exp(2 (a_k + b_k . u_k)) + w_k h_nk,
    h_nk = max(d_nk^2 - c^2 (m_k^2 + E_nk), 0),   d_nk = zhat_nk - zhat^emu_nk:

the scatter the two estimates share, which only the star's place in label space predicts,
plus the scatter their disagreement reveals. d is the offset of the network's label from the
emulator's best-fit label of the same spectrum (standardized units), counted beyond c =
``OFFSET_HINGE`` (2) times the offset typical of such a star: m_k, the validation median |d_k|,
and the star's own flux-noise std sqrt(E_nk). At low SNR both estimates move with the noise, the
network much more than the emulator, so d is mostly the network's noise error, which the
flux-noise term already carries; an offset that is only noise crosses the hinge for 4.6% of
stars (32% with E itself as its part, which made the shift suite's SNR-12 errors too wide). The
weight w_k >= 0 is fitted with the first component by maximum likelihood. Why a hinge: the small
offsets of most stars are mostly the network's realized error, and a width that follows them
makes the z-scores lighter-tailed than a Gaussian (a component log-linear in log(d^2 + g^2), g
half the median |d|, did); with a floor under it (a larger g) the floor's variance lands on
every star and the most precise stars get errors much too wide. The hinge leaves the first
component in charge below it and widens the errors only of the stars whose offset is well beyond
the typical one, the network's large misses. Five-fold cross-validation on the validation stars
(``python -m benchmarks.scatter_refit --results results --hinge-scan``) finds c = 1-3 alike
there, all better than no component; c = 2 for the noise above, which validation spectra (SNR
30-300) do not test. A star whose emulator fit failed (no labels) gets the cap.

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
from dataclasses import dataclass, field

import numpy as np
from scipy import stats
from scipy.optimize import brentq, minimize

from pipeline.config import scatter_uses_emulator as uses_emulator
from pipeline.evaluation.calibration import nominal_coverage
from pipeline.exceptions import ConfigError, DataError, NumericalError

log = logging.getLogger(__name__)

KINDS = ("likelihood", "constant", "linear")
OFFSET_HINGE = 2.0  # the hinge factor c of the offset component (module docstring)
CALIBRATIONS = ("fitted", "balanced")
FIELDS = ("coef", "u_centre", "u_scale", "u_lo", "u_hi", "cap", "correlation")
# absent from models without the offset component
OFFSET_FIELDS = ("offset_typical", "offset_hinge", "offset_weight")
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


def offset_excess(offset: np.ndarray, typical: np.ndarray, hinge: np.ndarray,
                  noise_var: np.ndarray) -> np.ndarray:
    """h (N, K) = max(d^2 - c^2 (m^2 + E), 0) of the emulator offsets d (N, K), the typical
    offsets m (K,), the hinge factors c (K,) and the flux-noise variances E (N, K), all
    standardized; a star without an offset (NaN: its emulator fit failed) gets +inf, so its
    scatter is the cap."""
    offset = np.asarray(offset, np.float64)
    typical2 = np.asarray(typical) ** 2 + np.asarray(noise_var, np.float64)
    h = np.maximum(offset**2 - np.asarray(hinge) ** 2 * typical2, 0.0)
    return np.where(np.isnan(offset), np.inf, h)


@dataclass
class ScatterModel:
    """Per label k: ``coef`` (K, 1 + C) = [a_k, b_k]; covariate centre, scale and clip range
    (K, C); ``cap`` (K,) the largest scatter; ``correlation`` (K, K) the matrix R;
    ``offset_typical`` (K,) the typical offsets m_k, ``offset_hinge`` (K,) the hinge factor c
    and ``offset_weight`` (K,) the weights w_k of the emulator-offset component, empty when
    the model has none. C = 2 (model and noise stds), + K (the predicted labels) or + 2K (and
    their squares): the stored arrays say which, so a model fitted without some of these
    covariates still loads and works."""

    coef: np.ndarray
    u_centre: np.ndarray
    u_scale: np.ndarray
    u_lo: np.ndarray
    u_hi: np.ndarray
    cap: np.ndarray
    correlation: np.ndarray
    offset_typical: np.ndarray = field(default_factory=lambda: np.zeros(0))
    offset_hinge: np.ndarray = field(default_factory=lambda: np.zeros(0))
    offset_weight: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def uses_offset(self) -> bool:
        """Whether the model has the emulator-offset component (``offset_typical`` set)."""
        return self.offset_typical.size > 0

    @property
    def label_degree(self) -> int:
        """0 (no label covariates), 1 (the labels) or 2 (and their squares)."""
        return (self.u_centre.shape[-1] - 2) // self.u_centre.shape[0]

    @property
    def uses_labels(self) -> bool:
        """Whether the predicted labels are covariates."""
        return self.label_degree > 0

    def design(self, u: np.ndarray) -> np.ndarray:
        """Design (N, K, 1 + C) = [1, clip(standardized u)] of covariates u (N, K, C)."""
        u = np.clip((u - self.u_centre) / self.u_scale, self.u_lo, self.u_hi)
        return np.concatenate([np.ones(u.shape[:-1] + (1,)), u], axis=-1)

    def covariates(self, model_var, noise_var, labels=None) -> np.ndarray:
        """u (N, K, C) of stars as this model takes them (module docstring): predicted
        ``labels`` (N, K, standardized) needed when they are covariates, ignored otherwise."""
        if self.uses_labels and labels is None:
            raise DataError("this scatter model has the predicted labels as covariates "
                            "(laplace.scatter_labels): pass the stars' predicted labels")
        return covariates(model_var, noise_var, labels if self.uses_labels else None,
                          max(self.label_degree, 1))

    def std(self, model_var: np.ndarray, noise_var: np.ndarray,
            labels: np.ndarray | None = None, offset: np.ndarray | None = None) -> np.ndarray:
        """Scatter s (N, K), standardized units, of stars with model and flux-noise variances
        (N, K), predicted labels (see :meth:`covariates`) and offsets from the emulator's
        best-fit labels (N, K, needed when ``uses_offset``), standardized units; never above
        ``cap``."""
        f = self.design(self.covariates(model_var, noise_var, labels))
        s2 = np.exp(2.0 * np.einsum("nkc,kc->nk", f, self.coef))
        if self.uses_offset:
            if offset is None:
                raise DataError("this scatter model has an emulator-offset component "
                                "(laplace.scatter_emulator): pass the offsets of the stars' "
                                "predicted labels from the emulator's best-fit labels (the "
                                "predict step needs the emulator file, --emulator)")
            with np.errstate(invalid="ignore"):  # inf x 0 weight: the cap below
                s2 = s2 + np.nan_to_num(self.offset_weight * offset_excess(
                    offset, self.offset_typical, self.offset_hinge, noise_var), nan=np.inf)
        return np.minimum(np.sqrt(s2), self.cap)

    def covariance(self, model_var: np.ndarray, noise_var: np.ndarray,
                   labels: np.ndarray | None = None,
                   offset: np.ndarray | None = None) -> np.ndarray:
        """Scatter covariance D R D (N, K, K), D = diag(``std``), standardized units."""
        s = self.std(model_var, noise_var, labels, offset)
        return s[:, :, None] * self.correlation * s[:, None, :]

    # the name error_budget.scatter_covariance asks a posterior for: an ensemble passes its
    # ScatterModel where a single model passes its Posterior
    scatter_covariance = covariance

    def describe(self) -> str:
        """The fitted numbers for a log line: coefficients, offset component, cap, R."""
        offset = ""
        if self.uses_offset:
            offset = (", emulator-offset weights "
                      f"{np.array2string(self.offset_weight, precision=4)} beyond "
                      f"{self.offset_hinge[0]:g} x typical offsets "
                      f"{np.array2string(self.offset_typical, precision=4)}")
        return (f"coefficients {np.array2string(self.coef, precision=4)}{offset}, cap "
                f"{np.array2string(self.cap, precision=4)}, correlation "
                f"{np.array2string(self.correlation, precision=3)}")

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in (*FIELDS, *OFFSET_FIELDS)}

    @classmethod
    def from_dict(cls, doc: dict) -> ScatterModel:
        missing = [k for k in FIELDS if k not in doc]
        if missing:
            raise DataError(f"posterior info['scatter'] lacks {missing}: it was written by an "
                            "older scatter model; rerun the laplace step to refit it")
        if "offset_coef" in doc:  # the log-linear offset component of a development version
            raise DataError("posterior info['scatter'] has an emulator-offset component of an "
                            "older form (offset_coef); rerun the laplace step to refit it")
        return cls(*(np.asarray(doc[k], np.float64) for k in FIELDS),
                   **{k: np.asarray(doc.get(k, []), np.float64) for k in OFFSET_FIELDS})


def _objective(c, designs, r2, extra, ridge, weights=None):
    """Mean Gaussian NLL (up to a constant) of residuals with variance
    sum_j m_j exp(2 f_j c_j) + extra over the scatter components' ``designs`` f_j (N, C_j) and
    fixed multipliers ``weights`` m_j (N,; 1 when None), c the c_j concatenated, plus
    0.5 ridge |slopes|^2 (every entry but each component's first); and its gradient."""
    parts = np.split(c, np.cumsum([f.shape[1] for f in designs])[:-1])
    weights = weights or [1.0] * len(designs)
    s2 = [m * np.exp(2.0 * f @ cj) for f, cj, m in zip(designs, parts, weights, strict=True)]
    v = sum(s2) + extra
    n = len(r2)
    slopes = np.concatenate([np.concatenate([[0.0], cj[1:]]) for cj in parts])
    value = 0.5 * np.sum(np.log(v) + r2 / v) / n + 0.5 * ridge * slopes @ slopes
    w = (1.0 / v - r2 / v**2) / n
    grad = np.concatenate([f.T @ (w * sj) for f, sj in zip(designs, s2, strict=True)])
    return value, grad + ridge * slopes


def _minimize(designs, r2, extra, ridge, start, label, weights=None):
    res = minimize(_objective, start, args=(designs, r2, extra, ridge, weights), jac=True,
                   method="L-BFGS-B", options={"maxiter": 1000, "ftol": 1e-14, "gtol": 1e-10})
    if not np.all(np.isfinite(res.x)):
        raise NumericalError(f"the scatter fit of label {label} did not converge: {res.message}")
    return res.x


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
                label_degree: int = 1, calibration: str = "balanced",
                offset: np.ndarray | None = None,
                offset_hinge: float = OFFSET_HINGE) -> ScatterModel:
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
    offset : (N, K) the stars' predicted minus emulator best-fit labels, standardized, for the
        emulator-offset component (NaN where the emulator fit failed); None leaves it out.
    offset_hinge : the hinge factor c of that component (module docstring).

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
    typical, hinge, excess = np.zeros(0), np.zeros(0), None
    if offset is not None:
        if np.isnan(offset).all(axis=0).any():
            raise DataError("scatter fit: no validation star has an emulator offset; every "
                            "emulator fit failed, or set laplace.scatter_emulator to false")
        typical = np.nanmedian(np.abs(offset), axis=0)
        hinge = np.full(k_labels, float(offset_hinge))
        excess = offset_excess(offset, typical, hinge, noise_var)
        # stars whose emulator fit failed count as the largest offset seen
        finite = np.isfinite(excess)
        excess = np.where(finite, excess, np.max(excess, axis=0, where=finite, initial=0.0))
    centre, scale = u.mean(axis=0), u.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # a constant covariate: its slope stays 0
    std_u = (u - centre) / scale
    model = ScatterModel(np.zeros((k_labels, 1 + u.shape[-1])), centre, scale, std_u.min(axis=0),
                         std_u.max(axis=0), np.quantile(np.abs(residual), cap_quantile, axis=0),
                         np.eye(k_labels), typical, hinge,
                         np.zeros(k_labels) if offset is not None else np.zeros(0))
    f_all = model.design(u)
    extra_var = model_var + noise_var
    for k in range(k_labels):
        f = f_all[:, k, :1] if kind == "constant" else f_all[:, k]
        r2 = residual[:, k] ** 2
        start = np.zeros(f.shape[1])
        start[0] = 0.5 * np.log(max(np.mean(np.maximum(r2 - extra_var[:, k], 0.0)), 1e-12))
        model.coef[k, :f.shape[1]] = _minimize([f], r2, extra_var[:, k], ridge, start, k)
        if model.uses_offset:  # then both components together, from the shared one's fit;
            # the second is w h with w = exp(2 a'): a design of ones, h its multiplier
            both = _minimize([f, np.ones((n, 1))], r2, extra_var[:, k], ridge,
                             np.append(model.coef[k, :f.shape[1]], np.log(0.5) / 2), k,
                             weights=[1.0, excess[:, k]])
            model.coef[k, :f.shape[1]], model.offset_weight[k] = both[:-1], np.exp(2 * both[-1])
    if calibration == "balanced":
        s = model.std(model_var, noise_var, labels, offset)
        factor = np.array([balanced_factor(residual[:, k], s[:, k], extra_var[:, k])
                           for k in range(k_labels)])
        model.coef[:, 0] += np.log(factor)
        if model.uses_offset:
            model.offset_weight *= factor**2
        log.info("balanced scatter calibration: the maximum-likelihood scatter scaled by %s",
                 np.array2string(factor, precision=3))
    model.correlation = fit_correlation(residual, model.std(model_var, noise_var, labels, offset),
                                        model_cov, noise_cov)
    return model


def fit_configured(residual: np.ndarray, model_cov: np.ndarray, noise_cov: np.ndarray,
                   labels: np.ndarray, cfg: dict, offset: np.ndarray | None = None
                   ) -> ScatterModel:
    """``fit_scatter`` as the ``laplace`` config section says (``scatter``, ``scatter_ridge``,
    ``scatter_cap_quantile``, ``scatter_labels``, ``scatter_label_degree``,
    ``scatter_calibration``, ``scatter_emulator``); ``labels`` are the stars' predicted
    labels, standardized, used when ``scatter_labels`` is true; ``offset`` their offsets from
    the emulator's best-fit labels, standardized, needed when ``scatter_emulator`` is true."""
    if uses_emulator(cfg) and offset is None:
        raise ConfigError("config key 'laplace.scatter_emulator' is true but no emulator "
                          "offsets were given: pass the emulator file (--emulator, the "
                          "emulator step's emulator.npz) or set it to false")
    return fit_scatter(residual, model_cov, noise_cov, cfg["scatter"], ridge=cfg["scatter_ridge"],
                       cap_quantile=cfg["scatter_cap_quantile"],
                       labels=labels if cfg["scatter_labels"] else None,
                       label_degree=cfg.get("scatter_label_degree", 1),
                       calibration=cfg.get("scatter_calibration", "balanced"),
                       offset=offset if uses_emulator(cfg) else None)

