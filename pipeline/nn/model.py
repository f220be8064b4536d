"""Keras architectures mapping normalized flux to standardized labels.

Every model takes the continuum-normalized flux as float32 ``(N, P)`` and returns the three
standardized labels ``z = (y - mean) / scale`` as ``(N, 3)`` in the order of
``pipeline.LABELS``. Two families, chosen by config ``model.type``:

* ``dense`` (the reference network): ``P -> h_1 -> ... -> h_m -> 3`` with the hidden widths
  ``model.hidden`` (default 2048, 1024, 512, 256, 128, 32; 17.6 M weights at P = 7213), the
  activation ``model.activation`` on every hidden layer and a linear output layer.
* ``cnn`` (StarNet-style): the flux is reshaped to ``(N, P, 1)`` inside the model, passes the
  1-D convolutions ``model.cnn.filters`` (kernel ``model.cnn.kernel_size``, 'same' padding),
  one max-pooling by ``model.cnn.pool_size``, is flattened and enters the same dense head.

With ``model.input_normalization`` (default true) a ``keras.layers.Normalization`` layer
(``flux_norm``) follows the input: ``(flux - mean) / sqrt(variance)`` per pixel (one common
variance with ``model.input_scale: global``, the default), with the
mean and variance of the training flux (:func:`flux_statistics`, set by
:func:`set_input_normalization`) stored as non-trainable weights inside the model. The model
still takes the normalized flux as read, so predict, input Jacobians and the Laplace head are
unchanged; unadapted, the layer is the identity (mean 0, variance 1).

Every trainable layer after the convolutions is an ordinary ``keras.layers.Dense``: the
Laplace code takes the last k of them as the posterior subset. Weights are initialized by
``model.initializer`` seeded from the config seed, so a model is a pure function of its config.
"""

from __future__ import annotations

import numpy as np

from pipeline import LABELS
from pipeline.exceptions import ConfigError, DataError
from pipeline.spectra.dataset import as_rows

ACTIVATIONS = ("relu", "gelu", "softplus", "tanh", "sigmoid", "elu", "selu", "silu", "swish",
               "mish", "leaky_relu", "linear")
INITIALIZERS = ("he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "lecun_normal",
                "lecun_uniform")

NORMALIZATION = "flux_norm"
MIN_PIXEL_STD = 1e-6  # below this a training pixel counts as constant: centred, not scaled


# ------------------------------------------------------------------------ input normalization
def _moments(flux, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and variance (ddof 0), float64, summed over row chunks."""
    flux = as_rows(flux, None)  # a row reader streams: only row slices are read
    if flux.ndim != 2 or len(flux) < 1:
        raise DataError(f"flux statistics need an (N, P) array with N >= 1, got {flux.shape}")
    n = len(flux)
    total = np.zeros(flux.shape[1])
    for s in range(0, n, chunk_size):
        total += flux[s:s + chunk_size].sum(axis=0, dtype=np.float64)
    mean = total / n
    sq = np.zeros(flux.shape[1])
    for s in range(0, n, chunk_size):
        sq += ((flux[s:s + chunk_size].astype(np.float64) - mean) ** 2).sum(axis=0)
    return mean, sq / n


def flux_statistics(flux, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and variance (ddof 0) of the training flux, float64 (P,) each.

    Summed in float64 over row chunks (no float64 copy of the whole flux). A pixel whose
    standard deviation is below ``MIN_PIXEL_STD`` (constant over the training set, e.g. bad in
    every star and set to 1) gets variance 1: it is centred, never divided by ~0.
    """
    mean, variance = _moments(flux, chunk_size)
    variance[~(variance >= MIN_PIXEL_STD**2)] = 1.0
    return mean, variance


def input_statistics(flux, scale: str = "global") -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance (P,) for the ``flux_norm`` layer (config ``model.input_scale``).

    'pixel': :func:`flux_statistics`, each pixel's own variance (full standardization).
    'global': every pixel is centred by its own mean but divided by one common standard
    deviation, the root mean of the variances of the non-constant pixels: the relative weight
    of the pixels (strong lines vary most, continuum pixels only by noise) is kept while the
    input is centred and of unit size.
    """
    if _choice(scale, ("pixel", "global"), "model.input_scale") == "pixel":
        return flux_statistics(flux)
    mean, variance = _moments(flux)
    varying = variance >= MIN_PIXEL_STD**2
    common = float(np.mean(variance[varying])) if varying.any() else 1.0
    return mean, np.full_like(variance, common)


def set_input_normalization(model, mean, variance) -> bool:
    """Store per-pixel ``mean`` and ``variance`` in the model's ``flux_norm`` layer.

    Returns False (and does nothing) for a model without that layer.
    """
    try:
        layer = model.get_layer(NORMALIZATION)
    except ValueError:
        return False
    layer.adapt_mean.assign(np.asarray(mean, np.float32))
    layer.adapt_variance.assign(np.asarray(variance, np.float32))
    layer.finalize_state()
    return True


def refresh_normalization(model) -> None:
    """Let Normalization layers use their weights after ``model.set_weights``.

    Keras' Normalization computes with a copy of its mean and variance made when it was
    built, adapted or loaded; ``set_weights`` changes the weights but not that copy.
    """
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()


# ------------------------------------------------------------------------------ architectures
def _choice(value: str, valid: tuple[str, ...], key: str) -> str:
    if value not in valid:
        raise ConfigError(f"config key '{key}': '{value}' is not supported "
                          f"(valid choices: {', '.join(valid)})")
    return value


def _initializer(name: str, seed: int):
    """A seeded keras initializer; each layer gets its own seed so layers differ."""
    import keras

    return keras.initializers.get({"class_name": name, "config": {"seed": int(seed)}})


def build_model(n_pixels: int, model_cfg: dict, seed: int):
    """Build the network of config ``model`` for spectra of ``n_pixels`` pixels.

    Parameters
    ----------
    n_pixels : int
        P, the length of the flux vector (from the data file, never a constant).
    model_cfg : dict
        The validated ``model`` config section (type, input_normalization, hidden,
        activation, initializer, cnn). The normalization layer starts as the identity; set
        its statistics with :func:`set_input_normalization`.
    seed : int
        Seed of the weight initializers (layer i uses ``seed + i``).

    Returns
    -------
    keras.Model
        Input ``flux`` float32 (N, P), output ``labels`` (N, 3) standardized labels.
    """
    import keras

    kind = _choice(model_cfg.get("type", "dense"), ("dense", "cnn"), "model.type")
    activation = _choice(model_cfg.get("activation", "relu"), ACTIVATIONS, "model.activation")
    init = _choice(model_cfg.get("initializer", "he_normal"), INITIALIZERS, "model.initializer")
    hidden = [int(h) for h in model_cfg.get("hidden", [2048, 1024, 512, 256, 128, 32])]
    if n_pixels < 1:
        raise DataError(f"cannot build a model for {n_pixels} pixels")

    flux = keras.Input(shape=(n_pixels,), dtype="float32", name="flux")
    h = flux
    if model_cfg.get("input_normalization", True):
        h = keras.layers.Normalization(axis=-1, name=NORMALIZATION)(h)
    layer_seed = seed
    if kind == "cnn":
        cnn = model_cfg.get("cnn", {})
        h = keras.layers.Reshape((n_pixels, 1), name="flux_channels")(h)
        for i, filters in enumerate(cnn.get("filters", [4, 16])):
            h = keras.layers.Conv1D(
                int(filters), int(cnn.get("kernel_size", 8)), padding="same",
                activation=activation, kernel_initializer=_initializer(init, layer_seed),
                name=f"conv_{i}",
            )(h)
            layer_seed += 1
        h = keras.layers.MaxPooling1D(int(cnn.get("pool_size", 4)), padding="same",
                                      name="pool")(h)
        h = keras.layers.Flatten(name="flatten")(h)
    for i, width in enumerate(hidden):
        h = keras.layers.Dense(width, activation=activation,
                               kernel_initializer=_initializer(init, layer_seed),
                               name=f"dense_{i}")(h)
        layer_seed += 1
    labels = keras.layers.Dense(len(LABELS), activation=None,
                                kernel_initializer=_initializer(init, layer_seed),
                                name="labels")(h)
    return keras.Model(flux, labels, name=f"stellar_{kind}")
