"""Configuration: defaults filled from the schema, typos and bad values rejected by key."""

import pytest

from pipeline.config import config_hash, load_config, validate
from pipeline.exceptions import ConfigError
from tests.conftest import REPO


def test_defaults_filled_recursively():
    cfg = validate({})
    assert cfg["train"]["learning_rate"] == pytest.approx(8e-4)
    assert cfg["model"]["hidden"] == [2048, 1024, 512, 256, 128, 32]
    assert cfg["train"]["early_stopping"]["enabled"] is True
    assert cfg["laplace"]["last_layers"] == 2


@pytest.mark.parametrize("name", ["config.yaml", "quick.yaml", "paper.yaml", "dwarfs.yaml"])
def test_shipped_configs_validate(name):
    path = REPO / "config" / name
    if not path.exists():
        pytest.skip(f"{name} not shipped yet")
    load_config(path)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("laplace.curvature=fisher", "laplace.curvature"),
        ("train.batch_size=-3", "train.batch_size"),
        ("train.epochs=ten", "train.epochs"),
        ("laplace.lastlayers=2", "laplace"),
        ("data.source=hdf5", "data.source"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(REPO / "config" / "quick.yaml", overrides=[override])


def test_hash_is_stable_and_sensitive():
    a = validate({"seed": 1})
    assert config_hash(a) == config_hash(validate({"seed": 1}))
    assert config_hash(a) != config_hash(validate({"seed": 2}))


def test_string_overrides_coerced_to_schema_types():
    from pipeline.config import coerce_types

    cfg = coerce_types({"jacobian": {"shards": "5"}, "train": {"learning_rate": "1e-3"},
                        "data": {"synthetic": {"teff_range": ["4000", "6000"]}}})
    cfg = validate(cfg)
    assert cfg["jacobian"]["shards"] == 5
    assert cfg["train"]["learning_rate"] == pytest.approx(1e-3)
    assert cfg["data"]["synthetic"]["teff_range"] == [4000, 6000]


def test_dwarfs_config_is_the_dwarf_box():
    cfg = load_config(REPO / "config" / "dwarfs.yaml")
    data, syn = cfg["data"], cfg["data"]["synthetic"]
    assert (data["n_train"], data["n_valid"], data["n_test"]) == (4200, 900, 900)
    assert (syn["snr_min"], syn["snr_max"]) == (40, 200)
    assert syn["teff_range"] == [4340, 6860] and syn["logg_range"] == [4.05, 4.94]
    assert syn["feh_range"] == [-0.73, 0.32]
    import numpy as np

    from pipeline.spectra.synthetic import sample_labels

    labels = sample_labels(5000, np.random.default_rng(0), cfg)
    for j, (lo, hi) in enumerate((syn["teff_range"], syn["logg_range"], syn["feh_range"])):
        assert lo <= labels[:, j].min() and labels[:, j].max() <= hi
        assert np.ptp(labels[:, j]) > 0.5 * (hi - lo)  # the box is filled, not one corner
