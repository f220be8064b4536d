"""LaplaceCallback fits the posterior when training ends."""

from __future__ import annotations

import keras
import numpy as np

from pipeline.laplace import fit_laplace
from pipeline.nn.callbacks import LaplaceCallback
from tests.conftest import set_seed


def test_callback_exposes_the_posterior_after_training(rng):
    set_seed(4)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, "relu"),
                              keras.layers.Dense(4, "relu"), keras.layers.Dense(3)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x[:, :3] + 0.1 * rng.normal(size=(64, 3))).astype(np.float32)
    callback = LaplaceCallback(x, y, last_layers=2, device="cpu")
    assert callback.posterior is None
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[callback])
    post = callback.posterior
    p = 4 * 7 + 4 + 3 * 4 + 3
    cov = post.inverse_hessian()
    assert cov.shape == (p, p)
    np.testing.assert_allclose(cov, cov.T, atol=1e-12 * np.abs(cov).max())
    assert np.linalg.eigvalsh(cov).min() > 0
    # the same posterior as fitting the trained model directly
    direct = fit_laplace(model, x, y, last_layers=2, device="cpu")
    np.testing.assert_allclose(post.cholesky, direct.cholesky, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(post.theta_map, direct.theta_map)
