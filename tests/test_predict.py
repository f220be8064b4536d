"""The predict step: flags, catalog names, bad pixels, end to end on FITS and apStar inputs,
and clear failures (missing model or posterior, grid that does not cover) with no outputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from astropy.table import Table

from pipeline.artifacts import catalog as export
from pipeline.artifacts.catalog import FLAG_BITS
from pipeline.artifacts.model_dir import load_trained
from pipeline.cli import main
from pipeline.config import validate
from pipeline.evaluation.flags import star_flags
from pipeline.exceptions import ConfigError
from pipeline.nn.scaler import LabelScaler
from pipeline.spectra.dataset import Spectra
from pipeline.spectra.fits import write_spectra
from pipeline.steps import predict
from tests.conftest import APSTAR_FILE, REPO

CONFIG = validate({})


class StandInPosterior:
    """Fixed epistemic covariance and scatter (standardized units)."""

    noise_std = np.array([0.1, 0.2, 0.3])
    cov = np.array([[0.04, 0.01, 0.0], [0.01, 0.09, 0.02], [0.0, 0.02, 0.01]])

    def predictive_covariance(self, x):
        return np.broadcast_to(self.cov, (len(x), 3, 3)).copy()


@pytest.fixture
def posterior(monkeypatch):
    monkeypatch.setattr(predict.Posterior, "load",
                        classmethod(lambda cls, path, model: StandInPosterior()))
    return StandInPosterior()


@pytest.fixture(scope="module")
def stars(tiny_model_dir, tmp_path_factory):
    from pipeline.spectra.synthetic import generate

    wave = np.load(tiny_model_dir / "wave.npy")
    spectra = generate(12, 99, wave=wave)
    path = tmp_path_factory.mktemp("inputs") / "stars.fits"
    write_spectra(path, spectra)
    return path, spectra


def run_predict(args):
    return main(predict.build_parser, predict.run, [str(a) for a in args])


# --------------------------------------------------------------------------------- units
def _unit_scaler() -> LabelScaler:
    """Standardization by 1 around 0; training labels spanned [-1, 1]."""
    scaler = LabelScaler(mean=np.zeros(3), scale=np.ones(3))
    scaler.label_min, scaler.label_max = -np.ones(3), np.ones(3)
    return scaler


FLAG_CFG = dict(CONFIG["predict"], ood_sigma=4.0, flag_bad_pixel_fraction=0.1,
                ood_model_factor=3.0)


SHIFT_THRESHOLDS = {"CHI2_EMULATOR_REL": 2.0, "FEATURE_DISTANCE": 1.5, "CHI2_BROADBAND_REL": 4.0,
                    "CHI2_PEAK_REL": 3.0, "CHI2_DOPPLER_REL": 5.0, "CHI2_LSF_REL": 6.0,
                    "CHI2_LINES_REL": 7.0}


def _one_star(prediction=(4.9, 0.0, -4.9), total=None, bad_fraction=0.1, resampled=False,
              model_ratio=3.0, chi2_rel=2.0, feature_distance=1.5, broadband_rel=4.0,
              peak_rel=3.0, doppler_rel=5.0, lsf_rel=6.0, lines_rel=7.0):
    """star_flags of one star; the defaults sit just inside every threshold of FLAG_CFG
    (4 sigma around the training range [-1, 1], bad-pixel fraction 0.1, model-error ratio 3)
    and of SHIFT_THRESHOLDS."""
    scaler = _unit_scaler()
    total = np.eye(3) if total is None else total
    ratio = None if model_ratio is None else np.array([model_ratio], float)
    shift = {"CHI2_EMULATOR_REL": np.array([chi2_rel]),
             "FEATURE_DISTANCE": np.array([feature_distance]),
             "CHI2_BROADBAND_REL": np.array([broadband_rel]),
             "CHI2_PEAK_REL": np.array([peak_rel]),
             "CHI2_DOPPLER_REL": np.array([doppler_rel]), "CHI2_LSF_REL": np.array([lsf_rel]),
             "CHI2_LINES_REL": np.array([lines_rel])}
    flags = star_flags(np.array([prediction], float), np.array([total], float),
                       np.array([bad_fraction], float), resampled, scaler, FLAG_CFG, ratio,
                       shift, SHIFT_THRESHOLDS)
    assert flags.dtype == np.int32 and flags.shape == (1,)
    return int(flags[0])


def _inf_variance():
    total = np.eye(3)
    total[1, 1] = np.inf
    return total


# Each FLAG bit's causes, by the name FLAG_BITS documents; every cause changes one input of
# a star that is just inside every threshold.
FLAG_CAUSES = {
    "OOD": [{"prediction": (5.1, 0.0, 0.0)}, {"prediction": (0.0, 0.0, -5.1)}],
    "BADPIX": [{"bad_fraction": 0.11}],
    "RESAMPLED": [{"resampled": True}],
    "NONFINITE": [{"prediction": (np.nan, 0.0, 0.0)}, {"total": _inf_variance()}],
    "MODEL_OOD": [{"model_ratio": 3.1}],
    "SPECTRUM_OOD": [{"chi2_rel": 2.01}],
    "FEATURE_OOD": [{"feature_distance": 1.51}],
    "BROADBAND_OOD": [{"broadband_rel": 4.01}],
    "PEAK_OOD": [{"peak_rel": 3.01}],
    "DOPPLER_OOD": [{"doppler_rel": 5.01}],
    "LSF_OOD": [{"lsf_rel": 6.01}],
    "LINES_OOD": [{"lines_rel": 7.01}],
}


def test_flag_causes_cover_every_documented_bit():
    names = {bit: text.split(":")[0] for bit, text in FLAG_BITS.items()}
    assert sorted(FLAG_CAUSES) == sorted(names.values()), "a FLAG bit has no test cause"
    for bit, name in names.items():
        assert getattr(export, f"FLAG_{name}") == 1 << bit, name


@pytest.mark.parametrize("name", sorted(FLAG_CAUSES))
def test_each_flag_bit_is_set_by_its_own_cause_alone(name):
    assert _one_star() == 0  # just inside every threshold: no flag
    for cause in FLAG_CAUSES[name]:
        assert _one_star(**cause) == getattr(export, f"FLAG_{name}"), cause


def test_flag_bits_combine_and_rows_are_independent():
    every = dict(prediction=(5.1, 0.0, 0.0), total=_inf_variance(), bad_fraction=0.5,
                 resampled=True, model_ratio=10.0, chi2_rel=9.0, feature_distance=9.0,
                 broadband_rel=9.0, peak_rel=9.0, doppler_rel=9.0, lsf_rel=9.0,
                 lines_rel=9.0)
    all_bits = sum(1 << bit for bit in FLAG_BITS)
    assert _one_star(**every) == all_bits
    # no posterior reference (model_ratio None, older files): bit 4 is never set
    assert _one_star(model_ratio=None) == 0
    assert _one_star(**dict(every, model_ratio=None)) == all_bits - export.FLAG_MODEL_OOD
    # several stars at once: each row gets its own flags only
    scaler = _unit_scaler()
    pred = np.array([[0, 0, 0], [5.1, 0, 0], [0, 0, -4.9], [0, 0, 0], [np.nan, 0, 0],
                     [0, 0, 0]], float)
    total = np.broadcast_to(np.eye(3), (6, 3, 3)).copy()
    total[3, 1, 1] = np.inf
    bad_fraction = np.array([0.0, 0.0, 0.2, 0.05, 0.0, 0.0])
    ratio = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 4.0])
    shift = {"CHI2_EMULATOR_REL": np.array([3.0, 0, 0, 0, 0, 0]),
             "FEATURE_DISTANCE": np.array([0, 0, 0, 0, 0, 2.0]),
             "CHI2_BROADBAND_REL": np.array([0, 0, 0, 0, np.nan, 5.0]),
             "CHI2_PEAK_REL": np.array([np.nan, 0, 0, 0, 0, 0]),
             "CHI2_DOPPLER_REL": np.zeros(6), "CHI2_LSF_REL": np.zeros(6),
             "CHI2_LINES_REL": np.zeros(6)}
    flags = star_flags(pred, total, bad_fraction, False, scaler, FLAG_CFG, ratio, shift,
                       SHIFT_THRESHOLDS)
    assert flags.tolist() == [export.FLAG_SPECTRUM_OOD, export.FLAG_OOD, export.FLAG_BADPIX,
                              export.FLAG_NONFINITE, export.FLAG_NONFINITE,
                              export.FLAG_MODEL_OOD | export.FLAG_FEATURE_OOD
                              | export.FLAG_BROADBAND_OOD]


def test_flag_without_stored_range_uses_mean():
    scaler = LabelScaler(mean=np.array([5000.0, 3.0, 0.0]), scale=np.array([500.0, 1.0, 0.3]))
    sigma = CONFIG["predict"]["ood_sigma"]
    pred = np.array([[5000 + 0.9 * sigma * 500, 3, 0], [5000 + 1.1 * sigma * 500, 3, 0]])
    flags = star_flags(pred, np.ones((2, 3, 3)), np.zeros(2), False, scaler,
                       CONFIG["predict"])
    assert flags.tolist() == [0, export.FLAG_OOD]


def test_catalog_names():
    assert predict.catalog_names(["a/x.fits", "b/y.fits"], None) == ["x", "y"]
    assert predict.catalog_names(["a/x.fits"], "mine") == ["mine"]
    with pytest.raises(ConfigError, match="--name"):
        predict.catalog_names(["a/x.fits", "b/y.fits"], "mine")
    with pytest.raises(ConfigError, match="duplicate"):
        predict.catalog_names(["a/x.fits", "b/x.fits"], None)


def test_bad_pixels_carry_no_flux_noise(tiny_model_dir, stars):
    model, scaler, wave = load_trained(tiny_model_dir)
    _, spectra = stars
    sub = spectra.subset(np.arange(2))
    clean = Spectra(sub.flux.copy(), sub.flux_err.copy(), wave, sub.labels)
    clean.flux_err[clean.flux_err <= 0] = 0.01
    broken = Spectra(clean.flux.copy(), clean.flux_err.copy(), wave, sub.labels)
    broken.flux_err[0, 100:400] = CONFIG["data"]["bad_pixel_err"]  # 300 bad pixels
    zeroed = Spectra(clean.flux.copy(), clean.flux_err.copy(), wave, sub.labels)
    zeroed.flux_err[0, 100:400] = 0.0
    tables = [predict.predict_catalog(model, StandInPosterior(), scaler, s, False, CONFIG)
              for s in (broken, zeroed, clean)]
    np.testing.assert_allclose(tables[0]["TEFF_ERR_NOISE"], tables[1]["TEFF_ERR_NOISE"],
                               rtol=1e-6)
    assert tables[0]["TEFF_ERR_NOISE"][0] < tables[2]["TEFF_ERR_NOISE"][0]
    assert tables[0]["FLAG"].tolist()[1] == 0 and tables[0]["FLAG"][0] == 0  # 300/7213 < 0.1


# ---------------------------------------------------------------------------- end to end
def test_predict_fits_end_to_end(tiny_model_dir, stars, posterior, tmp_path):
    path, spectra = stars
    out = tmp_path / "pred"
    assert run_predict(["--model", tiny_model_dir, "--posterior", tmp_path / "p.npz",
                        "--format", "fits", "--out", out, path]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["stars.csv", "stars.fits", "stars.parquet"]
    table = Table.read(out / "stars.fits", hdu="CATALOG")
    assert len(table) == 12 and list(table["STAR_ID"]) == list(spectra.star_id)
    assert {"TEFF_TRUE", "SNR", "FLAG", "LOGG_FE_H_CORR"} <= set(table.colnames)
    np.testing.assert_allclose(table["LOGG_TRUE"], spectra.label_array()[:, 1])
    assert not np.any(table["FLAG"] & export.FLAG_RESAMPLED)
    scatter = StandInPosterior.noise_std * LabelScaler.load(tiny_model_dir / "scaler.json").scale
    np.testing.assert_allclose(table["FE_H_ERR_SCATTER"], scatter[2], rtol=1e-12)


def test_predict_streams_chunks_with_the_one_chunk_result(tiny_model_dir, stars, posterior,
                                                          tmp_path):
    """predict.chunk_size 5, rounded to 4 (chunks 4 + 4 + 4), writes the same catalog, bit for
    bit, as one chunk of all 12 stars: the error budget and flags are per star, and the
    network sees the same batches of 4."""
    path = stars[0]
    assert predict.chunk_stars({"chunk_size": 5, "batch_size": 4}) == 4
    assert predict.chunk_stars({"chunk_size": 3, "batch_size": 4}) == 4
    for chunk in (5, 100):
        assert run_predict(["--model", tiny_model_dir, "--posterior", tmp_path / "p.npz",
                            "--set", f"predict.chunk_size={chunk}", "--set",
                            "predict.batch_size=4", "--format", "fits",
                            "--name", f"c{chunk}", "--out", tmp_path, path]) == 0
    chunked, whole = (Table.read(tmp_path / f"c{c}.fits", hdu="CATALOG") for c in (5, 100))
    assert chunked.colnames == whole.colnames and len(chunked) == 12
    for name in whole.colnames:
        np.testing.assert_array_equal(chunked[name], whole[name], err_msg=name)
        assert chunked[name].unit == whole[name].unit
        assert chunked[name].description == whole[name].description


def test_predict_holds_one_chunk_at_a_time(tiny_model_dir, stars, posterior, tmp_path,
                                           one_chunk_alive):
    assert run_predict(["--model", tiny_model_dir, "--posterior", tmp_path / "p.npz",
                        "--set", "predict.chunk_size=4", "--set", "predict.batch_size=4",
                        "--format", "fits", "--out", tmp_path, stars[0]]) == 0
    assert one_chunk_alive == [4, 4, 4]


def test_predict_resamples_other_grid_and_flags_it(tiny_model_dir, stars, posterior,
                                                   tmp_path):
    _, spectra = stars
    wave = spectra.wave
    wave_in = np.exp(np.linspace(np.log(wave[0]) - 1e-4, np.log(wave[-1]) + 1e-4, 9000))
    flux = np.stack([np.interp(wave_in, wave, f) for f in spectra.flux]).astype(np.float32)
    other = Spectra(flux, np.full_like(flux, 0.01), wave_in, spectra.labels)
    write_spectra(tmp_path / "other.fits", other)
    assert run_predict(["--model", tiny_model_dir, "--posterior", "p.npz", "--name", "o",
                        "--out", tmp_path / "pred", tmp_path / "other.fits"]) == 0
    table = Table.read(tmp_path / "pred" / "o.fits", hdu="CATALOG")
    assert np.all(table["FLAG"] & export.FLAG_RESAMPLED)


def test_grid_not_covering_fails_without_output(tiny_model_dir, stars, posterior, tmp_path,
                                                capsys):
    _, spectra = stars
    short = Spectra(spectra.flux[:, 50:], spectra.flux_err[:, 50:], spectra.wave[50:],
                    spectra.labels)
    write_spectra(tmp_path / "short.fits", short)
    out = tmp_path / "pred"
    assert run_predict(["--model", tiny_model_dir, "--posterior", "p.npz", "--out", out,
                        tmp_path / "short.fits"]) == 1
    assert "does not cover" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("missing", ["model", "posterior"])
def test_missing_model_or_posterior_exits_nonzero(stars, tiny_model_dir, tmp_path, missing):
    path, _ = stars
    model = tmp_path / "nomodel" if missing == "model" else tiny_model_dir
    post = tmp_path / "none.npz"
    out = tmp_path / "pred"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", "--model", str(model), "--posterior",
         str(post), "--format", "fits", "--out", str(out), str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1
    assert f"error: {missing}" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("fmt", [["--format", "apstar"], []], ids=["named", "detected"])
def test_predict_real_apstar(tiny_model_dir, posterior, tmp_path, fmt):
    out = tmp_path / "pred"
    assert run_predict(["--model", tiny_model_dir, "--posterior", "p.npz", *fmt,
                        "--out", out, APSTAR_FILE]) == 0
    table = Table.read(out / f"{APSTAR_FILE.stem}.fits", hdu="CATALOG")
    assert len(table) == 1 and "2M19485057+5005279" in table["STAR_ID"][0]
    assert np.all(np.isfinite([table[c][0] for c in ("TEFF", "TEFF_ERR", "FE_H_ERR_NOISE")]))
    assert table["TEFF_ERR_NOISE"][0] > 0


# ------------------------------------------------------------- with the real Laplace posterior
@pytest.fixture(scope="module")
def posterior_file(tiny_model_dir, stars, tmp_path_factory):
    import pipeline.laplace.posterior as laplace
    from pipeline.artifacts.model_dir import load_trained
    from pipeline.spectra.fits import read_spectra

    model, scaler, _ = load_trained(tiny_model_dir)
    spectra = read_spectra(stars[0])
    posterior = laplace.fit_laplace(model, spectra.flux, scaler.transform(spectra.label_array()),
                                    last_layers=1)  # the tiny model: 2 layers would reach the input
    path = tmp_path_factory.mktemp("laplace") / "posterior.npz"
    posterior.save(path)
    return path


def test_predict_cli_with_real_posterior(tiny_model_dir, stars, posterior_file, tmp_path):
    out = tmp_path / "pred"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", "--model", str(tiny_model_dir),
         "--posterior", str(posterior_file), "--out", str(out), str(stars[0])],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = Table.read(out / "stars.fits", hdu="CATALOG")
    assert np.all(table["TEFF_ERR_MODEL"] > 0) and np.all(np.isfinite(table["TEFF_ERR"]))


def test_posterior_of_another_model_fails(tiny_model_dir, stars, posterior_file, tmp_path):
    import shutil

    from pipeline.nn.model import build_model

    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    build_model(7213, {"type": "dense", "hidden": [5]}, seed=1).save(other / "model.keras")
    out = tmp_path / "pred"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", "--model", str(other), "--posterior",
         str(posterior_file), "--out", str(out), str(stars[0])],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


# ------------------------------------------------------------------ format detection
def test_formats_are_detected_by_content_and_anything_else_is_named(stars, tmp_path):
    from astropy.io import fits

    from pipeline.exceptions import DataError
    from pipeline.spectra.inputs import detect_format

    path, _ = stars
    renamed = tmp_path / "apStar-looks-like-one.fits"  # the name does not decide
    renamed.write_bytes(path.read_bytes())
    assert detect_format(path) == detect_format(renamed) == "fits"
    assert detect_format(APSTAR_FILE) == "apstar"
    assert detect_format(APSTAR_FILE.parent) == "apstar"  # a directory of apStar files
    odd = tmp_path / "odd.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((2, 5)), name="SPEC")]).writeto(odd)
    with pytest.raises(DataError, match=r"odd.fits' is neither.*found HDUs.*SPEC \(2, 5\)"):
        detect_format(odd)
    (tmp_path / "notes.txt").write_text("not FITS")
    with pytest.raises(DataError, match="notes.txt' is not a readable FITS"):
        detect_format(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no apStar"):
        detect_format(tmp_path / "empty")
