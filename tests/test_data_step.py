"""The data step: synthetic splits in chunks, fits/apstar splits, bad inputs write nothing."""

import json

import numpy as np
import pytest
from astropy.io import fits

from pipeline.config import validate
from pipeline.exceptions import ConfigError, DataError
from pipeline.random_streams import random_stream
from pipeline.spectra.fits import read_spectra, write_spectra
from pipeline.spectra.synthetic import generate, sample_labels
from pipeline.steps import data as data_step
from tests.conftest import APSTAR_FILE
from tests.test_io import BAD_INPUTS, write_bad

SMALL = {"seed": 9, "data": {"n_train": 23, "n_valid": 7, "n_test": 5,
                             "synthetic": {"chunk_size": 6}}}


def test_explicit_output_paths_are_the_files_written(tmp_path):
    files = {"train": tmp_path / "a" / "tr.fits", "valid": tmp_path / "b" / "va.fits",
             "test": tmp_path / "te.fits"}
    argv = ["--config-json", json.dumps(SMALL)]
    for split, path in files.items():
        argv += [f"--{split}", str(path)]
    assert data_step.main(data_step.build_parser, data_step.run, argv) == 0
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(files.values())
    for split, path in files.items():
        assert read_spectra(path).meta["SPLIT"] == split


def test_a_split_without_an_output_is_a_clear_error(tmp_path, capsys):
    argv = ["--config-json", json.dumps(SMALL), "--train", str(tmp_path / "train.fits")]
    assert data_step.main(data_step.build_parser, data_step.run, argv) == 1
    err = capsys.readouterr().err
    assert "valid, test" in err and "--outdir" in err
    assert not any(tmp_path.iterdir())


def test_synthetic_splits_via_cli(tmp_path):
    outdir = tmp_path / "data"
    assert data_step.main(data_step.build_parser, data_step.run,
                          ["--config-json", json.dumps(SMALL), "--outdir", str(outdir)]) == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["test.fits", "train.fits", "valid.fits"]
    ids = []
    for name, n in (("train", 23), ("valid", 7), ("test", 5)):
        spectra = read_spectra(outdir / f"{name}.fits", require_labels=True)
        assert spectra.flux.shape == (n, 7213)
        assert {"STAR_ID", "TEFF", "LOGG", "FE_H", "SNR"} <= set(spectra.labels.colnames)
        meta = spectra.meta
        assert meta["SOURCE"] == "synthetic" and meta["SPLIT"] == name and meta["SEED"] == "9"
        assert meta["CFGHASH"] and meta["NBADPIX"] == meta["N_BADPIX"] > 0
        ids += list(spectra.star_id)
    assert len(set(ids)) == 35


def test_chunks_equal_one_shot_generation_and_rerun_is_identical(tmp_path):
    cfg = validate(SMALL)
    a = data_step.write_synthetic_split(cfg, "valid", tmp_path / "a.fits")
    b = data_step.write_synthetic_split(cfg, "valid", tmp_path / "b.fits")
    sa, sb = read_spectra(a), read_spectra(b)
    np.testing.assert_array_equal(sa.flux, sb.flux)
    np.testing.assert_array_equal(sa.label_array(), sb.label_array())
    # chunk 1 (rows 6..7) equals generate() with the chunk's seed and the split's labels
    chunk = generate(1, random_stream(9, "noise", 1, 1), cfg,
                     labels=sa.label_array()[6:7], snr=np.asarray(sa.labels["SNR"][6:7]))
    good = chunk.flux_err[0] > 0
    np.testing.assert_array_equal(sa.flux[6, good], chunk.flux[0, good])


def test_label_and_noise_streams_share_no_random_bits(tmp_path):
    # the collision of the former seeds: numpy pads short entropy with zeros
    old_labels, old_noise = np.random.SeedSequence([9, 1]), np.random.SeedSequence([9, 1, 0])
    assert (old_labels.generate_state(8) == old_noise.generate_state(8)).all()
    states = [random_stream(9, "labels", s).generate_state(8) for s in range(3)]
    states += [random_stream(9, "noise", s, c).generate_state(8)
               for s in range(3) for c in range(3)]
    states += [random_stream(9, p).generate_state(8)
               for p in ("split", "label_weights", "strength_misfit")]
    assert len({tuple(x) for x in states}) == len(states)
    # the written split: its labels are not the first draws of its first noise chunk
    cfg = validate(SMALL)
    spectra = read_spectra(data_step.write_synthetic_split(cfg, "valid", tmp_path / "v.fits"),
                           require_labels=True)
    noise_rng = np.random.default_rng(random_stream(9, "noise", 1, 0))
    labels_rng = np.random.default_rng(random_stream(9, "labels", 1))
    n = spectra.n_stars
    np.testing.assert_allclose(spectra.label_array(), sample_labels(n, labels_rng, cfg["data"]),
                               rtol=1e-6)
    assert not np.allclose(spectra.label_array(), sample_labels(n, noise_rng, cfg["data"]))


def test_fits_source_split_is_seeded_and_complete(tmp_path):
    source = generate(40, 1)
    write_spectra(tmp_path / "all.fits", source)
    cfg = validate({"seed": 4, "data": {"source": "fits", "fits": {"path": str(tmp_path /
                                                                          "all.fits")}}})
    paths = data_step.write_datasets(cfg, tmp_path / "out")
    parts = {k: read_spectra(p) for k, p in paths.items()}
    assert [parts[k].n_stars for k in ("train", "valid", "test")] == [28, 6, 6]
    ids = np.concatenate([parts[k].star_id for k in parts])
    assert sorted(ids) == sorted(source.star_id)
    again = data_step.write_datasets(cfg, tmp_path / "again")
    assert list(read_spectra(again["test"]).star_id) == list(parts["test"].star_id)


def test_apstar_source_builds_a_training_set(tmp_path):
    folder = tmp_path / "apstar"
    folder.mkdir()
    rows = ["APOGEE_ID,TEFF,LOGG,FE_H"]
    for i in range(8):
        with fits.open(APSTAR_FILE) as hdul:
            hdul[0].header["OBJID"] = f"2M0000000{i}"
            hdul.writeto(folder / f"apStar-dr17-2M0000000{i}.fits")
        rows.append(f"2M0000000{i},{4500 + 100 * i},{2 + 0.2 * i},{-0.5 + 0.1 * i}")
    (tmp_path / "cat.csv").write_text("\n".join(rows) + "\n")
    cfg = validate({"data": {"source": "apstar", "apstar": {
        "paths": [str(folder)], "catalog": str(tmp_path / "cat.csv")},
        "split": {"valid_fraction": 0.25, "test_fraction": 0.25}}})
    paths = data_step.write_datasets(cfg, tmp_path / "out")
    train = read_spectra(paths["train"], require_labels=True)
    assert train.flux.shape == (4, 7213) and train.meta["SOURCE"] == "apstar"
    good = train.flux_err < cfg["data"]["bad_pixel_err"]
    assert np.percentile(train.flux[good], 75) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize(("edit", "kwargs", "fragments"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_fits_input_errors_and_writes_nothing(tmp_path, edit, kwargs, fragments):
    write_bad(tmp_path / "bad.fits", edit)
    cfg = validate({"data": {"source": "fits", "fits": {"path": str(tmp_path / "bad.fits")}}})
    with pytest.raises(DataError, match="bad.fits"):
        data_step.write_datasets(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_nan_labels_policy_and_zero_variance_write_nothing(tmp_path):
    spectra = generate(20, 2)
    spectra.labels["TEFF"][3] = np.nan
    write_spectra(tmp_path / "nan.fits", spectra)
    cfg = validate({"data": {"source": "fits", "nan_labels": "fail",
                             "fits": {"path": str(tmp_path / "nan.fits")}}})
    with pytest.raises(DataError, match="row 3 has a NaN label"):
        data_step.write_datasets(cfg, tmp_path / "out")
    cfg["data"]["nan_labels"] = "drop"
    assert read_spectra(data_step.write_datasets(cfg, tmp_path / "ok")["train"]).n_stars == 13
    spectra = generate(20, 2)
    spectra.labels["FE_H"] = -0.5
    write_spectra(tmp_path / "flat.fits", spectra)
    cfg["data"]["fits"]["path"] = str(tmp_path / "flat.fits")
    with pytest.raises(DataError, match="'FE_H' has zero variance"):
        data_step.write_datasets(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_source_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.fits.path"):
        data_step.write_datasets(validate({"data": {"source": "fits"}}), tmp_path)
    with pytest.raises(ConfigError, match="data.apstar.paths"):
        data_step.write_datasets(validate({"data": {"source": "apstar"}}), tmp_path)
    write_spectra(tmp_path / "two.fits", generate(2, 0))
    cfg = validate({"data": {"source": "fits", "fits": {"path": str(tmp_path / "two.fits")}}})
    with pytest.raises(DataError, match="cannot be split"):
        data_step.write_datasets(cfg, tmp_path / "out")
