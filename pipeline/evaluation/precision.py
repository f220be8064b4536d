"""How precise the network's labels are, next to two baselines fitted on the same data.

Data: training flux X (N, P), labels Y (N, 3); validation and test sets alike. Flux is centred
by the training mean x0 (X_c = X - x0), labels standardized by the training mean and standard
deviation (y -> (y - m) / s), so neither model needs an intercept. Predictions are mapped back
to physical units (y = m + s y_std).

**Linear ridge regression** (all N training stars):

    W(lambda) = argmin_W ||X_c W - Y||^2 + lambda ||W||^2
              = (X_c^T X_c + lambda I_P)^-1 X_c^T Y          primal, used when P <= N
              = X_c^T (X_c X_c^T + lambda I_N)^-1 Y          dual,   used when P >  N

(the two are equal by the push-through identity). The Gram matrix (P x P or N x N) is
accumulated in float64 over blocks of rows (``chunk`` stars at a time, so only the Gram matrix
and one block are held, never a float64 copy of all of X); each lambda is one Cholesky
factorization of Gram + lambda I and triangular solves. The penalty is scale-free:
lambda = alpha tr(X_c^T X_c) / P = alpha N (mean per-pixel variance of the training flux).

**RBF kernel ridge regression** (on a seeded random subset of at most M training stars):

    k(x, x') = exp(-||x - x'||^2 / (2 l^2))
    c = (K + alpha I_M)^-1 Y,   K_ij = k(x_i, x_j)              Cholesky solve
    y_std(x) = sum_i k(x, x_i) c_i

Squared distances are ||a||^2 + ||b||^2 - 2 a.b in float64 on centred flux (clipped at 0).
The length scale is l = f l_0 with l_0 the median distance between the subset's stars (the
median heuristic) and f from a grid.

**Hyperparameters**: for every grid point the validation mean squared error of each
standardized label is computed; each label gets the grid point that minimizes its own error
(ties: the first in grid order). A minimizer at the edge of the grid is logged as a warning:
the grid should then be widened.

**Table** (:func:`precision_rows`): per label and per SNR bin (equal-count bins of the test
stars' SNR, plus one row over all stars), RMSE and robust scatter 1.4826 median(|r -
median(r)|) of the residuals r = prediction - truth of every method, and where the Cramér-Rao
bound sigma_CRB of each star is known, the robust scatter of r / sigma_CRB (1 for an efficient
unbiased estimator; no unbiased estimator can do better on average) and the median sigma_CRB.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import linalg

from pipeline import LABEL_UNITS, LABELS
from pipeline.evaluation.calibration import accuracy_metrics, finite_rows, robust_scatter
from pipeline.exceptions import DataError

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024


# --------------------------------------------------------------------------------- helpers
def _blocks(n: int, chunk: int):
    for start in range(0, n, max(1, int(chunk))):
        yield slice(start, min(n, start + max(1, int(chunk))))


def column_mean(X: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Float64 mean over rows of ``X`` (any float dtype), accumulated block by block."""
    total = np.zeros(X.shape[1])
    for sl in _blocks(X.shape[0], chunk):
        total += np.asarray(X[sl], np.float64).sum(0)
    return total / max(1, X.shape[0])


def _centred(X, mean, sl) -> np.ndarray:
    return np.asarray(X[sl], np.float64) - mean


def standardize(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training mean and standard deviation of each label column (std 1 where it is 0)."""
    Y = np.asarray(Y, np.float64)
    mean, std = Y.mean(0), Y.std(0)
    return mean, np.where(std > 0, std, 1.0)


def mse(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Mean squared error per column."""
    return np.mean((np.asarray(pred, np.float64) - np.asarray(true, np.float64)) ** 2, axis=0)


def select(errors: np.ndarray, name: str = "", grid_shape: tuple | None = None,
           axes: tuple = ("alpha",)) -> np.ndarray:
    """Index of the smallest validation error per label: ``errors`` (n_grid, k) -> (k,).

    Non-finite errors (a failed fit) never win; warns when a label's minimizer lies on an edge
    of the grid (``grid_shape`` for a flattened product grid whose axes are named ``axes``).
    """
    errors = np.where(np.isfinite(errors), errors, np.inf)
    if not np.isfinite(errors).any(axis=0).all():
        raise DataError(f"{name}: no grid point gave a finite validation error")
    best = np.argmin(errors, axis=0)
    shape = grid_shape or (errors.shape[0],)
    for k, b in enumerate(best):
        index = np.unravel_index(b, shape)
        edge = [axes[i] for i, (j, n) in enumerate(zip(index, shape, strict=True))
                if n > 1 and j in (0, n - 1)]
        if edge:
            log.warning("%s: the validation minimizer of %s lies on the edge of the %s grid; "
                        "widen it", name, LABELS[k] if k < len(LABELS) else k,
                        " and ".join(edge))
    return best


# ------------------------------------------------------------------------------- ridge
def gram(X: np.ndarray, mean: np.ndarray, Y: np.ndarray | None = None, *, dual: bool = False,
         chunk: int = DEFAULT_CHUNK):
    """Float64 Gram matrix of the centred rows of ``X``, streamed over blocks of rows.

    Primal (``dual=False``): G = X_c^T X_c (P, P) and, if ``Y`` is given, X_c^T Y (P, k).
    Dual: K = X_c X_c^T (N, N) (and ``None``). Both fully symmetric.
    """
    n, p = X.shape
    if dual:
        K = np.empty((n, n))
        for a in _blocks(n, chunk):
            xa = _centred(X, mean, a)
            for b in _blocks(n, chunk):
                if b.start < a.start:
                    continue
                block = xa @ _centred(X, mean, b).T if b != a else xa @ xa.T
                K[a, b] = block
                K[b, a] = block.T
        return K, None
    G = np.zeros((p, p), order="F")
    xty = None if Y is None else np.zeros((p, np.shape(Y)[1]))
    for sl in _blocks(n, chunk):
        xc = _centred(X, mean, sl)
        # upper triangle of G += xc^T xc, in place (half the flops of a general product)
        G = linalg.blas.dsyrk(1.0, xc, beta=1.0, c=G, trans=1, lower=0, overwrite_c=1)
        if xty is not None:
            xty += xc.T @ np.asarray(Y[sl], np.float64)
    for sl in _blocks(p, chunk):  # mirror the upper triangle, block by block (no P x P copy)
        G[sl, :sl.start] = G[:sl.start, sl].T
        d = G[sl, sl]
        G[sl, sl] = np.triu(d) + np.triu(d, 1).T
    return G, xty


def _solve_shifted(A: np.ndarray, shift: float, B: np.ndarray) -> np.ndarray:
    """(A + shift I)^-1 B by Cholesky; raises numpy's LinAlgError if not positive definite."""
    M = A.copy(order="F")  # LAPACK's layout: factorized in place, no hidden copy
    M[np.diag_indices_from(M)] += shift
    factor = linalg.cho_factor(M, lower=True, overwrite_a=True, check_finite=False)
    return linalg.cho_solve(factor, B, check_finite=False)


def ridge_weights(Xc: np.ndarray, Y: np.ndarray, lam: float) -> np.ndarray:
    """Exact ridge solution (P, k) for centred ``Xc`` held in memory (reference for tests)."""
    Xc, Y = np.asarray(Xc, np.float64), np.asarray(Y, np.float64)
    n, p = Xc.shape
    if p <= n:
        return _solve_shifted(Xc.T @ Xc, lam, Xc.T @ Y)
    return Xc.T @ _solve_shifted(Xc @ Xc.T, lam, Y)


@dataclass
class RidgeFit:
    """Linear ridge regression, one penalty per label (chosen on validation stars)."""

    x_mean: np.ndarray  # (P,) training mean flux
    y_mean: np.ndarray  # (k,)
    y_std: np.ndarray  # (k,)
    weights: np.ndarray  # (P, k), standardized labels per unit centred flux
    alpha: np.ndarray  # (k,) chosen alpha per label
    lam: np.ndarray  # (k,) chosen lambda = alpha tr(G) / P
    alphas: np.ndarray  # the grid
    valid_mse: np.ndarray  # (n_alpha, k) standardized validation MSE

    def predict(self, X: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
        """Physical labels (N, k) of flux ``X`` (N, P)."""
        out = np.empty((X.shape[0], self.weights.shape[1]))
        for sl in _blocks(X.shape[0], chunk):
            out[sl] = _centred(X, self.x_mean, sl) @ self.weights
        return self.y_mean + self.y_std * out


def fit_ridge(X: np.ndarray, Y: np.ndarray, X_valid: np.ndarray, Y_valid: np.ndarray,
              alphas, *, chunk: int = DEFAULT_CHUNK) -> RidgeFit:
    """Ridge regression of labels ``Y`` (N, k) on flux ``X`` (N, P), penalty per label chosen
    from ``alphas`` (lambda = alpha tr(X_c^T X_c) / P) by the validation MSE of standardized
    labels. ``X`` may be float32; nothing larger than the Gram matrix is made in float64."""
    alphas = np.asarray(alphas, np.float64)
    n, p = X.shape
    x_mean = column_mean(X, chunk)
    y_mean, y_std = standardize(Y)
    Ys = (np.asarray(Y, np.float64) - y_mean) / y_std
    Yv = (np.asarray(Y_valid, np.float64) - y_mean) / y_std
    dual = p > n
    start = time.perf_counter()
    A, xty = gram(X, x_mean, Ys, dual=dual, chunk=chunk)
    log.info("ridge: %s Gram matrix of %d x %d flux in %.1f s", "dual" if dual else "primal",
             n, p, time.perf_counter() - start)
    start = time.perf_counter()
    scale = np.trace(A) / p
    if not scale > 0:
        raise DataError("fit_ridge: the training flux has no variance")
    k = Ys.shape[1]
    errors = np.full((alphas.size, k), np.inf)
    weights = np.zeros((alphas.size, p, k))
    for i, alpha in enumerate(alphas):
        try:
            if dual:
                coef = _solve_shifted(A, alpha * scale, Ys)
                w = np.zeros((p, k))
                for sl in _blocks(n, chunk):
                    w += _centred(X, x_mean, sl).T @ coef[sl]
            else:
                w = _solve_shifted(A, alpha * scale, xty)
        except np.linalg.LinAlgError:
            log.warning("ridge: Gram + lambda I not positive definite at alpha=%g; skipped",
                        alpha)
            continue
        pred = np.empty_like(Yv)
        for sl in _blocks(X_valid.shape[0], chunk):
            pred[sl] = _centred(X_valid, x_mean, sl) @ w
        errors[i] = mse(pred, Yv)
        weights[i] = w
        log.info("ridge alpha=%g: validation MSE (standardized) %s", alpha,
                 np.array2string(errors[i], precision=4))
    log.info("ridge: %d penalties in %.1f s", alphas.size, time.perf_counter() - start)
    best = select(errors, "ridge")
    w = np.stack([weights[b, :, j] for j, b in enumerate(best)], axis=1)
    return RidgeFit(x_mean, y_mean, y_std, w, alphas[best], alphas[best] * scale, alphas,
                    errors)


# ------------------------------------------------------------------------ kernel ridge
def squared_distances(A: np.ndarray, B: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """(nA, nB) float64 squared Euclidean distances, ||a||^2 + ||b||^2 - 2 a.b, clipped at 0."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    nb = np.einsum("ij,ij->i", B, B)
    out = np.empty((A.shape[0], B.shape[0]))
    for sl in _blocks(A.shape[0], chunk):
        a = A[sl]
        out[sl] = np.einsum("ij,ij->i", a, a)[:, None] + nb[None, :] - 2.0 * (a @ B.T)
    np.maximum(out, 0.0, out=out)
    return out


def rbf(sqdist: np.ndarray, length: float) -> np.ndarray:
    """RBF kernel exp(-d^2 / (2 l^2)) of squared distances."""
    return np.exp(-sqdist / (2.0 * length**2))


def kernel_ridge_coefficients(K: np.ndarray, Y: np.ndarray, alpha: float) -> np.ndarray:
    """c = (K + alpha I)^-1 Y by Cholesky."""
    return _solve_shifted(np.asarray(K, np.float64), alpha, np.asarray(Y, np.float64))


def median_distance(sqdist: np.ndarray) -> float:
    """Median of the off-diagonal distances of a square squared-distance matrix."""
    iu = np.triu_indices(sqdist.shape[0], 1)
    return float(np.sqrt(np.median(sqdist[iu]))) if iu[0].size else 1.0


@dataclass
class KernelFit:
    """RBF kernel ridge regression on a training subset, (length, alpha) per label."""

    x_mean: np.ndarray  # (P,) mean flux of the subset
    x_train: np.ndarray  # (M, P) centred float64 flux of the subset
    y_mean: np.ndarray
    y_std: np.ndarray
    coef: np.ndarray  # (M, k) dual coefficients, column j for label j's (length, alpha)
    length: np.ndarray  # (k,) chosen length scale per label (flux units)
    alpha: np.ndarray  # (k,) chosen alpha per label
    length_factors: np.ndarray
    alphas: np.ndarray
    median_length: float
    valid_mse: np.ndarray  # (n_length, n_alpha, k)
    rows: np.ndarray = field(default=None)  # training rows of the subset

    @property
    def n_train(self) -> int:
        return self.x_train.shape[0]

    def predict(self, X: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
        out = np.empty((X.shape[0], self.coef.shape[1]))
        for sl in _blocks(X.shape[0], chunk):
            d = squared_distances(_centred(X, self.x_mean, sl), self.x_train, chunk)
            for j, length in enumerate(self.length):
                out[sl, j] = rbf(d, length) @ self.coef[:, j]
        return self.y_mean + self.y_std * out


def fit_kernel_ridge(X: np.ndarray, Y: np.ndarray, X_valid: np.ndarray, Y_valid: np.ndarray,
                     length_factors, alphas, *, max_stars: int, seed=0,
                     chunk: int = DEFAULT_CHUNK) -> KernelFit:
    """RBF kernel ridge on at most ``max_stars`` training stars (seeded random subset, in
    training order); length scale = factor x median distance, (factor, alpha) per label
    chosen by the validation MSE of standardized labels."""
    factors = np.asarray(length_factors, np.float64)
    alphas = np.asarray(alphas, np.float64)
    n = X.shape[0]
    rows = np.arange(n)
    if n > max_stars:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_stars, replace=False))
    Xs = np.asarray(X[rows], np.float64)
    x_mean = Xs.mean(0)
    Xs -= x_mean
    y_mean, y_std = standardize(np.asarray(Y, np.float64)[rows])
    Ys = (np.asarray(Y, np.float64)[rows] - y_mean) / y_std
    Yv = (np.asarray(Y_valid, np.float64) - y_mean) / y_std
    start = time.perf_counter()
    D = squared_distances(Xs, Xs, chunk)
    np.fill_diagonal(D, 0.0)
    Dv = np.empty((X_valid.shape[0], Xs.shape[0]))
    for sl in _blocks(X_valid.shape[0], chunk):
        Dv[sl] = squared_distances(_centred(X_valid, x_mean, sl), Xs, chunk)
    l0 = median_distance(D)
    log.info("kernel ridge: distances of %d training and %d validation stars in %.1f s",
             Xs.shape[0], Dv.shape[0], time.perf_counter() - start)
    start = time.perf_counter()
    k = Ys.shape[1]
    errors = np.full((factors.size, alphas.size, k), np.inf)
    coefs = {}
    for i, f in enumerate(factors):
        K, Kv = rbf(D, f * l0), rbf(Dv, f * l0)
        for a, alpha in enumerate(alphas):
            try:
                c = kernel_ridge_coefficients(K, Ys, alpha)
            except np.linalg.LinAlgError:
                log.warning("kernel ridge: K + alpha I not positive definite at length factor "
                            "%g, alpha=%g; skipped", f, alpha)
                continue
            errors[i, a] = mse(Kv @ c, Yv)
            coefs[i, a] = c
            log.info("kernel ridge length=%g x %.4g, alpha=%g: validation MSE %s", f, l0,
                     alpha, np.array2string(errors[i, a], precision=4))
        del K, Kv
    log.info("kernel ridge: %d grid points in %.1f s", errors.shape[0] * errors.shape[1],
             time.perf_counter() - start)
    best = select(errors.reshape(-1, k), "kernel ridge", errors.shape[:2],
                  ("length factor", "alpha"))
    idx = [np.unravel_index(b, errors.shape[:2]) for b in best]
    coef = np.stack([coefs[i, a][:, j] for j, (i, a) in enumerate(idx)], axis=1)
    return KernelFit(x_mean, Xs, y_mean, y_std, coef,
                     np.array([factors[i] * l0 for i, _ in idx]),
                     np.array([alphas[a] for _, a in idx]), factors, alphas, l0, errors, rows)


# --------------------------------------------------------------------------------- table
def snr_bins(snr: np.ndarray | None, n_bins: int) -> list[tuple[str, np.ndarray]]:
    """("all", every row) and, where SNR is known, equal-count bins ("1".."B") of finite SNR."""
    n = 0 if snr is None else len(snr)
    out = [("all", np.arange(n) if snr is not None else None)]
    if snr is None or n_bins < 2:
        return out
    snr = np.asarray(snr, np.float64)
    finite = np.flatnonzero(np.isfinite(snr))
    if finite.size < n_bins:
        return out
    order = finite[np.argsort(snr[finite], kind="stable")]
    return out + [(str(b + 1), part) for b, part in enumerate(np.array_split(order, n_bins))]


def precision_rows(truth: np.ndarray, predictions: dict, *, snr: np.ndarray | None = None,
                   crb: np.ndarray | None = None, n_bins: int = 5,
                   extra: dict | None = None) -> list[dict]:
    """Rows of the precision table.

    Args:
        truth: (N, 3) true labels.
        predictions: method prefix (``NN``, ``RIDGE``, ``KRR``) -> (N, 3) predictions of the
            same stars, in the same order.
        snr: (N,) SNR for the bins (None: only the row over all stars).
        crb: (N, 3) Cramér-Rao 1-sigma bounds or None.
        extra: label -> dict of columns added to that label's rows (chosen hyperparameters).
    """
    truth = np.asarray(truth, np.float64)
    rows = []
    for k, label in enumerate(LABELS):
        for name, index in snr_bins(snr, n_bins):
            sel = slice(None) if index is None else index
            t = truth[sel, k]
            row = {"LABEL": label, "UNIT": LABEL_UNITS[label], "BIN": name}
            s = None if snr is None else np.asarray(snr, np.float64)[sel]
            row["SNR_MIN"] = float(np.nanmin(s)) if s is not None and s.size else float("nan")
            row["SNR_MAX"] = float(np.nanmax(s)) if s is not None and s.size else float("nan")
            row["N"] = int(np.isfinite(t).sum())
            for method, pred in predictions.items():
                m = accuracy_metrics(np.asarray(pred, np.float64)[sel, k], t)
                row[f"{method}_RMSE"] = m["rmse"]
                row[f"{method}_SCATTER"] = m["robust_scatter"]
            if crb is not None:
                c = np.asarray(crb, np.float64)[sel, k]
                good_c = np.isfinite(c) & (c > 0)
                row["CRB_MEDIAN"] = float(np.median(c[good_c])) if good_c.any() else float("nan")
                for method, pred in predictions.items():
                    r = np.asarray(pred, np.float64)[sel, k] - t
                    good = finite_rows(r, c) & (c > 0)
                    row[f"{method}_SCATTER_OVER_CRB"] = (robust_scatter(r[good] / c[good])
                                                         if good.any() else float("nan"))
            row.update((extra or {}).get(label, {}))
            rows.append(row)
    return rows
