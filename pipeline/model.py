"""Keras architectures mapping normalized flux to standardized labels, and the label scaler.

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

:class:`LabelScaler` holds the standardization and converts covariances and Jacobians back to
physical units; :func:`load_trained` loads what the train step wrote (model.keras,
scaler.json, wave.npy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import LABELS
from pipeline.exceptions import ConfigError, DataError, ModelFileError

ACTIVATIONS = ("relu", "gelu", "softplus", "tanh", "sigmoid", "elu", "selu", "silu", "swish",
               "mish", "leaky_relu", "linear")
INITIALIZERS = ("he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "lecun_normal",
                "lecun_uniform")
MODEL_FILE, SCALER_FILE, WAVE_FILE = "model.keras", "scaler.json", "wave.npy"


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


# ------------------------------------------------------------------------------ label scaler
@dataclass
class LabelScaler:
    """Per-label standardization ``z = (y - mean) / scale`` of (TEFF, LOGG, FE_H).

    ``mean`` and ``scale`` are float64 (3,): the training-set mean and standard deviation
    (ddof = 0). Physical covariances are ``C_y = S C_z S`` with ``S = diag(scale)``, physical
    Jacobians ``d y / d x = S d z / d x``. ``label_min`` and ``label_max`` (3,) record the
    training label range, against which predictions are flagged as extrapolations.
    """

    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    label_min: np.ndarray | None = None
    label_max: np.ndarray | None = None

    def fit(self, y: np.ndarray) -> LabelScaler:
        """Fit mean and scale to labels ``y`` (N, 3); returns ``self``.

        Raises
        ------
        DataError
            If a label is non-finite or constant (zero variance: nothing to learn).
        """
        y = np.asarray(y, dtype=np.float64)
        if y.ndim != 2 or y.shape[1] != len(LABELS) or y.shape[0] < 2:
            raise DataError(f"labels must have shape (N >= 2, {len(LABELS)}), got {y.shape}")
        bad = ~np.isfinite(y)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise DataError(f"label '{LABELS[col]}' of row {row} is not finite; drop the row "
                            "(config data.nan_labels: drop) before training")
        mean, scale = y.mean(axis=0), y.std(axis=0)
        flat = scale <= 1e-12 * np.maximum(np.abs(mean), 1.0)
        if flat.any():
            name = LABELS[int(np.argmax(flat))]
            raise DataError(f"label '{name}' is constant ({mean[flat][0]:g}) in the training "
                            "set: a network cannot learn it; use training stars that span it")
        self.mean, self.scale = mean, scale
        self.label_min, self.label_max = y.min(axis=0), y.max(axis=0)
        return self

    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None or self.scale is None:
            raise ModelFileError("the label scaler is not fitted; call fit(y) or load(path)")
        return self.mean, self.scale

    def transform(self, y: np.ndarray) -> np.ndarray:
        """Physical labels (..., 3) -> standardized labels (..., 3), float64."""
        mean, scale = self._fitted()
        return (np.asarray(y, dtype=np.float64) - mean) / scale

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        """Standardized labels (..., 3) -> physical labels (..., 3), float64."""
        mean, scale = self._fitted()
        return np.asarray(z, dtype=np.float64) * scale + mean

    def covariance_to_physical(self, cov: np.ndarray) -> np.ndarray:
        """Standardized covariances (..., 3, 3) -> physical: ``cov * outer(scale, scale)``."""
        _, scale = self._fitted()
        return np.asarray(cov, dtype=np.float64) * np.outer(scale, scale)

    def jacobian_to_physical(self, jac: np.ndarray) -> np.ndarray:
        """Jacobians d z / d x (..., 3, P) -> d y / d x: ``scale[:, None] * jac``.

        A float32 input stays float32 (shards of (N, 3, P) are large); others become float64.
        """
        _, scale = self._fitted()
        jac = np.asarray(jac)
        dtype = np.float32 if jac.dtype == np.float32 else np.float64
        return scale[:, None].astype(dtype) * jac.astype(dtype, copy=False)

    def save(self, path: str | Path, provenance: dict | None = None) -> None:
        """Write the scaler as JSON (exact float64 round trip), atomically.

        ``provenance`` (pipeline.io.provenance cards of the train step) is stored alongside.
        """
        from pipeline.io import atomic_path

        mean, scale = self._fitted()
        doc = {"labels": list(LABELS), "mean": mean.tolist(), "scale": scale.tolist(),
               "provenance": provenance or {}}
        if self.label_min is not None and self.label_max is not None:
            doc["label_min"] = np.asarray(self.label_min, np.float64).tolist()
            doc["label_max"] = np.asarray(self.label_max, np.float64).tolist()
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LabelScaler:
        """Read a scaler written by :meth:`save`.

        Raises
        ------
        ModelFileError
            If the file is missing, not JSON, or its labels, shapes or values are wrong.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"label scaler '{path}' does not exist; rerun the train step")
        try:
            doc = json.loads(path.read_text())
            mean = np.asarray(doc["mean"], dtype=np.float64)
            scale = np.asarray(doc["scale"], dtype=np.float64)
            labels = tuple(doc["labels"])
            bounds = [np.asarray(doc[k], dtype=np.float64) if k in doc else None
                      for k in ("label_min", "label_max")]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(f"label scaler '{path}' is corrupt ({exc}); rerun the train "
                                 "step") from None
        ok = (labels == LABELS and mean.shape == scale.shape == (len(LABELS),)
              and np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all())
        if not ok:
            raise ModelFileError(f"label scaler '{path}' is corrupt (needs labels {LABELS}, "
                                 "finite mean and positive scale of length 3); rerun the "
                                 "train step")
        if any(b is not None and b.shape != mean.shape for b in bounds):
            raise ModelFileError(f"label scaler '{path}' is corrupt (label_min/label_max must "
                                 "have length 3); rerun the train step")
        return cls(mean=mean, scale=scale, label_min=bounds[0], label_max=bounds[1])


# ----------------------------------------------------------------------------- trained model
def load_wave(path: str | Path) -> np.ndarray:
    """The training wavelength grid (P,) float64 saved as ``wave.npy``."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"wavelength grid '{path}' does not exist; rerun the train step")
    try:
        wave = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"wavelength grid '{path}' is corrupt ({exc}); rerun the train "
                             "step") from None
    if wave.ndim != 1 or not np.isfinite(wave).all() or np.any(np.diff(wave) <= 0):
        raise ModelFileError(f"wavelength grid '{path}' must be a finite, strictly increasing "
                             "1-D array; rerun the train step")
    return wave.astype(np.float64)


def load_model_file(path: str | Path):
    """Load a ``.keras`` model for inference (no optimizer), raising ModelFileError."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file '{path}' does not exist; rerun the train step")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # keras raises ValueError, OSError, zipfile errors...
        raise ModelFileError(f"model file '{path}' is corrupt ({type(exc).__name__}: {exc}); "
                             "rerun the train step") from None


def load_trained(model_dir: str | Path):
    """Load what the train step wrote in ``model_dir``.

    Returns
    -------
    (keras.Model, LabelScaler, numpy.ndarray)
        The model (inference only), the label scaler and the training grid ``wave`` (P,).

    Raises
    ------
    ModelFileError
        Naming the missing or corrupt file, or a model whose input size differs from the grid.
    """
    model_dir = Path(model_dir)
    scaler = LabelScaler.load(model_dir / SCALER_FILE)
    wave = load_wave(model_dir / WAVE_FILE)
    model = load_model_file(model_dir / MODEL_FILE)
    n_in, n_out = model.input_shape[-1], model.output_shape[-1]
    if n_in != wave.size or n_out != len(LABELS):
        raise ModelFileError(f"model '{model_dir / MODEL_FILE}' maps {n_in} pixels to {n_out} "
                             f"outputs but '{model_dir / WAVE_FILE}' has {wave.size} pixels and "
                             f"there are {len(LABELS)} labels; rerun the train step")
    return model, scaler, wave
