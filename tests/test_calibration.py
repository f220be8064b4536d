"""Calibration metrics against known distributions and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pipeline.evaluation import calibration

N = 20000


@pytest.fixture
def gaussian_case(rng):
    true = rng.normal(size=N)
    sigma = np.exp(rng.normal(-1.0, 0.5, N))
    pred = true + sigma * rng.standard_normal(N)
    return pred, sigma, true


def test_calibrated_errors_look_calibrated(gaussian_case):
    pred, sigma, true = gaussian_case
    m = calibration.calibration_metrics(pred, sigma, true, n_bins=10)
    assert m["N"] == N
    assert abs(m["Z_MEAN"]) < 4 / np.sqrt(N)
    assert abs(m["Z_STD"] - 1) < 4 / np.sqrt(2 * N)
    for key, k in (("COVERAGE_68.3", 1), ("COVERAGE_95.4", 2), ("COVERAGE_99.7", 3)):
        p = 2 * stats.norm.cdf(k) - 1
        assert abs(m[key] - p) < 4 * np.sqrt(p * (1 - p) / N), key
    expected_nll = np.mean(0.5 * np.log(2 * np.pi * sigma**2)) + 0.5
    assert abs(m["NLL"] - expected_nll) < 4 * np.sqrt(0.5 / N)
    assert m["ENCE"] < 0.05


def test_underestimated_errors_are_detected(gaussian_case):
    pred, sigma, true = gaussian_case
    m = calibration.calibration_metrics(pred, 0.5 * sigma, true, n_bins=10)
    assert abs(m["Z_STD"] - 2) < 0.05
    assert abs(m["COVERAGE_68.3"] - (2 * stats.norm.cdf(0.5) - 1)) < 0.02
    assert abs(m["ENCE"] - 1) < 0.05
    ok = calibration.calibration_metrics(pred, sigma, true, n_bins=10)
    assert m["NLL"] > ok["NLL"] + 0.3


def test_ence_by_hand():
    sigma = np.array([1.0, 1.0, 2.0, 2.0])
    residual = np.array([1.0, -1.0, 1.0, 1.0])
    # bin 1: RMV 1, RMSE 1 -> 0; bin 2: RMV 2, RMSE 1 -> 0.5; mean 0.25
    assert calibration.ence(residual, sigma, n_bins=2) == pytest.approx(0.25, rel=1e-15)


def test_non_finite_rows_are_left_out():
    pred = np.array([1.0, np.nan, 3.0, 4.0])
    true = np.array([0.0, 0.0, np.inf, 3.0])
    sigma = np.array([1.0, 1.0, 1.0, 0.0])
    m = calibration.calibration_metrics(pred, sigma, true, n_bins=3)
    assert m["N"] == 1 and m["Z_MEAN"] == 1.0
    acc = calibration.accuracy_metrics(pred, true)
    assert acc["n_stars"] == 2
    assert acc["bias"] == pytest.approx(1.0) and acc["rmse"] == pytest.approx(1.0)


def test_accuracy_against_numpy(rng):
    pred, true = rng.normal(size=501), rng.normal(size=501)
    r = pred - true
    acc = calibration.accuracy_metrics(pred, true)
    assert acc["bias"] == pytest.approx(r.mean(), rel=1e-13)
    assert acc["rmse"] == pytest.approx(np.sqrt(np.mean(r**2)), rel=1e-13)
    mad = np.median(np.abs(r - np.median(r)))
    assert acc["robust_scatter"] == pytest.approx(1.4826 * mad, rel=1e-13)
    assert calibration.robust_scatter(rng.normal(0, 3, N)) == pytest.approx(3, rel=0.03)


def test_cramer_rao_ratios(rng):
    true = rng.normal(size=N)
    crb = np.exp(rng.normal(-1, 0.3, N))
    pred = true + 1.3 * crb * rng.standard_normal(N)
    m = calibration.crb_metrics(pred, 2.0 * crb, true, crb)
    assert m["ERR_OVER_CRB"] == pytest.approx(2.0, rel=1e-14)
    assert m["SCATTER_OVER_CRB"] == pytest.approx(1.3, rel=0.03)


def test_gaussian_crps_matches_a_monte_carlo_estimate(rng):
    """CRPS(F, y) = E|X - y| - E|X - X'| / 2 with X, X' ~ F independent (Gneiting & Raftery)."""
    from pipeline.evaluation.calibration import crps_gaussian

    mu, sigma = np.array([0.0, 1.0, -2.0, 5.0]), np.array([1.0, 0.5, 2.0, 0.1])
    y = np.array([0.3, -1.0, -2.0, 5.4])
    x, x2 = (mu + sigma * rng.standard_normal((400000, 4)) for _ in range(2))
    monte_carlo = np.mean(np.abs(x - y), axis=0) - 0.5 * np.mean(np.abs(x - x2), axis=0)
    # Monte-Carlo standard error ~ sigma / sqrt(400000) ~ 0.002 sigma
    np.testing.assert_allclose(crps_gaussian(mu - y, sigma), monte_carlo, atol=0.01 * sigma.max(),
                               rtol=0.01)
    # at y = mu the closed form is sigma (sqrt 2 - 1) / sqrt(pi)
    np.testing.assert_allclose(crps_gaussian(0.0, 2.0), 2.0 * (np.sqrt(2) - 1) / np.sqrt(np.pi))


def test_calibration_metrics_report_the_mean_crps(rng):
    from pipeline.evaluation.calibration import calibration_metrics, crps_gaussian

    true = rng.normal(size=500)
    sigma = np.exp(rng.normal(size=500))
    pred = true + sigma * rng.standard_normal(500)
    pred[0] = np.nan  # left out like every other statistic
    out = calibration_metrics(pred, sigma, true, n_bins=5)
    assert out["CRPS"] == pytest.approx(np.mean(crps_gaussian(pred[1:] - true[1:], sigma[1:])))
    # errors twice too large score worse than the right ones
    assert calibration_metrics(pred, 2 * sigma, true, n_bins=5)["CRPS"] > out["CRPS"]


def test_sampling_errors_match_the_spread_of_calibrated_samples(rng):
    """Z_STD_SE and COVERAGE_68.3_SE equal the Monte-Carlo spread of z std and 1-sigma coverage
    over 4000 samples of 300 calibrated Gaussian z-scores (2.7 points of coverage)."""
    z = rng.standard_normal((4000, 300))
    se = calibration.calibration_metrics(z[0], np.ones(300), np.zeros(300), n_bins=5)
    assert se["Z_STD_SE"] == pytest.approx(np.std(np.std(z, axis=1, ddof=1)), rel=0.06)
    assert se["COVERAGE_68.3_SE"] == pytest.approx(np.std(np.mean(np.abs(z) < 1, axis=1)),
                                                   rel=0.06)
    assert se["COVERAGE_68.3_SE"] == pytest.approx(0.0269, abs=5e-4)
