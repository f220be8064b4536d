"""Jacobian shards (streamed = in memory), the Jacobian summary against numpy on the
concatenated shards, and the tables step end to end (calibration.csv, metrics.json)."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.table import Table

from pipeline.artifacts import catalog as export
from pipeline.artifacts.model_dir import write_diagnostics
from pipeline.artifacts.provenance import provenance
from pipeline.cli import main
from pipeline.config import validate
from pipeline.evaluation import calibration
from pipeline.exceptions import DataError
from pipeline.spectra.fits import read_spectra, write_spectra
from pipeline.steps import jacobian, tables

CONFIG = validate({})


@pytest.fixture(scope="module")
def stars_file(tiny_model_dir, tmp_path_factory):
    from pipeline.spectra.synthetic import generate

    spectra = generate(11, 5, wave=np.load(tiny_model_dir / "wave.npy"))
    path = tmp_path_factory.mktemp("jac") / "stars.fits"
    write_spectra(path, spectra)
    return path


def write_random_shards(tmp_path, rng, sizes, n_pix=13):
    wave = np.linspace(15000.0, 16000.0, n_pix)
    arrays, paths = [], []
    for i, n in enumerate(sizes):
        jac = (rng.standard_normal((n, 3, n_pix)) * [[100.0], [0.1], [0.05]]).astype(np.float32)
        path = tmp_path / f"shard-{i}.fits"
        jacobian.write_jacobian_shard(path, iter([jac[:4], jac[4:]]), n,
                                      np.array([f"s{i}-{k}" for k in range(n)]), np.arange(n),
                                      wave, {})
        arrays.append(jac)
        paths.append(path)
    return np.concatenate(arrays), wave, paths


# ------------------------------------------------------------------------- shard step
def test_row_slices_read_what_the_whole_file_holds(stars_file):
    whole = read_spectra(stars_file)
    part = read_spectra(stars_file, rows=slice(3, 7))
    np.testing.assert_array_equal(part.flux, whole.flux[3:7])
    np.testing.assert_array_equal(part.flux_err, whole.flux_err[3:7])
    np.testing.assert_array_equal(part.star_id, whole.star_id[3:7])


def test_shards_stream_the_in_memory_jacobian(tiny_model_dir, stars_file, tmp_path):
    from pipeline.artifacts.model_dir import load_trained
    from pipeline.nn.derivatives import input_jacobian

    n_shards, parts, ids = 3, [], []
    for i in range(n_shards):
        out = tmp_path / f"shard-{i}.fits"
        argv = ["--model", tiny_model_dir, "--shard", i, "--shards", n_shards,
                "--set", "jacobian.batch_size=2", "--set", "jacobian.chunk_size=3",
                "--out", out, stars_file]
        assert main(jacobian.build_parser, jacobian.run, [str(a) for a in argv]) == 0
        with fits.open(out) as hdul:
            parts.append(np.array(hdul["JACOBIAN"].data))
            ids.append(np.array(hdul["STAR_ID"].data["ROW"]))
            assert [hdul["JACOBIAN"].header[f"LABEL{k}"] for k in (1, 2, 3)] == [
                "TEFF", "LOGG", "FE_H"]
            assert hdul["JACOBIAN"].header["LUNIT1"] == "K"
            assert hdul["WAVE"].header["BUNIT"] == "Angstrom"
            assert hdul[0].header["SHARD"] == str(i) and "CFGHASH" in hdul[0].header
    assert [p.shape[0] for p in parts] == [4, 4, 3]  # np.array_split semantics
    np.testing.assert_array_equal(np.concatenate(ids), np.arange(11))
    model, scaler, _ = load_trained(tiny_model_dir)
    spectra = read_spectra(stars_file)
    expected = input_jacobian(model, spectra.flux, batch_size=64, scaler=scaler)
    got = np.concatenate(parts)
    assert got.dtype == np.float32 and got.shape == (11, 3, 7213)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_jacobian_step_holds_one_chunk_at_a_time(tiny_model_dir, stars_file, tmp_path,
                                                 one_chunk_alive):
    argv = ["--model", tiny_model_dir, "--set", "jacobian.batch_size=2",
            "--set", "jacobian.chunk_size=3", "--out", tmp_path / "s.fits", stars_file]
    assert main(jacobian.build_parser, jacobian.run, [str(a) for a in argv]) == 0
    assert one_chunk_alive == [3, 3, 3, 2]


def test_shard_writer_memory_does_not_grow_with_stars(tmp_path):
    batch = np.ones((25, 3, 2000), np.float32)  # 600 kB per batch, 24 MB in all
    n_batches = 40
    tracemalloc.start()
    jacobian.write_jacobian_shard(tmp_path / "big.fits", (batch.copy() for _ in range(n_batches)),
                                  25 * n_batches, np.array(["x"] * 25 * n_batches),
                                  np.arange(25 * n_batches), np.linspace(1, 2, 2000), {})
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * batch.nbytes, peak
    with fits.open(tmp_path / "big.fits", memmap=True) as hdul:
        assert hdul["JACOBIAN"].data.shape == (1000, 3, 2000)


def test_bad_shard_index_fails_without_output(tiny_model_dir, stars_file, tmp_path, capsys):
    out = tmp_path / "shard-5.fits"
    argv = ["--model", tiny_model_dir, "--shard", 5, "--shards", 2, "--out", out, stars_file]
    assert main(jacobian.build_parser, jacobian.run, [str(a) for a in argv]) == 1
    assert "--shard 5" in capsys.readouterr().err
    assert not out.exists()


def test_incomplete_stream_leaves_no_file(tmp_path):
    from pipeline.exceptions import OutputError

    with pytest.raises(OutputError, match="wrote 2 Jacobians for 3"):
        jacobian.write_jacobian_shard(tmp_path / "s.fits", iter([np.ones((2, 3, 5), np.float32)]),
                                      3, np.array(["a", "b", "c"]), np.arange(3),
                                      np.linspace(1, 2, 5), {})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- summary table
def test_jacobian_summary_matches_numpy(tmp_path, rng):
    jac, wave, paths = write_random_shards(tmp_path, rng, [9, 0, 14, 6])
    # a tiny memory bound forces many pixel blocks and star chunks
    summary = tables.jacobian_summary(paths, memory_mb=1000 / 2**20)
    ref = jac.astype(np.float64)
    np.testing.assert_array_equal(summary["PIX"], np.arange(wave.size))
    np.testing.assert_array_equal(summary["WAVE"], wave)
    for k, label in enumerate(("TEFF", "LOGG", "FE_H")):
        np.testing.assert_allclose(summary[f"{label}_MEAN"], ref[:, k].mean(0), rtol=1e-12,
                                   atol=1e-15 * np.abs(ref[:, k]).max())
        np.testing.assert_allclose(summary[f"{label}_MEAN_ABS"], np.abs(ref[:, k]).mean(0),
                                   rtol=1e-12)
        for name, q in (("P16", 16), ("MEDIAN", 50), ("P84", 84)):
            np.testing.assert_allclose(summary[f"{label}_{name}"],
                                       np.percentile(ref[:, k], q, axis=0), rtol=1e-14)


def test_summary_rejects_shards_on_different_grids(tmp_path, rng):
    _, _, paths = write_random_shards(tmp_path, rng, [3])
    jacobian.write_jacobian_shard(tmp_path / "other.fits",
                                  iter([np.ones((2, 3, 13), np.float32)]), 2,
                                  np.array(["a", "b"]), np.arange(2), np.linspace(1, 2, 13), {})
    with pytest.raises(DataError, match="WAVE"):
        tables.jacobian_summary(paths + [tmp_path / "other.fits"], memory_mb=1)


# ------------------------------------------------------------------------ tables step
def fake_catalog(truth, sigma, z, err_factor=1.0):
    """A catalog whose predictions scatter by ``sigma * z`` and claim errors err_factor*sigma."""
    n = truth.shape[0]
    cov = np.zeros((n, 3, 3))
    idx = np.arange(3)
    cov[:, idx, idx] = (err_factor * sigma) ** 2
    budget = {"prediction": truth + sigma * z, "model": cov / 2, "noise": cov / 2,
              "scatter": np.zeros((3, 3)), "total": cov}
    return budget


def test_tables_end_to_end(tmp_path, rng, tiny_model_dir, stars_file):
    from pipeline.spectra.synthetic import cramer_rao_bound, generate

    results = tmp_path / "results"
    wave = np.load(tiny_model_dir / "wave.npy")
    truth_sets = {}
    for name, n, seed in (("valid", 300, 1), ("test", 400, 2)):
        data = generate(n, seed, wave=wave, id_prefix=name)
        write_spectra(results / "data" / f"{name}.fits", data)
        data = read_spectra(results / "data" / f"{name}.fits")
        crb = np.sqrt(np.einsum("nii->ni", cramer_rao_bound(data.label_array(), data.flux_err,
                                                             wave=wave)))
        factor = 1.0 if name == "test" else 2.0
        order = np.arange(n)[::-1]  # catalog rows in another order than the data file
        truth = data.label_array()[order]
        budget = fake_catalog(truth, crb[order], rng.standard_normal((n, 3)), factor)
        table = export.catalog_table(data.star_id[order], budget, np.zeros(n),
                                     true_labels=truth)
        export.write_table(table, results / "predictions" / name, provenance())
        truth_sets[name] = table
    jac_paths = []
    for i in range(2):
        argv = ["--model", tiny_model_dir, "--shard", i, "--shards", 2, "--out",
                results / "jacobians" / "test" / f"shard-{i}.fits", stars_file]
        assert main(jacobian.build_parser, jacobian.run, [str(a) for a in argv]) == 0
        jac_paths.append(results / "jacobians" / "test" / f"shard-{i}.fits")
    diagnostics = write_diagnostics(tmp_path, {
        "n_stars": 300, "layers": [{"name": "dense", "units": 8, "active": 6,
                                    "active_fraction": 0.75},
                                   {"name": "dense_1", "units": 4, "active": 1,
                                    "active_fraction": 0.25}],
        "last_hidden": {"name": "dense_1", "rank": 1, "condition_number": None}})
    argv = ["--predictions", results / "predictions" / "valid.fits",
            results / "predictions" / "test.fits", "--jacobians", *jac_paths,
            "--diagnostics", diagnostics, "--outdir", results / "tables"]
    assert main(tables.build_parser, tables.run, [str(a) for a in argv]) == 0

    everything = pd.read_csv(results / "tables" / "calibration.csv")
    assert list(everything.columns[:3]) == ["CATALOG", "LABEL", "UNIT"]
    cal = everything[everything["GROUP"] == "all"]
    assert list(cal["CATALOG"]) == ["valid"] * 3 + ["test"] * 3
    assert {"Z_MEAN", "Z_STD", "COVERAGE_68.3", "COVERAGE_95.4", "COVERAGE_99.7", "NLL",
            "ENCE", "ERR_OVER_CRB", "SCATTER_OVER_CRB", "CRPS", "BIN", "BIN_LO", "BIN_HI",
            "IN_SAMPLE"} <= set(cal.columns)
    assert list(cal["IN_SAMPLE"]) == [True] * 3 + [False] * 3
    # per catalog and label: 5 SNR bins and 3 terciles of each predicted label, and the bins
    # of a group partition the stars
    for (catalog, group), part in everything.groupby(["CATALOG", "GROUP"]):
        n_bins = {"all": 1, "SNR": 5}.get(group, 3)
        assert len(part) == 3 * n_bins, (catalog, group)
        for label, rows in part.groupby("LABEL"):
            assert rows["N"].sum() == cal[(cal["CATALOG"] == catalog)
                                          & (cal["LABEL"] == label)]["N"].item()
    terciles = everything[(everything["GROUP"] == "TEFF") & (everything["CATALOG"] == "test")]
    assert np.all(terciles["BIN_LO"].to_numpy()[3:] >= terciles["BIN_HI"].to_numpy()[:-3])
    test_rows, valid_rows = cal[cal["CATALOG"] == "test"], cal[cal["CATALOG"] == "valid"]
    np.testing.assert_allclose(test_rows["ERR_OVER_CRB"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(valid_rows["ERR_OVER_CRB"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(cal["SCATTER_OVER_CRB"], 1.0, atol=0.2)
    np.testing.assert_allclose(test_rows["Z_STD"], 1.0, atol=0.15)
    np.testing.assert_allclose(valid_rows["Z_STD"], 0.5, atol=0.08)

    metrics = json.loads((results / "tables" / "metrics.json").read_text())
    assert metrics["catalog"] == "test" and metrics["n_stars"] == 400
    test = truth_sets["test"]
    for label in ("TEFF", "LOGG", "FE_H"):
        expected = calibration.accuracy_metrics(test[label], test[f"{label}_TRUE"])
        for key, value in expected.items():
            assert metrics["labels"][label][key] == pytest.approx(value, rel=1e-12)
    network = metrics["network"]
    assert network["active_fraction"] == {"dense": 0.75, "dense_1": 0.25}
    assert network["min_active_fraction"] == 0.25 and network["half_units_active"] is False
    assert network["last_hidden"]["rank"] == 1
    summary = Table.read(results / "tables" / "jacobian_summary.fits", hdu="JACOBIAN_SUMMARY")
    assert len(summary) == wave.size and summary["WAVE"].unit == "Angstrom"
    for ext in ("parquet", "csv"):
        assert (results / "tables" / f"jacobian_summary.{ext}").is_file()
