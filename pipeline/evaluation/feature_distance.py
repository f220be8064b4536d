"""Distance of a star's last-hidden-layer features from the training stars' features.

The network sees a spectrum only through phi (d,), the activations entering its output layer.
A spectrum unlike the training set can map to labels that look ordinary while phi sits
outside the training cloud. The distance is Mahalanobis with a Ledoit-Wolf shrinkage
covariance of the training features, each unit first scaled by its training standard
deviation (the shrinkage target mu I then treats units of different scale alike)::

    X = (Phi - m) / sd                  Phi: training features (n, d); sd floored at 1e-3
                                        of the median sd, so a dead unit that fires counts
    S = X^T X / n
    Sigma = (1 - a) S + a mu I,         mu = tr(S) / d
    a = min(b2, d2) / d2,   d2 = |S - mu I|_F^2,   b2 = sum_k |x_k x_k^T - S|_F^2 / n^2

(Ledoit & Wolf 2004, J. Multivariate Anal. 88, 365); the shrinkage keeps Sigma invertible
when units are dead or collinear (d up to a few hundred, often rank-deficient). The reported
value is ``sqrt(D^2 / d)`` with ``D^2 = (phi - m)^T Sigma^-1 (phi - m)``: about 1 for a
training star.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_factor, solve_triangular

from pipeline.exceptions import NumericalError


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(Sigma (d, d), shrinkage a) of the rows of ``x`` (n, d), centred here."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=0)
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    d2 = np.sum((s - mu * np.eye(d)) ** 2)
    # sum_k |x_k x_k^T - S|_F^2 = sum_k |x_k|^4 - n |S|_F^2
    b2 = (np.sum(np.sum(x**2, axis=1) ** 2) - n * np.sum(s**2)) / n**2
    a = 0.0 if d2 <= 0 else float(min(b2, d2) / d2)
    return (1.0 - a) * s + a * mu * np.eye(d), a


@dataclass
class FeatureReference:
    """Training feature mean and scale (d,), lower Cholesky factor (d, d) of the shrunk
    covariance of the scaled features, and the shrinkage a."""

    mean: np.ndarray
    scale: np.ndarray
    cholesky: np.ndarray
    shrinkage: float

    @classmethod
    def fit(cls, features: np.ndarray) -> FeatureReference:
        features = np.asarray(features, np.float64)
        sd = features.std(axis=0)
        if not np.any(sd > 0):
            raise NumericalError("feature distance: the training features are constant (every "
                                 "last-hidden unit is dead on every training star, so the "
                                 "network predicts one value for all stars); retrain it "
                                 "(docs/training.md, diagnostics.json)")
        scale = np.maximum(sd, 1e-3 * np.median(sd[sd > 0]))
        mean = features.mean(axis=0)
        cov, a = ledoit_wolf((features - mean) / scale)
        return cls(mean, scale, cho_factor(cov, lower=True)[0] * np.tri(len(cov)), a)

    def distance(self, features: np.ndarray) -> np.ndarray:
        """(N,) sqrt(D^2 / d) of each row of ``features`` (N, d): one triangular solve."""
        x = (np.asarray(features, np.float64) - self.mean) / self.scale
        w = solve_triangular(self.cholesky, x.T, lower=True)
        return np.sqrt(np.sum(w**2, axis=0) / len(self.mean))


def last_dense_layer(model):
    """The network's last Dense layer: its input is the last hidden features phi."""
    import keras

    return [la for la in model.layers if isinstance(la, keras.layers.Dense)][-1]


def last_hidden_units(model) -> int:
    """d: the width of the input of the network's last Dense layer."""
    return int(last_dense_layer(model).input.shape[-1])


def last_hidden_features(model, flux, batch_size: int = 256) -> np.ndarray:
    """(N, d) float64 activations entering the network's last Dense layer (inference mode)."""
    import keras

    probe = keras.Model(model.inputs[0], last_dense_layer(model).input)
    return np.concatenate([np.asarray(probe(np.asarray(flux[s:s + batch_size], np.float32),
                                            training=False), np.float64)
                           for s in range(0, len(flux), batch_size)])
