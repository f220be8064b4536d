"""The scatter term of the error budget: aleatoric label scatter calibrated on validation stars.

The Laplace likelihood has one noise level sigma_k per label (``Posterior.noise_std``), fitted
with the prior precision. The misfit of a real network is not that uniform: it is larger for
hot dwarfs with weak lines than for cool giants with strong ones. A single level then gives
errors that are right on average but too large for most stars and too small for the rest
(heavy-tailed z-scores: interval coverage off even when their standard deviation is 1).

The scatter model lets the level depend on where the star lies in label space:

    log s_k(z) = a_k + b_k . clip(z, z_lo, z_hi)        z: standardized predicted labels (K,)

fitted label by label by minimizing the Gaussian negative log-likelihood of the validation
residuals r_nk under the per-star variance

    V_nk = s_k(z_n)^2 + M_nk + E_nk

where M is the model (Laplace) variance and E the flux-noise variance of the star: the scatter
explains what the other two parts do not. Clipping z to the range seen in the validation set
keeps the scatter of extrapolated stars bounded (they are flagged by the predict step).

Kinds (config ``laplace.scatter``): ``likelihood`` uses the Laplace noise sigma_k unchanged;
``constant`` refits one level per label (b = 0) on validation stars; ``linear`` fits a and b.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from pipeline.exceptions import ConfigError, NumericalError

KINDS = ("likelihood", "constant", "linear")


@dataclass
class ScatterModel:
    """Coefficients ``coef`` (K, 1 + K) = [a_k, b_k] and the clip range ``z_lo``, ``z_hi`` (K,)."""

    coef: np.ndarray
    z_lo: np.ndarray
    z_hi: np.ndarray

    def std(self, z: np.ndarray) -> np.ndarray:
        """Scatter s_k(z_n) (N, K) in standardized units for standardized predictions z (N, K)."""
        return np.exp(design(z, self.z_lo, self.z_hi) @ self.coef.T)

    def to_dict(self) -> dict:
        return {"coef": self.coef.tolist(), "z_lo": self.z_lo.tolist(),
                "z_hi": self.z_hi.tolist()}

    @classmethod
    def from_dict(cls, doc: dict) -> ScatterModel:
        return cls(*(np.asarray(doc[k], np.float64) for k in ("coef", "z_lo", "z_hi")))


def design(z: np.ndarray, z_lo: np.ndarray, z_hi: np.ndarray) -> np.ndarray:
    """Design matrix [1, clip(z)] (N, 1 + K)."""
    z = np.clip(np.asarray(z, np.float64), z_lo, z_hi)
    return np.hstack([np.ones((z.shape[0], 1)), z])


def _nll(c, f, r2, extra):
    """Gaussian NLL (up to a constant) of residuals with variance exp(2 f c) + extra; gradient."""
    s2 = np.exp(2.0 * f @ c)
    v = s2 + extra
    value = 0.5 * np.sum(np.log(v) + r2 / v)
    grad = f.T @ ((1.0 / v - r2 / v**2) * s2)
    return value, grad


def fit_scatter(z: np.ndarray, residual: np.ndarray, extra_var: np.ndarray,
                kind: str = "linear") -> ScatterModel:
    """Fit the scatter model to validation stars.

    Parameters
    ----------
    z : (N, K) standardized predicted labels.
    residual : (N, K) predicted minus true labels, standardized.
    extra_var : (N, K) the other variances of each star (model + flux noise), standardized.
    kind : 'constant' or 'linear' ('likelihood' needs no fit).

    Returns
    -------
    ScatterModel; for 'constant' the slopes are zero.
    """
    if kind not in ("constant", "linear"):
        raise ConfigError(f"config key 'laplace.scatter' = {kind!r} is not fitted on validation "
                          f"stars; valid kinds: {', '.join(KINDS)}")
    z, residual = np.asarray(z, np.float64), np.asarray(residual, np.float64)
    extra_var = np.asarray(extra_var, np.float64)
    z_lo, z_hi = z.min(axis=0), z.max(axis=0)
    f = design(z, z_lo, z_hi)
    if kind == "constant":
        f = f[:, :1]
    coef = np.zeros((z.shape[1], 1 + z.shape[1]))
    for k in range(z.shape[1]):
        r2 = residual[:, k] ** 2
        start = np.zeros(f.shape[1])
        start[0] = 0.5 * np.log(max(np.mean(np.maximum(r2 - extra_var[:, k], 0.0)), 1e-12))
        res = minimize(_nll, start, args=(f, r2, extra_var[:, k]), jac=True, method="L-BFGS-B",
                       options={"maxiter": 500, "ftol": 1e-14, "gtol": 1e-9})
        if not np.all(np.isfinite(res.x)):
            raise NumericalError(f"the scatter fit of label {k} did not converge: {res.message}")
        coef[k, :f.shape[1]] = res.x
    return ScatterModel(coef, z_lo, z_hi)
