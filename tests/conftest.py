"""Shared, seeded fixtures for the test suite.

Tests run on tiny models and small synthetic data so the whole suite stays within a few minutes
on a 2-core CPU. TensorFlow is configured once here: float64 where a test asks for it, op
determinism always, and few threads so parallel test processes do not fight over the cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = Path(__file__).resolve().parent.parent
TEST_DATA = Path(__file__).resolve().parent / "data"
APSTAR_FILE = REPO / "data" / "apStar-dr17-2M19485057+5005279.fits"  # shipped real spectrum


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def quick_config() -> dict:
    """The validated quick configuration (tiny network, few hundred stars)."""
    from pipeline.config import load_config

    return load_config(REPO / "config" / "quick.yaml")


@pytest.fixture
def one_chunk_alive(monkeypatch) -> list[int]:
    """Patches the chunk reader of ``pipeline.spectra.inputs.input_chunks`` to check, at each
    read, that no earlier chunk's flux or flux_err is still referenced (so a streaming step
    holds one chunk at its peak, not two); returns the list of chunk sizes read."""
    import gc
    import weakref

    from pipeline.spectra import inputs

    alive, sizes, read = [], [], inputs.load_input

    def load_input(*args, **kwargs):
        gc.collect()
        assert not [r for r in alive if r() is not None], (
            f"chunk {len(sizes)} is read while an earlier chunk is still referenced")
        spectra, resampled = read(*args, **kwargs)
        alive.extend((weakref.ref(spectra.flux), weakref.ref(spectra.flux_err)))
        sizes.append(len(spectra.flux))
        return spectra, resampled

    monkeypatch.setattr(inputs, "load_input", load_input)
    return sizes


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A trained-model directory as the train step writes it (model.keras, scaler.json,
    wave.npy): a dense P -> 8 -> 3 network on the 7213-pixel synthetic/apStar grid, fitted for
    10 epochs to 300 synthetic spectra (seconds on CPU)."""
    import keras

    from pipeline.nn.model import build_model
    from pipeline.nn.scaler import LabelScaler
    from pipeline.spectra.synthetic import apogee_grid, generate

    set_seed(0)
    wave = apogee_grid()
    train = generate(300, 1, wave=wave)
    train.flux[train.flux_err <= 0] = 1.0  # bad pixels as read_spectra leaves them
    scaler = LabelScaler().fit(train.label_array())
    model = build_model(wave.size, {"type": "dense", "hidden": [8]}, seed=0)
    # a small step: 7213 un-centred inputs make a larger first Adam step kill every ReLU
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    model.fit(train.flux, scaler.transform(train.label_array()), epochs=10, batch_size=32,
              verbose=0)
    out = tmp_path_factory.mktemp("tiny_model")
    np.save(out / "wave.npy", wave)
    scaler.save(out / "scaler.json")
    model.save(out / "model.keras")
    return out


@pytest.fixture(scope="session")
def tiny_posterior_file(tiny_model_dir, tmp_path_factory) -> Path:
    """A last-layer Laplace posterior (.npz) of the ``tiny_model_dir`` network, fitted on
    60 synthetic spectra (seconds on CPU)."""
    from pipeline.artifacts.model_dir import load_trained
    from pipeline.laplace import fit_laplace
    from pipeline.spectra.synthetic import generate

    model, scaler, wave = load_trained(tiny_model_dir)
    spectra = generate(60, 3, wave=wave)
    spectra.flux[spectra.flux_err <= 0] = 1.0
    posterior = fit_laplace(model, spectra.flux, scaler.transform(spectra.label_array()),
                            last_layers=1)  # the 7213 x 8 first layer is too big a subset
    path = tmp_path_factory.mktemp("tiny_posterior") / "posterior.npz"
    posterior.save(path)
    return path


@pytest.fixture(autouse=True, scope="session")
def _tensorflow_determinism():
    """Seed and make TensorFlow deterministic once per session, only if a test imported it."""
    yield


def set_seed(seed: int = 0) -> None:
    """Seed Python, numpy and TensorFlow/Keras (imports TensorFlow)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
