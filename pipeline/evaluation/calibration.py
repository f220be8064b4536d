"""Calibration and accuracy of predicted labels and their error bars.

For a label with predictions mu_n, predicted 1-sigma errors s_n and true values y_n:

    z_n = (mu_n - y_n) / s_n                       z-score; N(0, 1) if the errors are right
    coverage(k) = mean(|z_n| < k)                  k = 1, 2, 3 -> nominal 68.27, 95.45, 99.73 %
    NLL = mean(0.5 log(2 pi s_n^2) + 0.5 z_n^2)    Gaussian negative log-likelihood
    ENCE = (1/B) sum_b |RMV_b - RMSE_b| / RMV_b    expected normalized calibration error
                                                   (Levi et al. 2022) over B equal-count bins of
                                                   s_n, RMV_b = sqrt(mean s^2), RMSE_b =
                                                   sqrt(mean (mu - y)^2) within bin b
    CRPS = mean(s_n [z_n (2 Phi(z_n) - 1) + 2 phi(z_n) - 1 / sqrt(pi)])
                                                   continuous ranked probability score of the
                                                   Gaussian predictive N(mu_n, s_n^2) (Gneiting &
                                                   Raftery 2007), = E|X - y| - E|X - X'| / 2;
                                                   label units, lower is better, rewards sharp
                                                   and calibrated errors alike

Z_STD_SE and COVERAGE_68.3_SE are the sampling standard errors of z std and 1-sigma coverage
for calibrated Gaussian errors and the bin's N stars (:func:`sampling_errors`): how far the two
may stray from 1 and 68.27% by chance.

Accuracy: bias = mean(mu - y), RMSE, robust scatter = 1.4826 median(|r - median(r)|).
Cramér–Rao comparison (synthetic data, where the bound is computable): median of
s_n / sigma_CRB,n, and the robust scatter of (mu_n - y_n) / sigma_CRB,n (1 for an efficient,
unbiased estimator). The bound holds for unbiased estimators only: a network that shrinks its
predictions towards the centre of the training labels is biased and can scatter less than the
bound (its mean squared error still includes the bias), so values below 1 are not an error.
Stars with a non-finite prediction, error or truth are left out of every statistic.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

MAD_TO_SIGMA = 1.4826
COVERAGE_K = (1.0, 2.0, 3.0)


def nominal_coverage(k: float) -> float:
    """P(|z| < k) for z ~ N(0, 1)."""
    return float(2.0 * stats.norm.cdf(k) - 1.0)


def robust_scatter(x: np.ndarray) -> float:
    """1.4826 x median absolute deviation: the standard deviation for Gaussian ``x``."""
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return float("nan")
    return float(MAD_TO_SIGMA * np.median(np.abs(x - np.median(x))))


def ence(residual: np.ndarray, sigma: np.ndarray, n_bins: int) -> float:
    """Expected normalized calibration error over equal-count bins of predicted ``sigma``."""
    n = residual.size
    if n == 0:
        return float("nan")
    order = np.argsort(sigma, kind="stable")
    bins = np.array_split(order, min(n_bins, n))
    rmv = np.array([np.sqrt(np.mean(sigma[b] ** 2)) for b in bins])
    rmse = np.array([np.sqrt(np.mean(residual[b] ** 2)) for b in bins])
    return float(np.mean(np.abs(rmv - rmse) / rmv))


def crps_gaussian(residual: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """CRPS of Gaussian predictives N(mu, sigma^2) at the truths y, residual = mu - y:
    sigma [z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)] with z = residual / sigma (symmetric
    in z, so the sign convention of the residual does not matter)."""
    z = np.asarray(residual, np.float64) / np.asarray(sigma, np.float64)
    return sigma * (z * (2.0 * stats.norm.cdf(z) - 1.0) + 2.0 * stats.norm.pdf(z)
                    - 1.0 / np.sqrt(np.pi))


def finite_rows(*arrays: np.ndarray) -> np.ndarray:
    """Boolean mask of entries finite in every array (and sigma > 0 is checked by callers)."""
    good = np.ones(np.shape(arrays[0]), bool)
    for a in arrays:
        good &= np.isfinite(a)
    return good


def sampling_errors(n: int) -> dict:
    """How far Z_STD and COVERAGE_68.3 of ``n`` stars stray by chance when the errors are
    right (z ~ N(0, 1)): the standard errors 1 / sqrt(2 (n - 1)) of a Gaussian sample's
    standard deviation and sqrt(p (1 - p) / n), p = 0.683, of a binomial fraction. A bin of
    300 stars has 2.7 points on its coverage: departures of that size are noise, not
    miscalibration."""
    p = nominal_coverage(1.0)
    nan = float("nan")
    return {"Z_STD_SE": 1.0 / np.sqrt(2.0 * (n - 1)) if n > 1 else nan,
            "COVERAGE_68.3_SE": float(np.sqrt(p * (1.0 - p) / n)) if n > 0 else nan}


def calibration_metrics(pred: np.ndarray, sigma: np.ndarray, true: np.ndarray,
                        n_bins: int) -> dict:
    """Calibration statistics of one label (see module docstring).

    Parameters
    ----------
    pred, sigma, true : (N,) predictions, predicted total 1-sigma errors, true values.
    n_bins : bins of the ENCE.
    """
    pred, sigma, true = (np.asarray(a, np.float64) for a in (pred, sigma, true))
    good = finite_rows(pred, sigma, true) & (sigma > 0)
    residual = pred[good] - true[good]
    s = sigma[good]
    z = residual / s
    out = {"N": int(good.sum())}
    out["Z_MEAN"] = float(np.mean(z)) if z.size else float("nan")
    out["Z_STD"] = float(np.std(z, ddof=1)) if z.size > 1 else float("nan")
    for k in COVERAGE_K:
        level = 100.0 * nominal_coverage(k)
        out[f"COVERAGE_{level:.1f}"] = float(np.mean(np.abs(z) < k)) if z.size else float("nan")
    out.update(sampling_errors(out["N"]))
    nll = 0.5 * np.log(2.0 * np.pi * s**2) + 0.5 * z**2
    out["NLL"] = float(np.mean(nll)) if z.size else float("nan")
    out["ENCE"] = ence(residual, s, n_bins)
    out["CRPS"] = float(np.mean(crps_gaussian(residual, s))) if z.size else float("nan")
    return out


def crb_metrics(pred: np.ndarray, sigma: np.ndarray, true: np.ndarray,
                crb_sigma: np.ndarray) -> dict:
    """Predicted error and actual scatter of one label relative to its Cramér–Rao bound."""
    pred, sigma, true, crb_sigma = (np.asarray(a, np.float64)
                                    for a in (pred, sigma, true, crb_sigma))
    good = finite_rows(pred, sigma, true, crb_sigma) & (crb_sigma > 0)
    if not good.any():
        return {"ERR_OVER_CRB": float("nan"), "SCATTER_OVER_CRB": float("nan")}
    return {
        "ERR_OVER_CRB": float(np.median(sigma[good] / crb_sigma[good])),
        "SCATTER_OVER_CRB": robust_scatter((pred[good] - true[good]) / crb_sigma[good]),
    }


def accuracy_metrics(pred: np.ndarray, true: np.ndarray) -> dict:
    """Bias, RMSE, robust scatter and star count of one label (finite pairs only)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    good = finite_rows(pred, true)
    r = pred[good] - true[good]
    if r.size == 0:
        nan = float("nan")
        return {"bias": nan, "rmse": nan, "robust_scatter": nan, "n_stars": 0}
    return {
        "bias": float(np.mean(r)),
        "rmse": float(np.sqrt(np.mean(r**2))),
        "robust_scatter": robust_scatter(r),
        "n_stars": int(r.size),
    }
