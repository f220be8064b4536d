"""Architectures against float64 numpy forward passes; the label scaler; load_trained.

References are written independently of the code under test: a numpy MLP and 1-D convolution,
erf-based GELU, brute-force loops for the covariance and Jacobian conversions.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from scipy.special import erf

from pipeline.artifacts.model_dir import load_trained
from pipeline.config import validate
from pipeline.exceptions import ConfigError, DataError, ModelFileError
from pipeline.nn.model import build_model
from pipeline.nn.scaler import LabelScaler

NUMPY_ACTIVATIONS = {
    "relu": lambda a: np.maximum(a, 0.0),
    "gelu": lambda a: 0.5 * a * (1.0 + erf(a / np.sqrt(2.0))),
    "softplus": lambda a: np.logaddexp(0.0, a),
    "tanh": np.tanh,
}


def model_cfg(**kw) -> dict:
    return validate({"model": kw})["model"]


def dense_layers(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]


def numpy_head(h, model, act):
    """Dense layers in float64: h W + b with ``act`` on all but the last."""
    layers = dense_layers(model)
    for i, layer in enumerate(layers):
        kernel, bias = (w.astype(np.float64) for w in layer.get_weights())
        h = h @ kernel + bias
        if i < len(layers) - 1:
            h = act(h)
    return h


# ------------------------------------------------------------------------------ architectures
def test_reference_network_size_and_layers():
    model = build_model(7213, model_cfg(), seed=0)
    widths = [7213, 2048, 1024, 512, 256, 128, 32, 3]
    expected = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == expected == 17_565_699  # the reference network: 17.6 M
    layers = dense_layers(model)
    assert [layer.units for layer in layers] == widths[1:]
    assert all(type(layer) is keras.layers.Dense for layer in layers)  # the Laplace subset
    assert [layer.activation.__name__ for layer in layers] == ["relu"] * 6 + ["linear"]
    assert model.input_shape == (None, 7213) and model.output_shape == (None, 3)


@pytest.mark.parametrize("activation", ["relu", "gelu", "softplus", "tanh"])
def test_dense_forward_matches_numpy(activation, rng):
    model = build_model(30, model_cfg(hidden=[20, 10], activation=activation), seed=3)
    x = rng.normal(1.0, 0.3, (7, 30))
    expected = numpy_head(x, model, NUMPY_ACTIVATIONS[activation])
    got = model(x.astype(np.float32)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_cnn_forward_matches_numpy(rng):
    cfg = model_cfg(type="cnn", hidden=[6], activation="gelu",
                    cnn={"filters": [2, 3], "kernel_size": 5, "pool_size": 4})
    p = 26
    model = build_model(p, cfg, seed=1)
    x = rng.normal(1.0, 0.3, (4, p))
    act = NUMPY_ACTIVATIONS["gelu"]
    h = x[:, :, None]
    for name, k in (("conv_0", 5), ("conv_1", 5)):
        kernel, bias = (w.astype(np.float64) for w in model.get_layer(name).get_weights())
        padded = np.pad(h, ((0, 0), ((k - 1) // 2, k // 2), (0, 0)))  # keras 'same' padding
        out = np.zeros(h.shape[:2] + (kernel.shape[2],))
        for i in range(k):  # brute-force correlation over kernel taps
            out += np.einsum("npc,cf->npf", padded[:, i:i + p, :], kernel[i])
        h = act(out + bias)
    n_pool = -(-p // 4)
    extra = 4 * n_pool - p  # keras 'same' pooling pads floor(extra / 2) in front
    padded = np.pad(h, ((0, 0), (extra // 2, extra - extra // 2), (0, 0)),
                    constant_values=-np.inf)
    h = padded.reshape(4, n_pool, 4, -1).max(axis=2).reshape(4, -1)
    expected = numpy_head(h, model, act)
    np.testing.assert_allclose(model(x.astype(np.float32)).numpy(), expected, rtol=1e-4,
                               atol=1e-5)
    assert [layer.name for layer in dense_layers(model)] == ["dense_0", "labels"]


def test_initializer_is_seeded_and_scaled():
    a = build_model(2000, model_cfg(hidden=[500, 8]), seed=4)
    b = build_model(2000, model_cfg(hidden=[500, 8]), seed=4)
    c = build_model(2000, model_cfg(hidden=[500, 8]), seed=5)
    assert all(np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights(),
                                                    strict=True))
    first = lambda m: m.get_layer("dense_0").kernel.numpy()  # noqa: E731
    assert not np.array_equal(first(a), first(c))
    # he_normal: truncated normal with standard deviation sqrt(2 / fan_in); 1e6 draws.
    np.testing.assert_allclose(first(a).std(), np.sqrt(2 / 2000), rtol=5e-3)
    glorot = build_model(2000, model_cfg(hidden=[500, 8], initializer="glorot_uniform"), 4)
    np.testing.assert_allclose(first(glorot).std(), np.sqrt(2 / 2500), rtol=5e-3)


def test_unknown_choices_are_config_errors():
    with pytest.raises(ConfigError, match="model.activation.*valid choices: relu"):
        build_model(10, {"activation": "rleu"}, seed=0)
    with pytest.raises(ConfigError, match="model.activation"):
        validate({"model": {"activation": "rleu"}})
    with pytest.raises(ConfigError, match="model.type"):
        build_model(10, {"type": "transformer"}, seed=0)


# ----------------------------------------------------------------------- input normalization
def test_flux_statistics_match_numpy_and_guard_constant_pixels(rng):
    from pipeline.nn.model import flux_statistics

    flux = rng.normal(1.0, 0.05, (1000, 9)).astype(np.float32)
    flux[:, 3] = 1.0  # bad in every training star
    flux[:, 5] = 0.7
    mean, var = flux_statistics(flux, chunk_size=300)  # 4 chunks, the last one short
    ref = flux.astype(np.float64)
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-13)
    expected = ((ref - ref.mean(0)) ** 2).mean(0)
    expected[[3, 5]] = 1.0
    np.testing.assert_allclose(var, expected, rtol=1e-11)
    from pipeline.nn.model import input_statistics

    mean_g, var_g = input_statistics(flux, "global")
    np.testing.assert_array_equal(mean_g, mean)
    varying = np.ones(9, bool)
    varying[[3, 5]] = False  # constant pixels do not enter the common divisor
    np.testing.assert_allclose(var_g, np.full(9, expected[varying].mean()), rtol=1e-11)
    np.testing.assert_allclose(input_statistics(flux, "pixel")[1], expected, rtol=1e-11)


@pytest.mark.parametrize("kind", ["dense", "cnn"])
def test_input_normalization_layer_standardizes_and_survives_copies(kind, rng, tmp_path):
    from pipeline.nn.model import flux_statistics, refresh_normalization, set_input_normalization

    p = 24
    cfg = model_cfg(type=kind, hidden=[6], cnn={"filters": [2], "kernel_size": 3},
                    input_normalization=True)
    train = rng.normal(0.9, 0.1, (200, p)).astype(np.float32) * np.linspace(0.2, 3, p)
    train[:, 7] = 1.0  # constant pixel
    mean, var = flux_statistics(train)
    model = build_model(p, cfg, seed=1)
    assert model.layers[1].name == "flux_norm"
    assert set_input_normalization(model, mean, var)
    x = rng.normal(0.9, 0.1, (5, p)).astype(np.float32)
    x[:, 7] = 0.5
    norm = keras.Model(model.inputs[0], model.get_layer("flux_norm").output)
    expected = (x.astype(np.float64) - mean) / np.sqrt(var)
    np.testing.assert_allclose(norm(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.isclose(norm(x).numpy()[0, 7], -0.5, atol=1e-6)  # centred, not divided by ~0
    # The inference copy of write_outputs: a fresh build + set_weights (+ refresh).
    copy = build_model(p, cfg, seed=1)
    copy.set_weights(model.get_weights())
    refresh_normalization(copy)
    np.testing.assert_array_equal(copy(x).numpy(), model(x).numpy())
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    off = build_model(p, model_cfg(type=kind, hidden=[6], input_normalization=False), seed=1)
    assert "flux_norm" not in [layer.name for layer in off.layers]
    assert not set_input_normalization(off, mean, var)


# ------------------------------------------------------------------------------ label scaler
@pytest.fixture
def labels(rng):
    return np.column_stack([rng.normal(5000, 600, 200), rng.normal(3, 1, 200),
                            rng.normal(-0.5, 0.4, 200)])


def test_scaler_fit_transform_round_trip(labels):
    scaler = LabelScaler().fit(labels)
    assert scaler.mean.dtype == scaler.scale.dtype == np.float64
    np.testing.assert_allclose(scaler.mean, labels.sum(0) / len(labels), rtol=1e-14)
    brute = np.sqrt(((labels - labels.mean(0)) ** 2).mean(0))
    np.testing.assert_allclose(scaler.scale, brute, rtol=1e-13)
    z = scaler.transform(labels)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-13)
    np.testing.assert_allclose(z.std(0), 1, rtol=1e-13)
    np.testing.assert_allclose(scaler.inverse_transform(z), labels, rtol=1e-14)


def test_scaler_covariance_and_jacobian_to_physical(labels, rng):
    scaler = LabelScaler().fit(labels)
    a = rng.normal(size=(5, 3, 3))
    cov = a @ a.transpose(0, 2, 1)
    jac = rng.normal(size=(5, 3, 11))
    want_cov, want_jac = np.empty_like(cov), np.empty_like(jac)
    for n in range(5):
        for i in range(3):
            want_jac[n, i] = scaler.scale[i] * jac[n, i]
            for j in range(3):
                want_cov[n, i, j] = cov[n, i, j] * scaler.scale[i] * scaler.scale[j]
    np.testing.assert_allclose(scaler.covariance_to_physical(cov), want_cov, rtol=1e-15)
    np.testing.assert_allclose(scaler.jacobian_to_physical(jac), want_jac, rtol=1e-15)
    # Cov of y = S z is S Cov(z) S, by sampling the linear map exactly
    z = rng.multivariate_normal(np.zeros(3), cov[0], size=4000)
    y = scaler.inverse_transform(z)
    np.testing.assert_allclose(np.cov(y.T), scaler.covariance_to_physical(np.cov(z.T)),
                               rtol=1e-10)
    as32 = scaler.jacobian_to_physical(jac.astype(np.float32))
    assert as32.dtype == np.float32
    np.testing.assert_allclose(as32, want_jac, rtol=1e-6)


def test_scaler_save_load_exact(labels, tmp_path):
    scaler = LabelScaler().fit(labels)
    scaler.save(tmp_path / "scaler.json", provenance={"SEED": "1"})
    back = LabelScaler.load(tmp_path / "scaler.json")
    np.testing.assert_array_equal(back.mean, scaler.mean)
    np.testing.assert_array_equal(back.scale, scaler.scale)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"mean": [1, 2, 3]}),
                                     json.dumps({"labels": ["TEFF", "LOGG", "FE_H"],
                                                 "mean": [1, 2], "scale": [1, 2]}),
                                     json.dumps({"labels": ["TEFF", "LOGG", "FE_H"],
                                                 "mean": [1, 2, 3], "scale": [1, 0, 2]})])
def test_scaler_load_errors(tmp_path, content):
    with pytest.raises(ModelFileError, match="missing.json.*does not exist.*rerun the train"):
        LabelScaler.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ModelFileError, match="bad.json.*corrupt.*rerun the train step"):
        LabelScaler.load(tmp_path / "bad.json")


def test_scaler_rejects_constant_and_nan_labels(labels):
    flat = labels.copy()
    flat[:, 2] = -0.3
    with pytest.raises(DataError, match="FE_H.*constant"):
        LabelScaler().fit(flat)
    labels[17, 1] = np.nan
    with pytest.raises(DataError, match="LOGG.*row 17"):
        LabelScaler().fit(labels)


# ------------------------------------------------------------------------------ load_trained
@pytest.fixture
def model_dir(tmp_path, labels):
    model = build_model(12, model_cfg(hidden=[8]), seed=2)
    model.save(tmp_path / "model.keras")
    LabelScaler().fit(labels).save(tmp_path / "scaler.json")
    np.save(tmp_path / "wave.npy", np.linspace(15000, 16000, 12))
    return tmp_path, model


def test_load_trained_round_trip(model_dir, rng):
    path, model = model_dir
    loaded, scaler, wave = load_trained(path)
    x = rng.normal(1, 0.1, (3, 12)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    assert wave.shape == (12,) and scaler.scale.shape == (3,)


@pytest.mark.parametrize("name", ["model.keras", "scaler.json", "wave.npy"])
def test_load_trained_missing_or_corrupt(model_dir, name):
    path, _ = model_dir
    (path / name).unlink()
    with pytest.raises(ModelFileError, match=f"{name}.*does not exist.*rerun the train step"):
        load_trained(path)
    (path / name).write_bytes(b"garbage")
    with pytest.raises(ModelFileError, match=f"{name}.*rerun the train step"):
        load_trained(path)


def test_load_trained_grid_mismatch(model_dir):
    path, _ = model_dir
    np.save(path / "wave.npy", np.linspace(15000, 16000, 13))
    with pytest.raises(ModelFileError, match="12 pixels.*13 pixels"):
        load_trained(path)
