"""Per-label loss weights: ridge leave-one-out residuals against brute-force refits, the
weights on labels of known linear precision, the weighted label scaler."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import validate
from pipeline.exceptions import ConfigError, DataError
from pipeline.nn.label_weights import (
    EXPONENT,
    MAX_WEIGHT,
    label_weights,
    ridge_label_weights,
    ridge_loo_residuals,
)
from pipeline.nn.scaler import LabelScaler


def brute_loo(x, y, lam):
    """Leave each star out, centre on the rest, solve the ridge system, predict it."""
    out = np.empty_like(y)
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        xm, ym = x[keep].mean(0), y[keep].mean(0)
        xc = x[keep] - xm
        w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y[keep] - ym))
        out[i] = y[i] - (ym + (x[i] - xm) @ w)
    return out


def test_loo_residuals_match_refits_without_each_star(rng):
    """At a single penalty the closed form equals n refits. Centring on all stars instead of
    the n - 1 kept ones is the one approximation: O(1/n) relative."""
    n, p = 400, 30
    x = rng.normal(size=(n, p))
    y = x @ rng.normal(size=(p, 2)) + rng.normal(0, [0.3, 1.0], size=(n, 2))
    alpha = 1e-2
    xc = x - x.mean(0)
    lam = alpha * np.trace(xc @ xc.T) / n
    fast = ridge_loo_residuals(x, y, alphas=np.array([alpha]))
    np.testing.assert_allclose(fast, brute_loo(x, y, lam), rtol=0, atol=0.02 * np.std(fast))
    # the penalty is chosen per label: a grid containing alpha cannot do worse than alpha
    best = ridge_loo_residuals(x, y)
    assert np.all(np.mean(best**2, 0) <= np.mean(fast**2, 0) * (1 + 1e-12))


def test_ridge_weights_follow_the_linear_precision_of_each_label(rng):
    """Three labels, linear in the flux plus noise of 0.1, 0.2 and 0.05 standard deviations:
    variance ratios v_max / v_k = 4, 1, 16 (within sampling error), weights their powers
    ``EXPONENT``, the hardest label at 1."""
    n, p = 1500, 40
    flux = rng.normal(size=(n, p))
    signal = flux @ rng.normal(size=(p, 3))
    signal /= signal.std(0)
    noise = np.array([0.1, 0.2, 0.05])
    labels = signal * np.sqrt(1 - noise**2) + rng.normal(size=(n, 3)) * noise
    w = ridge_label_weights(flux, labels * [800, 1.3, 0.5] + [4800, 3, -0.3], seed=1)
    assert w[1] == 1.0
    np.testing.assert_allclose(w, np.array([4, 1, 16]) ** EXPONENT, rtol=0.2 * EXPONENT)
    # a label the flux determines exactly is capped
    exact = labels.copy()
    exact[:, 2] = signal[:, 2]
    assert ridge_label_weights(flux, exact, seed=1)[2] == MAX_WEIGHT


def test_label_weights_config(rng):
    flux, labels = rng.normal(size=(50, 5)), rng.normal(size=(50, 3))
    assert validate({})["train"]["label_weights"] == "ridge"
    np.testing.assert_array_equal(label_weights(flux, labels, "equal"), np.ones(3))
    np.testing.assert_array_equal(label_weights(flux, labels, [4, 1, 2]), [4.0, 1.0, 2.0])
    with pytest.raises(ConfigError, match="train.label_weights.*three|3 positive"):
        label_weights(flux, labels, [1, -1, 2])
    with pytest.raises(ConfigError):
        validate({"train": {"label_weights": [1, 2]}})
    with pytest.raises(DataError, match="too few.*train.label_weights"):
        ridge_label_weights(flux[:5], labels[:5])


def test_weighted_scaler_scales_by_root_weight_and_round_trips(rng, tmp_path):
    labels = np.stack([rng.normal(4800, 800, 300), rng.normal(3, 1.3, 300),
                       rng.normal(-0.3, 0.5, 300)], 1)
    w = np.array([4.0, 1.0, 9.0])
    scaler = LabelScaler().fit(labels, w)
    np.testing.assert_allclose(scaler.scale, labels.std(0) / [2, 1, 3], rtol=1e-14)
    np.testing.assert_allclose(scaler.std, labels.std(0), rtol=1e-14)
    z = scaler.transform(labels)
    # the MSE of z is the w-weighted MSE of the plainly standardized labels
    err = rng.normal(size=labels.shape) * labels.std(0)
    plain = LabelScaler().fit(labels)
    np.testing.assert_allclose(np.mean((scaler.transform(labels + err) - z) ** 2, 0),
                               w * np.mean((plain.transform(labels + err)
                                            - plain.transform(labels)) ** 2, 0), rtol=1e-12)
    scaler.save(tmp_path / "scaler.json")
    back = LabelScaler.load(tmp_path / "scaler.json")
    np.testing.assert_array_equal(back.weights, w)
    np.testing.assert_array_equal(back.scale, scaler.scale)


def test_out_of_range_margin_is_in_standard_deviations_whatever_the_weights(rng):
    """Bit 0's margin is predict.ood_sigma training standard deviations: a weighted scaler
    (scale = std / sqrt(w)) flags exactly the stars an equally weighted one does."""
    from pipeline.evaluation.flags import star_flags

    labels = np.stack([rng.uniform(3500, 7000, 400), rng.uniform(0.2, 4.8, 400),
                       rng.uniform(-2.5, 0.5, 400)], 1)
    cfg = validate({})["predict"]
    step = np.linspace(0, 0.5, 200)[:, None] * labels.std(0)  # 0 .. 0.5 std beyond the top
    prediction = labels.max(0) + step
    total = np.broadcast_to(np.eye(3), (200, 3, 3))
    flags = [star_flags(prediction, total, np.zeros(200), False, LabelScaler().fit(labels, w),
                        cfg) & 1 for w in (None, [9.0, 1.0, 4.0])]
    np.testing.assert_array_equal(flags[0], flags[1])
    assert 0 < flags[0].sum() < 200
