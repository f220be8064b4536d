"""The scatter term of the error budget: aleatoric label scatter calibrated on validation stars.

The Laplace likelihood has one noise level sigma_k per label (``Posterior.noise_std``), fitted
with the prior precision. The misfit of a real network is not that uniform: it is larger for
hot dwarfs and metal-poor stars with weak lines than for cool giants with strong ones, and
larger where the network is poorly constrained. A single level then gives errors that are
right on average but too large for most stars and too small for the rest (heavy-tailed
z-scores: interval coverage off even when their standard deviation is 1).

The scatter model lets the level depend on where the star lies and on how well the data
constrain it, through covariates u (3K,): the standardized predicted labels z, and the logs of
the star's model (Laplace) and flux-noise standard deviations, each centred on its validation
mean:

    log s_k(u) = a_k + b_k . clip(u, u_lo, u_hi)

fitted label by label by minimizing the Gaussian negative log-likelihood of the validation
residuals r_nk under the per-star variance

    V_nk = s_k(u_n)^2 + M_nk + E_nk

where M is the model variance and E the flux-noise variance of the star: the scatter explains
what the other two parts do not, and grows where they say the network knows less. Clipping u
to the range seen in the validation set keeps the scatter of extrapolated stars bounded (they
are flagged by the predict step).

Kinds (config ``laplace.scatter``): ``likelihood`` uses the Laplace noise sigma_k unchanged;
``constant`` refits one level per label (b = 0) on validation stars; ``linear`` fits a and b.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from pipeline.exceptions import ConfigError, NumericalError

KINDS = ("likelihood", "constant", "linear")


def covariates(z: np.ndarray, model_var: np.ndarray, noise_var: np.ndarray) -> np.ndarray:
    """u = [z, log model std, log noise std] (N, 3K), all standardized units, uncentred."""
    tiny = 1e-300  # a star without flux noise (every pixel bad) gets the clip floor
    return np.hstack([np.asarray(z, np.float64),
                      0.5 * np.log(np.maximum(np.asarray(model_var, np.float64), tiny)),
                      0.5 * np.log(np.maximum(np.asarray(noise_var, np.float64), tiny))])


@dataclass
class ScatterModel:
    """Coefficients ``coef`` (K, 1 + 3K) = [a_k, b_k]; covariate centre and clip range (3K,)."""

    coef: np.ndarray
    u_centre: np.ndarray
    u_lo: np.ndarray
    u_hi: np.ndarray

    def std(self, z: np.ndarray, model_var: np.ndarray, noise_var: np.ndarray) -> np.ndarray:
        """Scatter s_k (N, K), standardized units, from standardized predictions z (N, K) and
        the stars' model and flux-noise variances (N, K), standardized units."""
        return np.exp(self.design(covariates(z, model_var, noise_var)) @ self.coef.T)

    def design(self, u: np.ndarray) -> np.ndarray:
        """Design matrix [1, clip(u) - centre] (N, 1 + 3K)."""
        u = np.clip(u, self.u_lo, self.u_hi) - self.u_centre
        return np.hstack([np.ones((u.shape[0], 1)), u])

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("coef", "u_centre", "u_lo", "u_hi")}

    @classmethod
    def from_dict(cls, doc: dict) -> ScatterModel:
        return cls(*(np.asarray(doc[k], np.float64)
                     for k in ("coef", "u_centre", "u_lo", "u_hi")))


def _nll(c, f, r2, extra):
    """Gaussian NLL (up to a constant) of residuals with variance exp(2 f c) + extra; gradient."""
    s2 = np.exp(2.0 * f @ c)
    v = s2 + extra
    value = 0.5 * np.sum(np.log(v) + r2 / v)
    grad = f.T @ ((1.0 / v - r2 / v**2) * s2)
    return value, grad


def fit_scatter(z: np.ndarray, residual: np.ndarray, model_var: np.ndarray,
                noise_var: np.ndarray, kind: str = "linear") -> ScatterModel:
    """Fit the scatter model to validation stars.

    Parameters
    ----------
    z : (N, K) standardized predicted labels.
    residual : (N, K) predicted minus true labels, standardized.
    model_var, noise_var : (N, K) each star's model (Laplace) and flux-noise variances,
        standardized units.
    kind : 'constant' or 'linear' ('likelihood' needs no fit).

    Returns
    -------
    ScatterModel; for 'constant' the slopes are zero.
    """
    if kind not in ("constant", "linear"):
        raise ConfigError(f"config key 'laplace.scatter' = {kind!r} is not fitted on validation "
                          f"stars; valid kinds: {', '.join(KINDS)}")
    residual = np.asarray(residual, np.float64)
    extra_var = np.asarray(model_var, np.float64) + np.asarray(noise_var, np.float64)
    u = covariates(z, model_var, noise_var)
    model = ScatterModel(np.zeros((residual.shape[1], 1 + u.shape[1])), u.mean(axis=0),
                         u.min(axis=0), u.max(axis=0))
    f = model.design(u)
    if kind == "constant":
        f = f[:, :1]
    coef = model.coef
    for k in range(z.shape[1]):
        r2 = residual[:, k] ** 2
        start = np.zeros(f.shape[1])
        start[0] = 0.5 * np.log(max(np.mean(np.maximum(r2 - extra_var[:, k], 0.0)), 1e-12))
        res = minimize(_nll, start, args=(f, r2, extra_var[:, k]), jac=True, method="L-BFGS-B",
                       options={"maxiter": 500, "ftol": 1e-14, "gtol": 1e-9})
        if not np.all(np.isfinite(res.x)):
            raise NumericalError(f"the scatter fit of label {k} did not converge: {res.message}")
        coef[k, :f.shape[1]] = res.x
    return model
