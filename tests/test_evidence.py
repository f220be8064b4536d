"""Evidence fit: the fixed-point solver against L-BFGS, a closed form and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import root

from pipeline.exceptions import ConfigError
from pipeline.laplace import evidence
from pipeline.laplace.curvature import Head, ggn_blocks
from tests.test_laplace import tiny_model

RTOL = 1e-6  # the bar for "the same optimum as L-BFGS"


def hyperparameters(fit):
    return np.r_[fit["delta"], fit["beta"]]


# ---------------------------------------------------------------- Bayesian linear regression
def linear_problem(rng, n=60, d=4, noise=(0.1, 0.3, 0.8)):
    """K = 3 labels, each with its own weights on the same design X (N, d)."""
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=(d, 3)) + rng.normal(size=(n, 3)) * np.asarray(noise)
    return x, y


def exact_type2_optimum(x, y):
    """Maximum of the exact marginal likelihood sum_k log N(y_k | 0, X X^T / delta + I/beta_k).

    Found as the root of its gradient in the N x N form, independent of the (P, P) precision
    and the trace formulas of pipeline.laplace.evidence:
    d/d eta log N(y | 0, S) = 1/2 tr((a a^T - S^-1) dS/d eta), a = S^-1 y, eta = log delta,
    log beta_k, dS/d log delta = -X X^T / delta, dS/d log beta_k = -I / beta_k.
    """
    gram = x @ x.T

    def gradient(eta):
        delta, beta = np.exp(eta[0]), np.exp(eta[1:])
        g = np.zeros(4)
        for k in range(3):
            s_inv = np.linalg.inv(gram / delta + np.eye(len(x)) / beta[k])
            a = s_inv @ y[:, k]
            core = np.outer(a, a) - s_inv
            g[0] += 0.5 * np.sum(core * (-gram / delta))
            g[1 + k] = 0.5 * np.trace(core) * (-1 / beta[k])
        return g

    sol = root(gradient, np.zeros(4), tol=1e-14)
    assert sol.success and np.max(np.abs(gradient(sol.x))) < 1e-9
    return np.exp(sol.x[0]), np.exp(sol.x[1:])


def laplace_inputs(x, y, delta, beta):
    """Curvature blocks, MAP weights and RSS of the linear model at (delta, beta).

    Label k owns weights k*d .. (k+1)*d: C_k = X^T X on its diagonal block; the MAP is
    w_k = beta_k (beta_k X^T X + delta I)^-1 X^T y_k.
    """
    n, d = x.shape
    xtx = x.T @ x
    blocks = np.zeros((3, 3 * d, 3 * d))
    theta = np.zeros(3 * d)
    for k in range(3):
        sl = slice(k * d, (k + 1) * d)
        blocks[k, sl, sl] = xtx
        theta[sl] = beta[k] * np.linalg.solve(beta[k] * xtx + delta * np.eye(d), x.T @ y[:, k])
    rss = np.sum((y - x @ theta.reshape(3, d).T) ** 2, axis=0)
    return blocks, theta, rss, n


@pytest.mark.parametrize("solver", evidence.SOLVERS)
def test_linear_regression_optimum_is_the_exact_type2_maximum(rng, solver):
    # For a linear-Gaussian model the Laplace evidence is exact; by the envelope theorem its
    # maximum at theta* = MAP(delta^, beta^) is the exact type-II maximum (delta^, beta^).
    x, y = linear_problem(rng)
    delta, beta = exact_type2_optimum(x, y)
    blocks, theta, rss, n = laplace_inputs(x, y, delta, beta)
    groups = np.zeros(theta.size, int)
    fit = evidence.fit_evidence(blocks, theta, rss, n, groups, solver=solver)
    np.testing.assert_allclose(hyperparameters(fit), np.r_[delta, beta], rtol=RTOL)


# ------------------------------------------------------------------------ network problems
def network_problem(rng, n, hidden, noise, curvature_seed=1):
    model = tiny_model(hidden=hidden, seed=curvature_seed)
    x = rng.normal(size=(n, 6))
    f = model(x).numpy()
    y = f + rng.normal(size=f.shape) * np.asarray(noise)
    head = Head(model, 2)
    blocks = ggn_blocks(head, head.features(x))
    return blocks, head.map_values(), np.sum((f - y) ** 2, axis=0), n, head.layer_index


PROBLEMS = {  # (stars, hidden layers, per-label noise): different sizes and noise ratios
    "small, unequal noise": (120, (8, 5), (0.05, 0.1, 0.2)),
    "few stars per weight": (40, (10, 6), (0.3, 0.3, 0.3)),
    "wide head": (300, (6, 12), (0.01, 0.2, 1.0)),
}


@pytest.mark.parametrize("prior", evidence.PRIORS)
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_fixed_point_reaches_the_lbfgs_optimum(rng, name, prior):
    blocks, theta, rss, n, layers = network_problem(rng, *PROBLEMS[name])
    groups = evidence.prior_groups(layers, prior)
    new = evidence.fit_evidence(blocks, theta, rss, n, groups, solver="fixed_point")
    old = evidence.fit_evidence(blocks, theta, rss, n, groups, solver="lbfgs")
    np.testing.assert_allclose(hyperparameters(new), hyperparameters(old), rtol=RTOL)
    assert new["log_evidence"] >= old["log_evidence"] - 1e-9 * abs(old["log_evidence"])
    assert new["n_evaluations"] <= old["n_evaluations"]


def test_fixed_point_is_stationary_by_finite_differences(rng):
    blocks, theta, rss, n, layers = network_problem(rng, *PROBLEMS["small, unequal noise"])
    groups = evidence.prior_groups(layers, "layer")
    fit = evidence.fit_evidence(blocks, theta, rss, n, groups)
    eta = np.log(hyperparameters(fit))

    def value(e):  # log Z from slogdet of the explicit A, not the Cholesky of log_evidence
        delta, beta = np.exp(e[:2]), np.exp(e[2:])
        a = evidence.precision_matrix(blocks, beta, delta, groups)
        sq = np.bincount(groups, weights=theta**2)
        sizes = np.bincount(groups)
        return (np.sum(n / 2 * np.log(beta) - beta * rss / 2)
                + np.sum(sizes / 2 * np.log(delta) - delta * sq / 2)
                - np.linalg.slogdet(a)[1] / 2)

    h = 1e-5
    grad = [(value(eta + h * e) - value(eta - h * e)) / (2 * h) for e in np.eye(eta.size)]
    assert np.max(np.abs(grad)) < 1e-5


@pytest.mark.parametrize("start", [1e-4, 1e4])
def test_fixed_point_converges_from_far_starts(rng, start):
    blocks, theta, rss, n, layers = network_problem(rng, *PROBLEMS["small, unequal noise"])
    groups = evidence.prior_groups(layers, "scalar")
    ref = evidence.fit_evidence(blocks, theta, rss, n, groups, solver="lbfgs")
    fit = evidence.fit_evidence(blocks, theta, rss, n, groups, delta_init=start)
    np.testing.assert_allclose(hyperparameters(fit), hyperparameters(ref), rtol=RTOL)


def test_tensorflow_route_gives_the_same_optimum(rng):
    # device='gpu' runs the Cholesky and inverse in TensorFlow; without a GPU TensorFlow's
    # soft placement runs the same ops on the CPU, which checks that route's numerics.
    blocks, theta, rss, n, layers = network_problem(rng, *PROBLEMS["small, unequal noise"])
    groups = evidence.prior_groups(layers, "scalar")
    cpu = evidence.fit_evidence(blocks, theta, rss, n, groups, device="cpu")
    tf_route = evidence.fit_evidence(blocks, theta, rss, n, groups, device="gpu")
    np.testing.assert_allclose(hyperparameters(tf_route), hyperparameters(cpu), rtol=1e-9)


def test_unknown_solver_names_the_config_key(rng):
    blocks, theta, rss, n = laplace_inputs(*linear_problem(rng), 1.0, np.ones(3))
    with pytest.raises(ConfigError, match="laplace.evidence_solver.*fixed_point, lbfgs"):
        evidence.fit_evidence(blocks, theta, rss, n, np.zeros(theta.size, int), solver="newton")
