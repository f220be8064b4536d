"""Fit the prior precision and the per-label noise of the last-layer Laplace posterior.

Posterior precision, with per-label curvature blocks C_k (pipeline.curvature), noise
precisions beta_k = sigma_k^-2 and prior precisions delta_l (one, or one per layer l):

    A(delta, beta) = sum_k beta_k C_k + diag(delta_{l(p)})                    (P_L, P_L)

**Evidence** (type-II maximum likelihood on the training data, N stars, MAP theta*):

    log Z = sum_k [N/2 log(beta_k / 2pi) - beta_k RSS_k / 2]            log p(D | theta*)
          + sum_l [P_l/2 log(delta_l / 2pi) - delta_l |theta*_l|^2 / 2]  log p(theta*)
          + P_L/2 log 2pi - 1/2 log det A

with exact gradients d log Z / d delta_l = P_l / (2 delta_l) - |theta*_l|^2 / 2 - tr_l(A^-1)/2
and d log Z / d beta_k = N / (2 beta_k) - RSS_k / 2 - tr(A^-1 C_k) / 2. Because the noise
enters A through sum_k beta_k C_k, no single eigendecomposition serves every beta (the
eigenvalues of C(beta) alone give the exact optimum along beta -> s beta, but the per-label
noise ratios still move, and as many iterations are needed as without it). The default
solver sets these gradients to zero by MacKay's fixed point, beta_k <- (N - gamma_k) / RSS_k
and delta_l <- gamma_l / |theta*_l|^2 with the effective numbers of parameters
gamma_k = beta_k tr(A^-1 C_k), gamma_l = P_l - delta_l tr_l(A^-1), Anderson-accelerated:
each iteration is one float64 Cholesky and one inverse from it (LAPACK potrf + potri, about
3 Choleskys of work), typically 5-7 iterations to 1e-8 from MacKay's point
beta_k = N/RSS_k, delta_l = P_l/|theta*_l|^2. The reference solver ('lbfgs') is L-BFGS on the
log-hyperparameters with the same exact value and gradient, the same work per evaluation,
typically 10-30 evaluations. At the optimum one
eigendecomposition of C(beta*) = Q diag(lambda) Q^T gives the evidence for every scalar prior
at O(P_L) cost: log det A = sum_i log(lambda_i + delta) (the evidence-vs-prior curve).

**Validation** (for calibration): minimize the Gaussian NLL of validation residuals r_nk under
the full per-star covariance S_n = J_n A^-1 J_n^T + diag(sigma^2) + E_n (E_n an optional extra
covariance, e.g. flux noise), label by label (marginal variances S_n,kk, see
:func:`gaussian_nll`). With a scalar prior, for fixed beta the eigenvectors Q of
C(beta) diagonalize A for every delta, so with U_n = J_n Q, J_n A^-1 J_n^T =
U_n diag(1/(lambda + delta)) U_n^T costs O(9 P_L) per star; (delta, sigma) are optimized on that,
then beta <- sigma^-2 and the step repeats until sigma is self-consistent. A layer prior uses
a Cholesky per evaluation instead.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg as sl
from scipy.optimize import minimize

from pipeline.exceptions import ConfigError, NumericalError

log = logging.getLogger(__name__)

PRIORS = ("scalar", "layer")
SOLVERS = ("fixed_point", "lbfgs")
LOG_BOUNDS = (-30.0, 30.0)  # log-hyperparameter box: keeps L-BFGS away from 0 and infinity
LOG_2PI = np.log(2 * np.pi)


def prior_groups(layer_index: np.ndarray, prior: str) -> np.ndarray:
    """(P_L,) group of each weight: all 0 for a scalar prior, the layer for a layer prior."""
    if prior not in PRIORS:
        raise ConfigError(f"config key 'laplace.prior' = {prior!r}; valid: {', '.join(PRIORS)}")
    return np.zeros_like(layer_index) if prior == "scalar" else np.asarray(layer_index)


def precision_matrix(blocks, beta, delta, groups) -> np.ndarray:
    """A = sum_k beta_k C_k + diag(delta[groups]), float64 (P_L, P_L)."""
    a = np.tensordot(np.asarray(beta, np.float64), blocks, axes=1)
    a[np.diag_indices_from(a)] += np.asarray(delta, np.float64)[groups]
    return a


def _start(theta, rss, n, groups, delta_init=None):
    """MacKay's starting point (or ``delta_init`` for every prior group)."""
    sq = np.bincount(groups, weights=theta**2)
    sizes = np.bincount(groups)
    delta = sizes / np.maximum(sq, 1e-300) if delta_init is None else np.full(
        sizes.size, float(delta_init))
    beta = n / np.maximum(rss, 1e-300)
    return delta, beta


# --------------------------------------------------------------------------------- evidence
def log_evidence(blocks, theta, rss, n, groups, delta, beta, grad: bool = False):
    """log Z (and its gradient w.r.t. log delta, log beta if ``grad``); see module docstring."""
    delta, beta = np.asarray(delta, np.float64), np.asarray(beta, np.float64)
    a = precision_matrix(blocks, beta, delta, groups)
    try:
        chol = sl.cholesky(a, lower=True, check_finite=False)
    except sl.LinAlgError:
        return (-np.inf, None) if grad else -np.inf
    sq = np.bincount(groups, weights=theta**2, minlength=delta.size)
    sizes = np.bincount(groups, minlength=delta.size)
    value = (np.sum(n / 2 * (np.log(beta) - LOG_2PI) - beta * rss / 2)
             + np.sum(sizes / 2 * (np.log(delta) - LOG_2PI) - delta * sq / 2)
             + theta.size / 2 * LOG_2PI - np.sum(np.log(np.diag(chol))))
    if not grad:
        return value
    inv, info = sl.lapack.dpotri(chol, lower=1)
    inv = np.tril(inv) + np.tril(inv, -1).T
    tr_groups = np.bincount(groups, weights=np.diag(inv), minlength=delta.size)
    tr_blocks = np.einsum("pq,kpq->k", inv, blocks)
    g_delta = delta * (sizes / (2 * delta) - sq / 2 - tr_groups / 2)
    g_beta = beta * (n / (2 * beta) - rss / 2 - tr_blocks / 2)
    return value, np.concatenate([g_delta, g_beta])


def _lbfgs(blocks, theta, rss, n, groups, delta0, beta0, max_iterations):
    """The reference optimizer: L-BFGS on (log delta, log beta), exact value and gradient."""
    m = delta0.size

    def objective(eta):
        value, g = log_evidence(blocks, theta, rss, n, groups, np.exp(eta[:m]),
                                np.exp(eta[m:]), grad=True)
        if not np.isfinite(value):
            return np.inf, np.zeros_like(eta)
        return -value, -g

    eta0 = np.log(np.concatenate([delta0, beta0]))
    res = minimize(objective, eta0, jac=True, method="L-BFGS-B",
                   bounds=[LOG_BOUNDS] * eta0.size,
                   options={"maxiter": max_iterations, "ftol": 1e-12, "gtol": 1e-6})
    if not np.isfinite(res.fun):
        raise NumericalError("evidence maximization failed: the posterior precision is not "
                             "positive definite at any hyperparameters tried")
    return np.exp(res.x[:m]), np.exp(res.x[m:]), int(res.nfev)


def _inverse(a, device):
    """A^-1 of a symmetric positive definite A (Cholesky, then LAPACK potri), or None."""
    if device == "gpu":
        import tensorflow as tf

        with tf.device("/GPU:0"):
            chol = tf.linalg.cholesky(tf.constant(a, tf.float64))
            inv = tf.linalg.cholesky_solve(chol, tf.eye(len(a), dtype=tf.float64)).numpy()
        return inv if np.all(np.isfinite(inv)) else None
    try:
        chol = sl.cholesky(a, lower=True, check_finite=False)
    except sl.LinAlgError:
        return None
    inv, _ = sl.lapack.dpotri(chol, lower=1, overwrite_c=1)
    return np.tril(inv) + np.tril(inv, -1).T


def _mackay_map(blocks, rss, n, groups, sq, sizes, device):
    """x = log(delta, beta) -> log of MacKay's update (see :func:`_fixed_point`)."""
    m = sizes.size

    def update(x):
        delta, beta = np.exp(x[:m]), np.exp(x[m:])
        a = precision_matrix(blocks, beta, delta, groups)
        inv = _inverse(a, device)
        if inv is None:
            raise NumericalError("evidence fixed point failed: the posterior precision is not "
                                 f"positive definite at prior precision {delta} and noise "
                                 f"precision {beta}; try laplace.evidence_solver: lbfgs")
        gamma_beta = beta * np.einsum("pq,kpq->k", inv, blocks)
        gamma_delta = sizes - delta * np.bincount(groups, weights=np.diag(inv), minlength=m)
        return np.log(np.concatenate([gamma_delta / np.maximum(sq, 1e-300),
                                      (n - gamma_beta) / rss]))
    return update


def _fixed_point(blocks, theta, rss, n, groups, delta, beta, max_iterations, tol, device,
                 memory: int = 5):
    """MacKay's fixed point, Anderson-accelerated.

    MacKay's updates, with the effective numbers of parameters gamma_k = beta_k tr(A^-1 C_k)
    and gamma_l = P_l - delta_l tr_l(A^-1) (one Cholesky and potri for A^-1),

        beta_k <- (N - gamma_k) / RSS_k,        delta_l <- gamma_l / |theta*_l|^2,

    are the stationarity conditions of log Z rearranged, so their fixed point is the optimum.
    The map is iterated on the log-hyperparameters with Anderson acceleration (the last
    ``memory`` residuals, a least-squares secant step); the iteration stops when no
    hyperparameter moves by more than ``tol`` (relative). An extrapolated point is always
    valid (A is positive definite for every positive delta, beta and 0 < gamma < min(N, P_L)),
    so the history is only reset if it turns non-finite. Returns (delta, beta, number of
    A^-1 evaluations).
    """
    sq = np.bincount(groups, weights=theta**2, minlength=delta.size)
    sizes = np.bincount(groups, minlength=delta.size)
    update = _mackay_map(blocks, rss, n, groups, sq, sizes, device)
    x = np.log(np.concatenate([delta, beta]))
    xs, gs = [], []
    for it in range(1, max_iterations + 1):
        g = update(x)
        r = g - x
        change = float(np.max(np.abs(r)))
        log.debug("evidence fixed point %d: log hyperparameters %s, change %.3g", it, x, change)
        if change < tol:
            x = g
            break
        xs.append(x), gs.append(g)
        xs, gs = xs[-memory - 1:], gs[-memory - 1:]
        if len(xs) > 1:  # Anderson: minimize |r - dR c| over the residual differences
            res = np.array(gs) - np.array(xs)
            d_r, d_g = np.diff(res, axis=0).T, np.diff(np.array(gs), axis=0).T
            c = np.linalg.lstsq(d_r, r, rcond=None)[0]
            x = g - d_g @ c
            if not np.all(np.isfinite(x)):
                x, xs, gs = g, [], []
        else:
            x = g
    m = delta.size
    return np.exp(x[:m]), np.exp(x[m:]), it


def fit_evidence(blocks, theta, rss, n, groups, max_iterations: int = 200,
                 delta_init=None, solver: str = "fixed_point", device: str = "cpu",
                 tol: float = 1e-8) -> dict:
    """Maximize log Z over (delta_l, beta_k); returns delta, beta, log_evidence, n_evaluations.

    ``solver``: 'fixed_point' (:func:`_fixed_point`) or 'lbfgs' (the reference).
    """
    if solver not in SOLVERS:
        raise ConfigError(f"config key 'laplace.evidence_solver' = {solver!r}; valid: "
                          f"{', '.join(SOLVERS)}")
    delta0, beta0 = _start(theta, rss, n, groups, delta_init)
    if solver == "lbfgs":
        delta, beta, count = _lbfgs(blocks, theta, rss, n, groups, delta0, beta0,
                                         max_iterations)
    else:
        delta, beta, count = _fixed_point(blocks, theta, rss, n, groups, delta0, beta0,
                                          max_iterations, tol, device)
    value = log_evidence(blocks, theta, rss, n, groups, delta, beta)
    log.info("evidence fit (%s): prior precision %s, noise std %s, log Z = %.6g (%d "
             "iterations)", solver, np.array2string(delta, precision=4),
             np.array2string(beta**-0.5, precision=4), value, count)
    return {"delta": delta, "beta": beta, "log_evidence": float(value),
            "n_evaluations": count}


def evidence_curve(eigenvalues, theta, rss, n, beta, delta_grid) -> np.ndarray:
    """log Z of a scalar prior for every delta in ``delta_grid`` at noise ``beta``: O(P_L) each.

    ``eigenvalues`` are those of C(beta) = sum_k beta_k C_k.
    """
    lam = np.maximum(np.asarray(eigenvalues, np.float64), 0.0)
    grid = np.asarray(delta_grid, np.float64)
    data = np.sum(n / 2 * (np.log(beta) - LOG_2PI) - beta * rss / 2)
    prior = theta.size / 2 * np.log(grid) - grid * np.sum(theta**2) / 2
    logdet = np.sum(np.log(lam[None, :] + grid[:, None]), axis=1)
    return data + prior - logdet / 2


# ------------------------------------------------------------------------------- validation
def gaussian_nll(residual, cov) -> float:
    """Mean over stars of sum_k -log N(r_nk | 0, S_n,kk): per-label marginal Gaussian NLL.

    (N, K) residuals, (N, K, K) covariances. Marginal, because the scatter term is diagonal:
    a joint NLL would trade the per-label variances (what the catalog errors and z-scores
    report) for residual correlations that diag(sigma^2) cannot represent.
    """
    var = np.einsum("nkk->nk", cov)
    if np.any(var <= 0):
        raise np.linalg.LinAlgError("non-positive predictive variance")
    return float(np.mean(np.sum(0.5 * (residual**2 / var + np.log(var) + LOG_2PI), axis=1)))


def _minimize_nll(nll, eta0):
    def safe(eta):
        try:
            return nll(eta)
        except np.linalg.LinAlgError:
            return np.inf
    return minimize(safe, eta0, method="L-BFGS-B", bounds=[LOG_BOUNDS] * eta0.size)


def fit_validation(blocks, theta, rss, n, groups, jac_valid, res_valid, extra=None,
                   max_iterations: int = 10, tol: float = 1e-4, delta_init=None) -> dict:
    """Minimize the validation NLL over (delta, sigma); see the module docstring.

    Parameters
    ----------
    jac_valid : (N_v, K, P_L) head Jacobians of the validation stars.
    res_valid : (N_v, K) validation residuals f(x) - y (standardized).
    extra : optional (N_v, K, K) per-star extra covariance (flux noise), standardized units.
    """
    delta, beta = _start(theta, rss, n, groups, delta_init)
    extra = 0.0 if extra is None else np.asarray(extra, np.float64)
    m, k = delta.size, beta.size

    def total_cov(model_cov, sigma):
        return model_cov + np.diag(sigma**2) + extra

    if m == 1:  # scalar prior: eigen-projection, beta made self-consistent by iteration
        for it in range(max_iterations):
            lam, q = np.linalg.eigh(np.tensordot(beta, blocks, axes=1))
            lam = np.maximum(lam, 0.0)
            u = jac_valid @ q

            def nll(eta, u=u, lam=lam):
                weights = 1.0 / (lam + np.exp(eta[0]))
                model_cov = np.matmul(u * weights, np.swapaxes(u, 1, 2))  # U diag(w) U^T
                return gaussian_nll(res_valid, total_cov(model_cov, np.exp(eta[1:])))

            res = _minimize_nll(nll, np.log(np.concatenate([delta, beta**-0.5])))
            delta, sigma = np.exp(res.x[:1]), np.exp(res.x[1:])
            change = np.max(np.abs(np.log(sigma**-2 / beta)))
            beta = sigma**-2
            log.info("validation fit, iteration %d: prior precision %.4g, noise std %s, "
                     "NLL %.6g", it + 1, delta[0], np.array2string(sigma, precision=4), res.fun)
            if change < tol:
                break
    else:
        def nll(eta):
            a = precision_matrix(blocks, np.exp(-2 * eta[m:]), np.exp(eta[:m]), groups)
            chol = np.linalg.cholesky(a)
            v = sl.solve_triangular(chol, jac_valid.reshape(-1, theta.size).T, lower=True)
            v = v.T.reshape(len(res_valid), k, -1)
            model_cov = np.matmul(v, np.swapaxes(v, 1, 2))
            return gaussian_nll(res_valid, total_cov(model_cov, np.exp(eta[m:])))

        res = _minimize_nll(nll, np.log(np.concatenate([delta, beta**-0.5])))
        delta, beta = np.exp(res.x[:m]), np.exp(-2 * res.x[m:])
        log.info("validation fit: prior precision %s, noise std %s, NLL %.6g",
                 np.array2string(delta, precision=4), np.array2string(beta**-0.5, precision=4),
                 res.fun)
    if not np.isfinite(res.fun):
        raise NumericalError("validation NLL minimization failed: a per-star covariance was "
                             "never positive definite; check the validation labels")
    return {"delta": delta, "beta": beta, "validation_nll": float(res.fun),
            "log_evidence": float(log_evidence(blocks, theta, rss, n, groups, delta, beta))}
