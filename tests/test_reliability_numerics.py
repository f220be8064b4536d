"""Reliability under numerical trouble (issue 9).

* A non-finite loss or weights during training stop with NumericalError and keep the last good
  checkpoint: tests/test_train.py::test_nonfinite_values_keep_last_good_checkpoint (not
  repeated here).
* A posterior precision that is not positive definite gets the smallest geometric jitter that
  works, with a logged report, or fails naming laplace.jitter_max (below).
* An indefinite exact Hessian through the laplace step: reported and clipped, or a clear error
  with laplace.indefinite: fail.
* Spectra far outside the training set are flagged, not silently given small errors. Networks
  map such spectra back inside the training label range (so FLAG bit 0, which looks at the
  predicted labels, stays clear); their *model* error is what betrays them: FLAG bit 4.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.exceptions import NumericalError
from pipeline.laplace.posterior import cholesky_with_jitter


# ------------------------------------------------------------------- not positive definite
def test_jitter_is_the_smallest_geometric_step_and_is_reported(caplog, rng):
    g = rng.normal(size=(6, 3))
    scale = np.mean(np.diag(g @ g.T))
    a = g @ g.T - 3e-6 * scale * np.eye(6)  # slightly indefinite: needs jitter 1e-5 x scale
    caplog.set_level(logging.WARNING, logger="pipeline.laplace")
    chol, added = cholesky_with_jitter(a, jitter_initial=1e-12, jitter_max=1e-2,
                                       jitter_factor=10.0)
    a_scale = np.mean(np.diag(a))
    assert added == pytest.approx(1e-5 * a_scale, rel=1e-9)
    assert _cholesky_fails(a + 1e-6 * a_scale * np.eye(6))  # the step before was too small
    np.testing.assert_allclose(chol @ chol.T, a + added * np.eye(6), rtol=0,
                               atol=1e-12 * a_scale)
    assert "not positive definite: added jitter" in caplog.text


def _cholesky_fails(a) -> bool:
    import scipy.linalg as sl

    try:
        sl.cholesky(a, lower=True)
    except sl.LinAlgError:
        return True
    return False


def test_negative_definite_precision_fails_naming_the_key():
    with pytest.raises(NumericalError, match="laplace.jitter_max"):
        cholesky_with_jitter(-np.eye(4), jitter_initial=1e-10, jitter_max=1e-2)


def _toy_problem(rng, n=600):
    """A small tanh network trained on toy spectra of 4000-6000 K stars, with its scaler."""
    import keras

    from pipeline.nn.scaler import LabelScaler
    from tests.conftest import set_seed
    from tests.test_laplace import toy_spectra

    set_seed(5)
    teff = rng.uniform(4000, 6000, n)
    labels = np.stack([teff, 2.5 + (teff - 5000) / 1000, rng.normal(0, 0.3, n)], 1)
    flux = toy_spectra(teff, rng)
    scaler = LabelScaler().fit(labels)
    model = keras.Sequential([keras.Input((40,)), keras.layers.Dense(16, "tanh"),
                              keras.layers.Dense(8, "tanh"), keras.layers.Dense(3)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(flux, scaler.transform(labels), epochs=60, batch_size=64, verbose=0)
    return model, scaler, flux, labels


def test_spectra_far_outside_the_training_set_are_flagged(rng):
    from pipeline.artifacts import catalog as export
    from pipeline.evaluation.flags import model_error_ratio, star_flags
    from pipeline.laplace import fit_laplace
    from tests.test_laplace import toy_spectra

    model, scaler, flux, labels = _toy_problem(rng)
    post = fit_laplace(model, flux, scaler.transform(labels), last_layers=2, device="cpu")
    cfg = {"ood_sigma": 4.0, "flag_bad_pixel_fraction": 0.1, "ood_model_factor": 3.0}
    flags = {}
    for name, teff in (("inside", rng.uniform(4500, 5500, 50)), ("far", np.full(50, 9000.0))):
        x = toy_spectra(teff, rng)
        model_cov = scaler.covariance_to_physical(post.predictive_covariance(x))
        prediction = scaler.inverse_transform(model.predict(x, verbose=0))
        ratio = model_error_ratio(model_cov, scaler, post)
        flags[name] = star_flags(prediction, model_cov, np.zeros(50), False, scaler, cfg, ratio)
    far = (flags["far"] & (export.FLAG_MODEL_OOD | export.FLAG_OOD)) != 0
    inside = (flags["inside"] & export.FLAG_MODEL_OOD) != 0
    assert far.mean() > 0.9, "stars at 9000 K must be flagged"
    assert inside.mean() < 0.05, "stars inside the training range must not be flagged"


@pytest.mark.parametrize("action", ["fail", "clip"])
def test_indefinite_hessian_through_the_laplace_step(tmp_path, rng, action, capsys):
    """An untrained network has large residuals: its exact loss Hessian is indefinite."""
    import json

    import keras
    from astropy.table import Table

    from pipeline.artifacts.model_dir import MODEL_FILE, SCALER_FILE, WAVE_FILE
    from pipeline.cli import main
    from pipeline.laplace import Posterior
    from pipeline.nn.scaler import LabelScaler
    from pipeline.spectra.dataset import Spectra
    from pipeline.spectra.fits import write_spectra
    from pipeline.steps.laplace import build_parser, run
    from tests.conftest import set_seed
    from tests.test_laplace import toy_spectra

    set_seed(3)
    wave = np.linspace(15100.0, 16900.0, 40)
    files = {}
    for split, n in (("train", 80), ("valid", 30)):
        teff = rng.uniform(4000, 6000, n)
        table = Table({"STAR_ID": [f"{split}{i}" for i in range(n)], "TEFF": teff,
                       "LOGG": rng.uniform(1, 4, n), "FE_H": rng.normal(0, 0.3, n)})
        flux = toy_spectra(teff, rng)
        files[split] = tmp_path / f"{split}.fits"
        write_spectra(files[split], Spectra(flux, np.full_like(flux, 0.01), wave, table))
    model = keras.Sequential([keras.Input((40,)), keras.layers.Dense(6, "tanh"),
                              keras.layers.Dense(5, "tanh"), keras.layers.Dense(3)])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model.save(model_dir / MODEL_FILE)
    LabelScaler().fit(np.stack([teff, rng.normal(2.5, 1, 30), rng.normal(0, .3, 30)], 1)).save(
        model_dir / SCALER_FILE)
    np.save(model_dir / WAVE_FILE, wave)
    out = tmp_path / "posterior.npz"
    # no emulator file here: the scatter model without the emulator offset
    cfg = {"laplace": {"curvature": "hessian", "indefinite": action, "device": "cpu",
                       "scatter_emulator": False}}
    argv = ["--config-json", json.dumps(cfg), "--model", str(model_dir), "--train",
            str(files["train"]), "--valid", str(files["valid"]), "--out", str(out)]
    code = main(build_parser, run, argv)
    if action == "fail":
        assert code == 1
        assert "indefinite" in capsys.readouterr().err
        assert not out.exists()
    else:
        assert code == 0
        saved = keras.models.load_model(model_dir / MODEL_FILE)
        report = Posterior.load(out, saved).info["curvature_report"]
        assert report["indefinite"] == "clip" and report["n_negative"] > 0


def test_a_head_reaching_the_wide_input_layer_is_a_config_error(rng):
    import keras

    from pipeline.exceptions import ConfigError
    from pipeline.laplace import fit_laplace

    model = keras.Sequential([keras.Input((300,)), keras.layers.Dense(8, "relu"),
                              keras.layers.Dense(3)])
    x, y = rng.normal(size=(20, 300)).astype("float32"), rng.normal(size=(20, 3))
    with pytest.raises(ConfigError, match=r"laplace\.last_layers.*2435 weights"):
        fit_laplace(model, x, y, last_layers=2, max_weights=1000, device="cpu")
