"""Keras callback that fits the last-layer Laplace posterior when training ends.

    cb = LaplaceCallback(x_train, y_train_standardized, last_layers=2)
    model.fit(x_train, y_train_standardized, callbacks=[cb])
    cb.posterior.inverse_hessian()        # (P_L, P_L) posterior covariance
    cb.posterior.predictive_covariance(x) # (N, 3, 3)
"""

from __future__ import annotations

import keras

from pipeline.laplace import fit_laplace


class LaplaceCallback(keras.callbacks.Callback):
    """Fit :func:`pipeline.laplace.fit_laplace` on ``(x, y)`` in ``on_train_end``.

    Parameters
    ----------
    x, y : training inputs and standardized labels (N, K).
    **fit_kwargs : passed to ``fit_laplace`` (last_layers, curvature, prior, ...).

    The fitted :class:`pipeline.laplace.Posterior` is ``self.posterior`` (None before the end
    of training).
    """

    def __init__(self, x, y, **fit_kwargs):
        super().__init__()
        self.x, self.y, self.fit_kwargs = x, y, fit_kwargs
        self.posterior = None

    def on_train_end(self, logs=None):
        self.posterior = fit_laplace(self.model, self.x, self.y, **self.fit_kwargs)
