"""The scatter model against closed forms and simulated heteroscedastic residuals."""

import numpy as np
import pytest

from pipeline.exceptions import ConfigError
from pipeline.laplace.scatter import ScatterModel, covariates, fit_scatter


def simulate(rng, n, coef, model_scale=0.01):
    """Residuals whose scatter follows ``coef`` over u = [z, log model std, log noise std]."""
    z = rng.normal(size=(n, 3))
    model_var = model_scale * np.exp(rng.normal(0, 1.0, (n, 3)))
    noise_var = model_scale * np.exp(rng.normal(0, 1.0, (n, 3)))
    u = covariates(z, model_var, noise_var)
    truth = ScatterModel(np.asarray(coef, float), np.zeros(9), np.full(9, -np.inf),
                         np.full(9, np.inf))
    s = truth.std(z, model_var, noise_var)
    assert np.allclose(np.log(s), truth.design(u) @ truth.coef.T)
    resid = np.sqrt(s**2 + model_var + noise_var) * rng.normal(size=(n, 3))
    return z, resid, model_var, noise_var


def test_constant_scatter_is_the_variance_mle(rng):
    coef = np.zeros((3, 10))
    coef[:, 0] = -1.5
    z, resid, _, _ = simulate(rng, 500, coef)
    zero = np.zeros_like(resid)
    fit = fit_scatter(z, resid, zero, zero, kind="constant")
    # with no other variance the MLE of a constant variance is the mean square residual
    std = fit.std(z, zero, zero)
    np.testing.assert_allclose(std[0] ** 2, np.mean(resid**2, axis=0), rtol=1e-8)
    assert np.all(fit.coef[:, 1:] == 0)


def test_linear_scatter_recovers_the_simulated_coefficients(rng):
    coef = np.zeros((3, 10))
    coef[:, 0] = [-1.0, -2.0, -1.5]
    coef[0, 1], coef[1, 2], coef[1, 3], coef[2, 4] = 0.4, -0.3, 0.1, 0.5  # z and model std
    z, resid, model_var, noise_var = simulate(rng, 40000, coef)
    fit = fit_scatter(z, resid, model_var, noise_var, kind="linear")
    centred = coef[:, 0] + coef[:, 1:] @ fit.u_centre  # fit uses covariates centred on means
    np.testing.assert_allclose(fit.coef[:, 0], centred, atol=0.05)
    # standard error of each slope is about 1/sqrt(2N) = 0.0035 (more with the other terms)
    np.testing.assert_allclose(fit.coef[:, 1:], coef[:, 1:], atol=0.05)


def test_fitted_scatter_calibrates_fresh_stars(rng):
    coef = np.zeros((3, 10))
    coef[:, 0] = -1.0
    coef[0, 1], coef[1, 5], coef[2, 3] = 0.5, 2.0, 0.5  # z_0, log model std_1, z_2
    z, resid, mv, nv = simulate(rng, 20000, coef)
    fit = fit_scatter(z, resid, mv, nv)
    z2, resid2, mv2, nv2 = simulate(rng, 20000, coef)
    score = resid2 / np.sqrt(fit.std(z2, mv2, nv2) ** 2 + mv2 + nv2)
    # N = 20000: sd of the sample std is 0.005, of a coverage fraction 0.0033
    np.testing.assert_allclose(score.std(axis=0), 1.0, atol=0.02)
    np.testing.assert_allclose(np.mean(np.abs(score) < 1, axis=0), 0.6827, atol=0.015)
    constant = fit_scatter(z, resid, mv, nv, kind="constant")
    score_c = resid2 / np.sqrt(constant.std(z2, mv2, nv2) ** 2 + mv2 + nv2)
    miss = np.abs(np.mean(np.abs(score_c) < 1, axis=0) - 0.6827)
    assert np.all(miss[[0, 2]] > 0.02), "a constant level must miss the coverage of " \
        "residuals whose scatter varies with the predicted labels"


def test_scatter_is_clipped_to_the_validation_range(rng):
    coef = np.zeros((3, 10))
    coef[:, 0], coef[:, 1] = -1.0, 0.5
    z, resid, mv, nv = simulate(rng, 2000, coef)
    fit = fit_scatter(z, resid, mv, nv)
    edge = fit.std(z.max(axis=0)[None], mv.max(axis=0)[None], nv.max(axis=0)[None])
    far = fit.std(z.max(axis=0)[None] + 100, mv.max(axis=0)[None] * 1e6, nv.max(axis=0)[None])
    np.testing.assert_array_equal(edge, far)
    again = ScatterModel.from_dict(fit.to_dict())
    assert again.std(z, mv, nv).tobytes() == fit.std(z, mv, nv).tobytes()


def test_unknown_kind_names_the_config_key(rng):
    z, resid, mv, nv = simulate(rng, 50, np.zeros((3, 10)))
    with pytest.raises(ConfigError, match=r"laplace\.scatter"):
        fit_scatter(z, resid, mv, nv, kind="quadratic")
