"""Noise response: the Monte-Carlo / delta-method variance ratio against closed forms.

References: a model linear in the flux (ratio 1 exactly, the delta method being exact), and a
tanh layer whose label variance under Gaussian flux noise is a sum of one-dimensional
integrals, done by Gauss-Hermite quadrature; the error budget against its own unscaled noise
term times the stated factors.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.laplace.error_budget import error_budget, noise_covariances
from pipeline.laplace.noise_response import NoiseResponse, fit_noise_response, star_snr

P = 40


def _model(activation, weights):
    import keras

    flux = keras.Input((P,))
    hidden = keras.layers.Activation(activation)(flux)
    labels = keras.layers.Dense(3, use_bias=False)(hidden)
    model = keras.Model(flux, labels)
    model.layers[-1].set_weights([weights.astype(np.float32)])
    return model


def _predict(model):
    return lambda x: np.asarray(model(x, training=False), np.float64)


def test_linear_model_has_unit_response():
    """For a model linear in the flux the delta method is exact: every bin's ratio is 1 up to
    the Monte-Carlo error (a few per cent with 200 stars x 32 draws per amplitude)."""
    rng = np.random.default_rng(0)
    model = _model("linear", rng.normal(0, 1, (P, 3)))
    flux = 1 - 0.3 * rng.random((200, P))
    flux_err = flux / rng.uniform(10, 100, (200, 1))
    noise = noise_covariances(model, flux.astype(np.float32), flux_err)
    response = fit_noise_response(_predict(model), flux, flux_err, noise, draws=32, n_bins=4)
    np.testing.assert_allclose(response.ratio, 1.0, atol=0.1)
    assert np.all(np.diff(response.log_snr) > 0)


def _tanh_variance(m, s):
    """Var[tanh(m + s eps)], eps ~ N(0, 1), by 80-point Gauss-Hermite quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    values = np.tanh(m[..., None] + s[..., None] * x)
    mean = values @ w
    return (values**2) @ w - mean**2


def test_tanh_response_matches_quadrature():
    """A tanh layer under noise amplitudes 1, 2, 4 (identical stars, so each amplitude fills one
    bin): the fitted ratio equals the quadrature variance over the delta method's
    sum_p W_pk^2 sech^4(m_p) a^2 e_p^2, which falls well below 1 at the largest amplitude."""
    rng = np.random.default_rng(1)
    weights = rng.normal(0, 1, (P, 3))
    model = _model("tanh", weights)
    m = rng.uniform(0.2, 1.2, P)
    err = np.full(P, 0.25)
    flux, flux_err = np.tile(m, (150, 1)), np.tile(err, (150, 1))
    noise = noise_covariances(model, flux.astype(np.float32), flux_err)
    response = fit_noise_response(_predict(model), flux, flux_err, noise, draws=48, n_bins=3)
    expected = []
    for a in (4.0, 2.0, 1.0):  # ascending effective SNR, as the bins are ordered
        exact = (weights**2).T @ _tanh_variance(m, a * err)
        linear = (weights**2).T @ (np.cosh(m) ** -4 * (a * err) ** 2)
        expected.append(exact / linear)
    expected = np.array(expected)
    np.testing.assert_allclose(response.ratio, expected, rtol=0.08)
    assert expected[0].max() < 0.8  # the test has power: the delta method is far off at a = 4
    np.testing.assert_allclose(np.exp(response.log_snr),
                               np.median(m / err) / np.array([4.0, 2.0, 1.0]), rtol=1e-6)


def test_interpolation_scaling_and_round_trip():
    """Linear in log SNR between bin medians, constant beyond; F C F with F = diag(sqrt(r));
    a non-finite SNR gets factor 1; to_dict / from_dict keep it."""
    response = NoiseResponse(np.log([10.0, 100.0]), np.array([[0.5, 0.8, 1.0], [1.0, 1.0, 1.0]]))
    r = response(np.array([5.0, 10.0, np.sqrt(1000.0), 100.0, 1e4, np.nan]))
    np.testing.assert_allclose(r[:, 0], [0.5, 0.5, 0.75, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(r[:, 1], [0.8, 0.8, 0.9, 1.0, 1.0, 1.0])
    cov = np.array([[[4.0, 1.0, 0.5], [1.0, 2.0, 0.3], [0.5, 0.3, 1.0]]])
    f = np.sqrt([0.5, 0.8, 1.0])
    np.testing.assert_allclose(response.scale(cov, np.array([10.0])), cov * np.outer(f, f))
    back = NoiseResponse.from_dict(response.to_dict())
    np.testing.assert_array_equal(back.ratio, response.ratio)


def test_star_snr_skips_pixels_without_noise():
    flux = np.array([[1.0, 0.5, 1.0, 0.8]])
    flux_err = np.array([[0.01, 0.0, 0.02, 0.01]])  # pixel 1: bad, error 0
    np.testing.assert_allclose(star_snr(flux, flux_err), [80.0])


def test_error_budget_scales_the_noise_term():
    """A posterior with a noise response: the budget's noise term is F C F of the delta method
    at each star's SNR, and the total follows; without one it is the delta method."""
    rng = np.random.default_rng(2)
    model = _model("tanh", rng.normal(0, 1, (P, 3)))

    class Posterior:
        noise_std = np.array([0.1, 0.1, 0.1])
        noise_response = None

        def predictive_covariance(self, x):
            return np.broadcast_to(1e-3 * np.eye(3), (len(x), 3, 3))

    from pipeline.nn.scaler import LabelScaler

    scaler = LabelScaler(mean=np.zeros(3), scale=np.array([100.0, 1.0, 0.5]))
    flux = 1 - 0.3 * rng.random((6, P))
    flux_err = flux / rng.uniform(10, 100, (6, 1))
    plain = error_budget(model, Posterior(), scaler, flux, flux_err, batch_size=4)
    posterior = Posterior()
    posterior.noise_response = NoiseResponse(np.log([10.0, 100.0]),
                                             np.array([[0.4, 0.6, 0.9], [0.9, 1.0, 1.1]]))
    scaled = error_budget(model, posterior, scaler, flux, flux_err, batch_size=4)
    f = np.sqrt(posterior.noise_response(star_snr(flux, flux_err)))
    np.testing.assert_allclose(scaled["noise"], plain["noise"] * f[:, :, None] * f[:, None, :],
                               rtol=1e-12)
    np.testing.assert_allclose(scaled["total"], scaled["model"] + scaled["scatter"]
                               + scaled["noise"], rtol=1e-12)
    assert np.any(np.abs(f - 1) > 0.1)


def test_too_few_draws_is_an_error():
    from pipeline.exceptions import DataError

    with pytest.raises(DataError, match="draws"):
        fit_noise_response(None, np.ones((3, P)), np.ones((3, P)), np.ones((3, 3, 3)), draws=1)


def test_noise_response_check_reads_a_run(tiny_model_dir, tiny_posterior_file, tmp_path, capsys):
    """benchmarks.noise_response_check on a run's layout: without a stored response the scaled
    and plain rows coincide (factor 1); with one, the scaled row is the plain one over it."""
    import shutil

    from benchmarks.noise_response_check import check, main
    from pipeline.artifacts.model_dir import load_trained
    from pipeline.config import validate
    from pipeline.laplace import Posterior

    results = tmp_path / "results"
    shutil.copytree(tiny_model_dir, results / "model")
    (results / "laplace").mkdir()
    shutil.copy(tiny_posterior_file, results / "laplace" / "posterior.npz")
    config = validate({})
    (snr, delta, scaled, ratio), = check(results, config, [15.0], n=5, draws=4)
    assert snr == 15.0 and delta.shape == (3,) and np.all(delta > 0)
    np.testing.assert_allclose(scaled, delta)
    np.testing.assert_allclose(ratio, 1.0)
    model, _, _ = load_trained(results / "model")
    posterior = Posterior.load(results / "laplace" / "posterior.npz", model)
    posterior.noise_response = NoiseResponse(np.log([10.0, 20.0]), np.full((2, 3), 0.5))
    posterior.save(results / "laplace" / "posterior.npz")
    (_, delta2, scaled2, ratio2), = check(results, config, [15.0], n=5, draws=4)
    np.testing.assert_allclose(ratio2, 0.5)
    np.testing.assert_allclose(scaled2, delta2 / 0.5, rtol=1e-10)
    from tests.conftest import REPO

    assert main(["--results", str(results), "--configfile", str(REPO / "config" / "quick.yaml"),
                 "--n", "3", "--draws", "3", "--snr", "20"]) == 0
    assert "SNR 20: delta method" in capsys.readouterr().out
