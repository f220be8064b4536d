"""The scatter model against closed forms and simulated heteroscedastic residuals."""

import numpy as np
import pytest

from pipeline.exceptions import ConfigError
from pipeline.scatter import ScatterModel, fit_scatter


def simulate(rng, n, coef, extra_scale=0.0):
    z = rng.normal(size=(n, 3))
    true = ScatterModel(np.asarray(coef, float), np.full(3, -np.inf), np.full(3, np.inf))
    extra = extra_scale * rng.uniform(0.5, 1.5, (n, 3))
    resid = true.std(z) * rng.normal(size=(n, 3)) + np.sqrt(extra) * rng.normal(size=(n, 3))
    return z, resid, extra


def test_constant_scatter_is_the_variance_mle(rng):
    z, resid, _ = simulate(rng, 500, np.zeros((3, 4)))
    fit = fit_scatter(z, resid, np.zeros_like(resid), kind="constant")
    np.testing.assert_allclose(fit.std(z)[0] ** 2, np.mean(resid**2, axis=0), rtol=1e-8)
    assert np.all(fit.coef[:, 1:] == 0)


def test_linear_scatter_recovers_the_simulated_coefficients(rng):
    coef = [[-1.0, 0.4, 0.0, 0.0], [-2.0, 0.0, -0.3, 0.1], [-1.5, 0.2, 0.2, 0.0]]
    z, resid, extra = simulate(rng, 40000, coef, extra_scale=0.01)
    fit = fit_scatter(z, resid, extra, kind="linear")
    # standard error of each coefficient is about 1/sqrt(2N) = 0.0035 (more with extra noise)
    np.testing.assert_allclose(fit.coef, coef, atol=0.03)


def test_fitted_scatter_calibrates_fresh_stars(rng):
    coef = [[-1.0, 0.5, 0.0, 0.0], [-1.0, 0.0, 0.5, 0.0], [-1.0, 0.0, 0.0, 0.5]]
    z, resid, extra = simulate(rng, 20000, coef, extra_scale=0.02)
    fit = fit_scatter(z, resid, extra)
    z2, resid2, extra2 = simulate(rng, 20000, coef, extra_scale=0.02)
    score = resid2 / np.sqrt(fit.std(z2) ** 2 + extra2)
    # N = 20000: sd of the sample std is 0.005, of a coverage fraction 0.0033
    np.testing.assert_allclose(score.std(axis=0), 1.0, atol=0.02)
    np.testing.assert_allclose(np.mean(np.abs(score) < 1, axis=0), 0.6827, atol=0.015)
    constant = fit_scatter(z, resid, extra, kind="constant")
    score_c = resid2 / np.sqrt(constant.std(z2) ** 2 + extra2)
    assert np.all(np.abs(np.mean(np.abs(score_c) < 1, axis=0) - 0.6827) > 0.02), \
        "a constant level must miss the coverage of heteroscedastic residuals"


def test_scatter_is_clipped_to_the_validation_range(rng):
    z, resid, extra = simulate(rng, 2000, [[-1, 0.5, 0, 0]] * 3)
    fit = fit_scatter(z, resid, extra)
    edge = fit.std(np.tile(fit.z_hi, (1, 1)))
    far = fit.std(np.tile(fit.z_hi + 100.0, (1, 1)))
    np.testing.assert_array_equal(edge, far)
    assert ScatterModel.from_dict(fit.to_dict()).std(z).tobytes() == fit.std(z).tobytes()


def test_unknown_kind_names_the_config_key(rng):
    z, resid, extra = simulate(rng, 50, np.zeros((3, 4)))
    with pytest.raises(ConfigError, match=r"laplace\.scatter"):
        fit_scatter(z, resid, extra, kind="quadratic")
