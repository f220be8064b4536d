"""Dead units and feature conditioning after training, against float64 numpy references."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from pipeline.artifacts.model_dir import read_diagnostics, write_diagnostics
from pipeline.exceptions import ModelFileError
from pipeline.nn.diagnostics import log_diagnostics, network_health, unit_diagnostics
from tests.conftest import set_seed


def model_with_dead_units():
    """10 -> 6 (relu, units 1 and 4 dead) -> 4 (relu, unit 2 dead, unit 3 = 2 x unit 0) -> 3."""
    set_seed(4)
    inp = keras.Input((10,))
    h1 = keras.layers.Dense(6, "relu", name="dense_0")(inp)
    h2 = keras.layers.Dense(4, "relu", name="dense_1")(h1)
    model = keras.Model(inp, keras.layers.Dense(3, name="labels")(h2))
    rng = np.random.default_rng(0)
    k1, b1 = rng.normal(0, 0.5, (10, 6)), np.full(6, 0.5)
    b1[[1, 4]] = -100.0  # never reached by inputs in [0, 1]
    k2, b2 = rng.normal(0, 0.5, (6, 4)), np.full(4, 0.2)
    k2[:, :2] = np.abs(k2[:, :2])  # units 0 and 1 fire for every input
    b2[2] = -100.0
    k2[:, 3], b2[3] = 2 * k2[:, 0], 2 * b2[0]  # a duplicate unit: rank-deficient features
    model.get_layer("dense_0").set_weights([k1.astype("f4"), b1.astype("f4")])
    model.get_layer("dense_1").set_weights([k2.astype("f4"), b2.astype("f4")])
    return model, (k1, b1, k2, b2)


def test_active_fractions_and_condition_numbers_match_numpy():
    model, (k1, b1, k2, b2) = model_with_dead_units()
    x = np.random.default_rng(1).uniform(0, 1, (50, 10))
    diag = unit_diagnostics(model, x, batch_size=16)  # 4 batches, the last one short
    a1 = np.maximum(x @ k1 + b1, 0)
    a2 = np.maximum(a1 @ k2 + b2, 0)
    fractions = [la["active_fraction"] for la in diag["layers"]]
    np.testing.assert_allclose(fractions, [(a1 > 0).any(0).mean(), (a2 > 0).any(0).mean()])
    assert fractions == [4 / 6, 3 / 4]
    last = diag["last_hidden"]
    assert last["name"] == "dense_1" and last["active"] == 3
    assert last["rank"] == 2  # unit 2 dead, unit 3 a multiple of unit 0
    assert last["condition_number"] is None  # singular: s_min = 0
    # the active units still hold the duplicate: float32 features make s_min tiny or 0
    assert last["condition_number_active"] is None or last["condition_number_active"] > 1e5
    # without the duplicate the conditioning is what numpy finds for the float64 features
    model.get_layer("dense_1").set_weights([(k2 + np.eye(6, 4) * 0.3).astype("f4"),
                                            b2.astype("f4")])
    a2 = np.maximum(a1 @ (k2 + np.eye(6, 4) * 0.3) + b2, 0)
    s = np.linalg.svd(a2[:, (a2 > 0).any(0)], compute_uv=False)
    got = unit_diagnostics(model, x)["last_hidden"]["condition_number_active"]
    np.testing.assert_allclose(got, s[0] / s[-1], rtol=1e-4)


def test_diagnostics_file_round_trip(tmp_path):
    doc = {"n_stars": 3, "layers": [{"name": "dense_0", "active_fraction": 0.5}],
           "last_hidden": {"condition_number": float("inf"), "rank": np.int64(2)},
           "refit": None}
    path = write_diagnostics(tmp_path, doc)
    assert path.name == "diagnostics.json"
    on_disk = json.loads(path.read_text())  # strict JSON: no Infinity
    assert on_disk["last_hidden"] == {"condition_number": None, "rank": 2}
    assert read_diagnostics(tmp_path) == on_disk == read_diagnostics(path)
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ModelFileError, match="do not exist"):
        read_diagnostics(tmp_path / "nowhere")
    path.write_text("{broken")
    with pytest.raises(ModelFileError, match="not readable JSON"):
        read_diagnostics(tmp_path)


def test_health_summary_and_warning_for_a_mostly_dead_layer(caplog):
    diag = {"n_stars": 10, "layers": [
        {"name": "a", "units": 4, "active": 2, "active_fraction": 0.5},
        {"name": "b", "units": 4, "active": 1, "active_fraction": 0.25}],
        "last_hidden": {"name": "b", "units": 4, "active": 1, "rank": 1,
                        "condition_number": None, "condition_number_active": 1.0}}
    health = network_health(diag)
    assert health["min_active_fraction"] == 0.25 and health["half_units_active"] is False
    assert network_health({**diag, "layers": diag["layers"][:1]})["half_units_active"] is True
    assert network_health({"n_stars": 0, "layers": []})["half_units_active"] is None
    with caplog.at_level("WARNING", logger="pipeline.nn.diagnostics"):
        log_diagnostics(diag)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith("layer b:")
