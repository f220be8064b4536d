"""Error budget: flux-noise term against Monte Carlo, the whole budget against a per-star loop.

References are independent of the code under test: the input Jacobian of the brute-force loop
comes from float64 central finite differences, the noise term from the empirical covariance of
predictions on noisy fluxes.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.artifacts.catalog import correlations
from pipeline.laplace.error_budget import error_budget, noise_covariance

P, HIDDEN = 24, 6
SCALE = np.array([600.0, 1.1, 0.4])
MEAN = np.array([4800.0, 2.8, -0.3])


@pytest.fixture(scope="module")
def smooth_model():
    """A tiny float64 tanh network (P -> 6 -> 3): smooth, so first-order propagation holds."""
    import keras

    keras.utils.set_random_seed(3)
    flux = keras.Input((P,), dtype="float64")
    hidden = keras.layers.Dense(HIDDEN, activation="tanh", dtype="float64")(flux)
    labels = keras.layers.Dense(3, dtype="float64")(hidden)
    model = keras.Model(flux, labels)
    rng = np.random.default_rng(5)
    model.set_weights([rng.normal(0, 0.4, (P, HIDDEN)), rng.normal(0, 0.5, HIDDEN) - 2.0,
                       rng.normal(0, 1.0, (HIDDEN, 3)), rng.normal(0, 0.1, 3)])
    return model


@pytest.fixture(scope="module")
def scaler():
    from pipeline.nn.scaler import LabelScaler

    return LabelScaler(mean=MEAN.copy(), scale=SCALE.copy())


class FeaturePosterior:
    """Stand-in Laplace posterior: a star-dependent SPD covariance from the hidden features."""

    noise_std = np.array([0.15, 0.25, 0.1])

    def __init__(self, model):
        self.w, self.b = (np.asarray(v) for v in model.layers[1].get_weights())
        self.g = np.random.default_rng(8).normal(0, 0.2, (3, HIDDEN))

    def predictive_covariance(self, x):
        phi = np.tanh(np.asarray(x, np.float64) @ self.w + self.b)  # (B, H)
        m = self.g[None] * phi[:, None, :]  # (B, 3, H)
        return m @ m.transpose(0, 2, 1) + 1e-3 * np.eye(3)


def spectra(n, rng):
    flux = 1.0 - 0.3 * rng.random((n, P))
    flux_err = rng.uniform(0.005, 0.03, (n, P))
    return flux, flux_err


def fd_jacobian(model, x, h=1e-6):
    """float64 central differences d f / d x (3, P) of one star."""
    steps = h * np.eye(P)
    plus = np.asarray(model(x[None] + steps, training=False))
    minus = np.asarray(model(x[None] - steps, training=False))
    return ((plus - minus) / (2 * h)).T


def test_noise_covariance_is_d_diag_e2_dt(rng):
    jac, err = rng.normal(size=(4, 3, 11)), rng.random((4, 11))
    expected = np.stack([d @ np.diag(e**2) @ d.T for d, e in zip(jac, err, strict=True)])
    np.testing.assert_allclose(noise_covariance(jac, err), expected, rtol=1e-13, atol=0)


def test_error_budget_matches_per_star_loop(smooth_model, scaler, rng):
    model, posterior = smooth_model, FeaturePosterior(smooth_model)
    flux, flux_err = spectra(7, rng)
    budget = error_budget(model, posterior, scaler, flux, flux_err, batch_size=3)
    s = np.diag(SCALE)
    scatter = s @ np.diag(posterior.noise_std**2) @ s
    np.testing.assert_allclose(budget["scatter"], np.broadcast_to(scatter, (7, 3, 3)),
                               rtol=1e-14)
    for n in range(flux.shape[0]):
        x = flux[n]
        pred = np.asarray(model(x[None], training=False))[0] * SCALE + MEAN
        cov_model = s @ posterior.predictive_covariance(x[None])[0] @ s
        d = s @ fd_jacobian(model, x)
        cov_noise = d @ np.diag(flux_err[n] ** 2) @ d.T
        np.testing.assert_allclose(budget["prediction"][n], pred, rtol=1e-13)
        np.testing.assert_allclose(budget["model"][n], cov_model, rtol=1e-12)
        # D is float32 in the pipeline: 1e-6 relative, far below any physical relevance
        np.testing.assert_allclose(budget["noise"][n], cov_noise, rtol=2e-5,
                                   atol=2e-5 * np.abs(cov_noise).max())
        np.testing.assert_allclose(budget["total"][n], cov_model + scatter + budget["noise"][n],
                                   rtol=1e-13)
    whole = error_budget(model, posterior, scaler, flux, flux_err, batch_size=64)
    for key in ("prediction", "model", "noise", "total"):
        np.testing.assert_allclose(whole[key], budget[key], rtol=1e-12, atol=0)


@pytest.mark.parametrize("last_layers", [1, 2])
def test_error_budget_with_a_laplace_posterior_is_the_separate_passes(smooth_model, scaler,
                                                                      rng, last_layers):
    """With a real Laplace posterior the one-pass budget (head features and last hidden
    features tapped from the Jacobian's forward pass) equals the separate passes: a forward
    pass for the prediction, ``predictive_covariance(x)`` running the body again, a probe
    model for the features and ``input_jacobian``."""
    import keras

    from pipeline.laplace import fit_laplace
    from pipeline.nn.derivatives import input_jacobian

    x_train, _ = spectra(40, rng)
    z = np.asarray(smooth_model(x_train, training=False)) + 0.1 * rng.standard_normal((40, 3))
    posterior = fit_laplace(smooth_model, x_train, z, last_layers=last_layers, device="cpu")
    flux, flux_err = spectra(7, rng)
    last = smooth_model.layers[-1]
    budget = error_budget(smooth_model, posterior, scaler, flux, flux_err, batch_size=3,
                          feature_layers=[last])
    pred = np.asarray(smooth_model(flux, training=False)) * SCALE + MEAN
    np.testing.assert_allclose(budget["prediction"], pred, rtol=1e-13)
    cov_model = posterior.predictive_covariance(flux, scaler=scaler)
    # off-diagonal terms near 0 at the rounding of the variances (the head's products)
    np.testing.assert_allclose(budget["model"], cov_model, rtol=1e-12,
                               atol=1e-13 * np.abs(cov_model).max())
    jac = input_jacobian(smooth_model, flux, batch_size=3, scaler=scaler)
    np.testing.assert_allclose(budget["noise"], noise_covariance(jac, flux_err), rtol=1e-12)
    probe = keras.Model(smooth_model.inputs[0], last.input)
    np.testing.assert_allclose(budget["features"][0], np.asarray(probe(flux)), rtol=1e-13)


def test_error_budget_carries_the_fitted_scatter_model(smooth_model, scaler, rng):
    """With a fitted scatter model the scatter part is S D R D S, D from each star's own model
    and flux-noise variances (standardized), and the correlation columns see R."""
    from pipeline.laplace.scatter import ScatterModel

    corr = np.array([[1.0, 0.5, -0.3], [0.5, 1.0, 0.2], [-0.3, 0.2, 1.0]])
    fitted = ScatterModel(np.array([[-1.0, 0.3, 0.2]] * 3), np.zeros((3, 2)), np.ones((3, 2)),
                          np.full((3, 2), -np.inf), np.full((3, 2), np.inf),
                          np.full(3, np.inf), corr)
    posterior = FeaturePosterior(smooth_model)
    posterior.scatter_covariance = fitted.covariance
    flux, flux_err = spectra(5, rng)
    budget = error_budget(smooth_model, posterior, scaler, flux, flux_err, batch_size=2)
    s = np.diag(SCALE)
    for n in range(5):
        model_var = np.diag(budget["model"][n]) / SCALE**2
        noise_var = np.diag(budget["noise"][n]) / SCALE**2
        d = np.exp(-1.0 + 0.3 * 0.5 * np.log(model_var) + 0.2 * 0.5 * np.log(noise_var))
        np.testing.assert_allclose(budget["scatter"][n], s @ (np.outer(d, d) * corr) @ s,
                                   rtol=1e-12)
        np.testing.assert_allclose(budget["total"][n], budget["model"][n]
                                   + budget["scatter"][n] + budget["noise"][n], rtol=1e-13)


def test_error_budget_gives_the_scatter_model_the_predicted_labels(smooth_model, scaler, rng):
    """A scatter model with the predicted labels as covariates: D from each star's model and
    noise variances and its standardized prediction, checked star by star."""
    from pipeline.laplace.scatter import ScatterModel

    slopes = np.array([[-1.0, 0.3, 0.2, 0.4, -0.1, -0.5]] * 3)
    fitted = ScatterModel(slopes, np.zeros((3, 5)), np.ones((3, 5)), np.full((3, 5), -np.inf),
                          np.full((3, 5), np.inf), np.full(3, np.inf), np.eye(3))
    posterior = FeaturePosterior(smooth_model)
    posterior.scatter_covariance = fitted.covariance
    flux, flux_err = spectra(5, rng)
    budget = error_budget(smooth_model, posterior, scaler, flux, flux_err, batch_size=2)
    for n in range(5):
        log_m = 0.5 * np.log(np.diag(budget["model"][n]) / SCALE**2)
        log_e = 0.5 * np.log(np.diag(budget["noise"][n]) / SCALE**2)
        zhat = (budget["prediction"][n] - MEAN) / SCALE
        d = np.exp(-1.0 + 0.3 * log_m + 0.2 * log_e + zhat @ slopes[0, 3:]) * SCALE
        np.testing.assert_allclose(budget["scatter"][n], np.diag(d**2), rtol=1e-12, atol=0)
        assert np.ptp(zhat) > 0.1  # the labels differ, so a wrong order would show


def test_noise_term_matches_monte_carlo(smooth_model, scaler):
    """Covariance of predictions on fluxes drawn with the stated errors = D diag(e^2) D^T."""
    rng = np.random.default_rng(11)
    flux, flux_err = spectra(3, rng)
    budget = error_budget(smooth_model, FeaturePosterior(smooth_model), scaler, flux, flux_err)
    n_draws = 40000
    for n in range(flux.shape[0]):
        noisy = flux[n] + flux_err[n] * rng.standard_normal((n_draws, P))
        pred = np.asarray(smooth_model(noisy, training=False)) * SCALE
        mc = np.cov(pred, rowvar=False)
        lin = budget["noise"][n]
        # standard error of a sample covariance of Gaussian variables
        se = np.sqrt((np.outer(np.diag(lin), np.diag(lin)) + lin**2) / n_draws)
        assert np.all(np.abs(mc - lin) < 4.5 * se), (mc, lin)
        # the test has power: errors 10% too large are detected
        assert np.any(np.abs(mc - 1.21 * lin) > 4.5 * se)


def test_correlations_closed_form():
    cov = np.array([[4.0, 1.0, -0.6], [1.0, 1.0, 0.0], [-0.6, 0.0, 0.09]])
    corr = correlations(cov[None])[0]
    np.testing.assert_allclose(corr, [[1, 0.5, -1.0], [0.5, 1, 0], [-1.0, 0, 1]], rtol=1e-14)


def test_bad_shapes_raise(smooth_model, scaler):
    from pipeline.exceptions import DataError

    with pytest.raises(DataError, match="flux_err"):
        error_budget(smooth_model, FeaturePosterior(smooth_model), scaler,
                     np.ones((2, P)), np.ones((3, P)))
