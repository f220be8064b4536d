"""Per-star error budget: a full 3x3 label covariance in physical units.

For star n with flux x_n (P,) and 1-sigma flux errors e_n (P,) the total covariance of the
predicted labels is the sum of three independent parts

    C_model   = S J_x Sigma J_x^T S          epistemic: Laplace posterior of the last layers
    C_scatter = S D_s R D_s S                aleatoric: fitted scatter D_s = diag(s_n) given the
                                             star's model and noise variances, with the residual
                                             correlation R of validation stars
                                             (pipeline.laplace.scatter; the Laplace noise sigma_k
                                             when the posterior has no scatter model)
    C_noise   = D_n diag(e_n^2) D_n^T = (D_n * e_n) (D_n * e_n)^T
                                             flux noise propagated through the input Jacobian

where S = diag(scaler.scale) maps standardized labels to physical units (applied by
``scaler.covariance_to_physical``) and D_n = d label / d flux (3, P) is already in physical
units (``input_jacobian(..., scaler=scaler)``). The noise term is the first-order (delta-method)
propagation of independent Gaussian flux errors; it is exact for a model linear in the flux and
accurate whenever the model is smooth on the scale of the flux errors. A ReLU network is not at
low SNR, so a posterior that carries the network's measured noise response
(``Posterior.noise_response``, pipeline.laplace.noise_response) scales it by
F = diag(sqrt(r_k(snr_n))) at the star's SNR (median flux / flux_err over the pixels with
noise): C_noise = F D diag(e^2) D^T F.

Everything streams over batches of stars: memory holds one batch of Jacobians (B, 3, P) at a
time plus the (N, 3, 3) outputs, never a per-star Python loop. One compiled pass per batch
gives the prediction, the Laplace head's input features and the Jacobian together
(``pipeline.nn.derivatives.forward_jacobian``): the budget costs little beyond the Jacobian
that its noise term needs anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from pipeline.exceptions import DataError
from pipeline.laplace.noise_response import star_snr
from pipeline.laplace.scatter import ScatterModel
from pipeline.nn.derivatives import forward_jacobian, input_jacobian
from pipeline.streaming import batches, progress

log = logging.getLogger(__name__)

COMPONENTS = ("model", "scatter", "noise", "total")


def weighted_gram(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(N, K, K) x_n diag(w_n) x_n^T of ``x`` (N, K, P), ``weights`` (P,) for every star or
    (N, 1, P) per star (w = 1 without): one fused row product per pair k <= l, where NumPy's
    batched matrix product of (K, P) by (P, K) blocks runs several times slower for a few
    outputs K."""
    xw = x if weights is None else x * weights
    out = np.empty((len(x), x.shape[1], x.shape[1]))
    for k in range(x.shape[1]):
        for l in range(k + 1):
            out[:, k, l] = out[:, l, k] = np.einsum("np,np->n", x[:, k], xw[:, l])
    return out


def noise_covariance(jacobian: np.ndarray, flux_err: np.ndarray) -> np.ndarray:
    """Flux noise propagated through the input Jacobian: D diag(e^2) D^T.

    Parameters
    ----------
    jacobian : (N, 3, P) d label / d flux.
    flux_err : (N, P) 1-sigma flux errors (0 for pixels that carry no noise).

    Returns
    -------
    (N, 3, 3) float64 covariance, computed as (D * e)(D * e)^T (:func:`weighted_gram`).
    """
    scaled = np.array(jacobian, np.float64)  # a float64 copy, scaled in place (no second one)
    scaled *= np.asarray(flux_err, np.float64)[:, None, :]
    return weighted_gram(scaled)


def noise_covariances(model, flux: np.ndarray, flux_err: np.ndarray, batch_size: int = 256,
                      scaler=None, jacobian_fn: Callable | None = None) -> np.ndarray:
    """Flux-noise covariances (N, 3, 3) of many stars, streamed over batches of Jacobians.

    Standardized units, or physical units when a ``scaler`` is given.
    """
    jacobian_fn = jacobian_fn or input_jacobian
    out = np.empty((flux.shape[0], 3, 3))
    for s in batches(flux.shape[0], batch_size):
        jac = jacobian_fn(model, np.asarray(flux[s]), batch_size=batch_size, scaler=scaler)
        out[s] = noise_covariance(jac, flux_err[s])
    return out


def needs_emulator(source) -> bool:
    """Whether the scatter of ``source`` (a posterior, or an ensemble's ``ScatterModel``) takes
    the emulator offset as a covariate (``pipeline.laplace.scatter``)."""
    model = source if isinstance(source, ScatterModel) else getattr(source, "scatter_model", None)
    return model is not None and model.uses_offset


def scatter_covariance(posterior, model_var: np.ndarray, noise_var: np.ndarray,
                       labels: np.ndarray | None = None,
                       offset: np.ndarray | None = None) -> np.ndarray:
    """Scatter covariance (N, 3, 3) in standardized units of stars with model and flux-noise
    variances (N, 3, standardized units), predicted labels (N, 3, standardized) and their
    offsets from the emulator's best-fit labels (N, 3, standardized; used only by a scatter
    model that takes them, ``needs_emulator``).

    The posterior's ``scatter_covariance`` (a fitted scatter model D R D, or the Laplace noise
    without double-counted flux noise) when it has one, else diag(``noise_std``^2).
    """
    if hasattr(posterior, "scatter_covariance"):
        extra = {"offset": offset} if needs_emulator(posterior) else {}
        return np.asarray(posterior.scatter_covariance(model_var, noise_var, labels, **extra),
                          np.float64)
    var = np.broadcast_to(np.asarray(posterior.noise_std, np.float64) ** 2, np.shape(noise_var))
    return var[:, :, None] * np.eye(var.shape[1])


def physical_scatter(source, scaler, cov_model: np.ndarray, cov_noise: np.ndarray,
                     prediction: np.ndarray, emulator_labels: np.ndarray | None = None
                     ) -> np.ndarray:
    """Scatter covariance (N, 3, 3), physical units, of stars with physical model and
    flux-noise covariances (N, 3, 3), predicted labels and the emulator's best-fit labels
    (N, 3, physical units; needed only when ``needs_emulator(source)``):
    ``scatter_covariance`` of ``source`` (a posterior, or an ensemble's ``ScatterModel``) in
    standardized units, whose covariates are the standardized variances diag(C) / scale^2,
    the standardized predictions and their offsets from the emulator's labels."""
    scale2 = np.asarray(scaler.scale, np.float64) ** 2
    labels = scaler.transform(np.asarray(prediction, np.float64))
    offset = None
    if emulator_labels is not None:
        offset = labels - scaler.transform(np.asarray(emulator_labels, np.float64))
    return scaler.covariance_to_physical(scatter_covariance(
        source, np.diagonal(cov_model, axis1=1, axis2=2) / scale2,
        np.diagonal(cov_noise, axis1=1, axis2=2) / scale2, labels, offset))


def with_scatter(budget: dict, source, scaler, emulator_labels: np.ndarray | None = None
                 ) -> dict:
    """``budget`` (``prediction``, ``model``, ``noise``; physical units) completed with the
    ``scatter`` covariance of ``source`` (:func:`physical_scatter`) and ``total``."""
    scatter = physical_scatter(source, scaler, budget["model"], budget["noise"],
                               budget["prediction"], emulator_labels)
    return {**budget, "scatter": scatter, "total": budget["model"] + scatter + budget["noise"]}


def predict_standardized(model, x: np.ndarray) -> np.ndarray:
    """Model output (B, 3) in standardized units, in inference mode (BatchNorm frozen)."""
    return np.asarray(model(x, training=False), dtype=np.float64)


def error_budget(model, posterior, scaler, flux: np.ndarray, flux_err: np.ndarray,
                 batch_size: int = 256, *, feature_layers=(), snr=None,
                 scatter: bool = True) -> dict:
    """Predictions and their error budget for every star, streamed in batches.

    Each batch takes one compiled pass (``pipeline.nn.derivatives.forward_jacobian``): the
    forward pass that the input Jacobian needs also gives the prediction, the Laplace head's
    input features phi (for ``posterior.feature_covariance``) and the inputs of
    ``feature_layers``, so the network body runs once per star.

    Parameters
    ----------
    model : functional Keras model mapping flux (B, P) to standardized labels (B, 3).
    posterior : ``pipeline.laplace.Posterior`` (``head``, ``feature_covariance(phi)``), or any
        object with ``predictive_covariance(x) -> (B, 3, 3)`` (standardized units); and
        ``scatter_covariance(model_var, noise_var, labels) -> (B, 3, 3)`` or ``noise_std``
        (3,), the standardized scatter; ``noise_response`` (or None) scales the noise term.
    scaler : ``pipeline.nn.scaler.LabelScaler`` (``inverse_transform``, ``covariance_to_physical``).
    flux : (N, P) normalized flux.
    flux_err : (N, P) 1-sigma flux errors; pass 0 for pixels whose flux is a fixed
        replacement rather than a noisy measurement (bad pixels), so they add no noise.
    batch_size : stars per batch.
    feature_layers : layers of ``model`` whose inputs (activations) are returned too, e.g. the
        last Dense layer for the feature distance of ``pipeline.evaluation.shift``.
    snr : (N,) the stars' SNR for the noise response, when the caller has it; else measured
        here (median flux / flux_err over the pixels with noise, ``noise_response.star_snr``).
    scatter : False leaves out ``scatter`` and ``total``, for a caller that completes the
        budget with :func:`with_scatter` once it has the emulator's labels of the stars (a
        scatter model that takes the emulator offset, ``needs_emulator``).

    Returns
    -------
    dict with ``prediction`` (N, 3) and the covariances ``model``, ``scatter``, ``noise`` and
    ``total`` = model + scatter + noise, each (N, 3, 3) float64 in physical units; with
    ``feature_layers``, ``features``: one (N, d_i) float64 array per layer.
    """
    flux = np.asarray(flux)
    flux_err = np.asarray(flux_err)
    if flux.ndim != 2 or flux_err.shape != flux.shape:
        raise DataError(f"flux {flux.shape} and flux_err {flux_err.shape} must both be (N, P)")
    n = flux.shape[0]
    prediction = np.empty((n, 3))
    cov_model = np.empty((n, 3, 3))
    cov_noise = np.empty((n, 3, 3))
    features = [[] for _ in feature_layers]
    head = getattr(posterior, "head", None) if hasattr(posterior, "feature_covariance") else None
    response = getattr(posterior, "noise_response", None)
    head_layer = None if head is None else head.first_layer
    taps = list(dict.fromkeys([*feature_layers, *([] if head_layer is None else [head_layer])]))
    slices = list(batches(n, batch_size))
    for s in progress(slices, total=len(slices), desc="error budget"):
        x = np.asarray(flux[s])
        out = forward_jacobian(model, x, batch_size=batch_size, scaler=scaler, layers=taps)
        tapped = dict(zip(taps, out.features, strict=True))
        prediction[s] = scaler.inverse_transform(np.asarray(out.outputs, np.float64))
        if head is None:
            cov = posterior.predictive_covariance(x)
        else:
            cov = posterior.feature_covariance(
                x.reshape(len(x), -1) if head_layer is None else tapped[head_layer])
        cov_model[s] = scaler.covariance_to_physical(np.asarray(cov, np.float64))
        cov_noise[s] = noise_covariance(out.jacobian, flux_err[s])
        if response is not None:
            cov_noise[s] = response.scale(cov_noise[s], star_snr(x, flux_err[s])
                                          if snr is None else snr[s])
        for store, layer in zip(features, feature_layers, strict=True):
            store.append(np.asarray(tapped[layer], np.float64))
    budget = {"prediction": prediction, "model": cov_model, "noise": cov_noise}
    if scatter:
        budget = with_scatter(budget, posterior, scaler)
    if feature_layers:
        budget["features"] = [np.concatenate(f) if f else np.zeros((0, 0)) for f in features]
    return budget
