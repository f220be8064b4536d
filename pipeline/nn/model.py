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

Every trainable layer after the convolutions is an ordinary ``keras.layers.Dense``: the
Laplace code takes the last k of them as the posterior subset. Weights are initialized by
``model.initializer`` seeded from the config seed, so a model is a pure function of its config.
"""

from __future__ import annotations

from pipeline import LABELS
from pipeline.exceptions import ConfigError, DataError

ACTIVATIONS = ("relu", "gelu", "softplus", "tanh", "sigmoid", "elu", "selu", "silu", "swish",
               "mish", "leaky_relu", "linear")
INITIALIZERS = ("he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "lecun_normal",
                "lecun_uniform")


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
        The validated ``model`` config section (type, hidden, activation, initializer, cnn).
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
