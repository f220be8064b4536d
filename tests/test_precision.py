"""The precision table: ridge and kernel ridge baselines against brute-force float64 solves,
the validation choice of their hyperparameters, the per-SNR-bin rows, and precision.csv
written by the tables step with explicit output paths."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

from pipeline.artifacts import catalog as export
from pipeline.artifacts.provenance import provenance
from pipeline.cli import main
from pipeline.config import validate
from pipeline.evaluation import calibration
from pipeline.evaluation import precision as pr
from pipeline.spectra.fits import read_spectra, write_spectra
from pipeline.spectra.synthetic import apogee_grid, cramer_rao_bound, generate
from pipeline.steps import tables
from tests.test_tables import fake_catalog, write_random_shards

ALPHAS = [1e-4, 1e-2, 1.0, 100.0]


def linear_data(rng, n, p, noise=0.3):
    """Flux around 1 whose first pixels depend linearly on three labels, plus noise."""
    X = 1.0 + 0.1 * rng.standard_normal((n, p))
    beta = rng.standard_normal((p, 3))
    Y = (X - 1.0) @ beta + noise * rng.standard_normal((n, 3))
    Y = Y * [500.0, 0.5, 0.2] + [5000.0, 3.0, -0.3]
    return X.astype(np.float32), Y


def brute_ridge(X, Y, Xv, Yv, alphas):
    """Normal equations by np.linalg.solve in float64, for every alpha."""
    X, Xv = np.asarray(X, np.float64), np.asarray(Xv, np.float64)
    x0 = X.mean(0)
    Xc = X - x0
    m, s = Y.mean(0), Y.std(0)
    Ys, Yvs = (Y - m) / s, (Yv - m) / s
    lam0 = np.trace(Xc.T @ Xc) / X.shape[1]
    out = []
    for alpha in alphas:
        W = np.linalg.solve(Xc.T @ Xc + alpha * lam0 * np.eye(X.shape[1]), Xc.T @ Ys)
        out.append((W, np.mean(((Xv - x0) @ W - Yvs) ** 2, axis=0), alpha * lam0))
    return out, x0, m, s


@pytest.mark.parametrize("n, p", [(60, 25), (30, 70)])  # primal (P <= N) and dual (P > N)
def test_ridge_equals_normal_equations_and_picks_the_validation_minimizer(rng, n, p):
    X, Y = linear_data(rng, n, p)
    Xv, Yv = linear_data(rng, 40, p)
    fit = pr.fit_ridge(X, Y, Xv, Yv, ALPHAS, chunk=7)  # blocks smaller than N: streamed
    ref, x0, m, s = brute_ridge(X, Y, Xv, Yv, ALPHAS)
    errors = np.array([e for _, e, _ in ref])
    np.testing.assert_allclose(fit.valid_mse, errors, rtol=1e-8)
    best = errors.argmin(0)
    np.testing.assert_array_equal(fit.alpha, np.asarray(ALPHAS)[best])
    for k in range(3):
        W, _, lam = ref[best[k]]
        np.testing.assert_allclose(fit.weights[:, k], W[:, k], rtol=1e-8,
                                   atol=1e-10 * np.abs(W[:, k]).max())
        assert fit.lam[k] == pytest.approx(lam, rel=1e-12)
    np.testing.assert_allclose(fit.x_mean, x0, rtol=1e-12)
    Xt, _ = linear_data(rng, 9, p)
    expected = m + s * ((Xt.astype(np.float64) - x0) @ fit.weights)
    np.testing.assert_allclose(fit.predict(Xt, chunk=4), expected, rtol=1e-10)


@pytest.mark.parametrize("dual", [False, True])
def test_gram_streams_the_exact_float64_product(rng, dual):
    X = rng.standard_normal((23, 11)).astype(np.float32)
    mean = X.astype(np.float64).mean(0)
    Y = rng.standard_normal((23, 3))
    G, xty = pr.gram(X, mean, Y, dual=dual, chunk=5)
    Xc = X.astype(np.float64) - mean
    np.testing.assert_allclose(G, Xc @ Xc.T if dual else Xc.T @ Xc, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(G, G.T)
    if not dual:
        np.testing.assert_allclose(xty, Xc.T @ Y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pr.ridge_weights(Xc, Y, 0.5),
                               np.linalg.solve(Xc.T @ Xc + 0.5 * np.eye(11), Xc.T @ Y),
                               rtol=1e-10)


def test_ridge_holds_no_float64_copy_of_the_flux(rng):
    """12000 x 7213 float32 flux would be 0.7 GB in float64: the fit holds the Gram matrix
    and one block of rows, not a converted copy of X."""
    X, Y = linear_data(rng, 6000, 60)
    Xv, Yv = X[:100], Y[:100]
    tracemalloc.start()
    pr.fit_ridge(X, Y, Xv, Yv, [1e-2, 1.0], chunk=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.25 * X.size * 8, peak  # float64 X: 2.9 MB


def test_kernel_ridge_equals_the_explicit_solve(rng):
    X, Y = linear_data(rng, 80, 12, noise=0.05)
    Y[:, 0] += 300.0 * np.sin(10.0 * (X[:, 0] - 1.0))  # something nonlinear
    Xv, Yv = linear_data(rng, 30, 12, noise=0.05)
    Xt, _ = linear_data(rng, 11, 12)
    factors, alphas = [0.5, 1.0, 2.0], [1e-3, 1e-1]
    fit = pr.fit_kernel_ridge(X, Y, Xv, Yv, factors, alphas, max_stars=50, seed=3, chunk=16)
    rows = np.sort(np.random.default_rng(3).choice(80, 50, replace=False))
    np.testing.assert_array_equal(fit.rows, rows)
    Xs = X[rows].astype(np.float64)
    m, s = Y[rows].mean(0), Y[rows].std(0)
    Ys, Yvs = (Y[rows] - m) / s, (Yv - m) / s
    D = cdist(Xs, Xs, "sqeuclidean")
    l0 = np.sqrt(np.median(D[np.triu_indices(50, 1)]))
    assert fit.median_length == pytest.approx(l0, rel=1e-10)
    errors, coefs = np.empty((3, 2, 3)), {}
    for i, f in enumerate(factors):
        K = np.exp(-D / (2 * (f * l0) ** 2))
        Kv = np.exp(-cdist(Xv.astype(np.float64), Xs, "sqeuclidean") / (2 * (f * l0) ** 2))
        for a, alpha in enumerate(alphas):
            coefs[i, a] = np.linalg.solve(K + alpha * np.eye(50), Ys)
            errors[i, a] = np.mean((Kv @ coefs[i, a] - Yvs) ** 2, axis=0)
    np.testing.assert_allclose(fit.valid_mse, errors, rtol=1e-7)
    expected = np.empty((11, 3))
    for k in range(3):
        i, a = np.unravel_index(errors[:, :, k].argmin(), errors.shape[:2])
        assert fit.length[k] == pytest.approx(factors[i] * l0, rel=1e-12)
        assert fit.alpha[k] == alphas[a]
        Kt = np.exp(-cdist(Xt.astype(np.float64), Xs, "sqeuclidean")
                    / (2 * (factors[i] * l0) ** 2))
        expected[:, k] = m[k] + s[k] * (Kt @ coefs[i, a][:, k])
    np.testing.assert_allclose(fit.predict(Xt, chunk=4), expected, rtol=1e-7)
    assert fit.n_train == 50


def test_selection_ignores_failed_fits_and_warns_on_the_edge(caplog):
    errors = np.array([[np.nan, 3.0], [1.0, 2.0], [2.0, 1.0]])
    assert list(pr.select(errors, "x")) == [1, 2]
    assert "LOGG lies on the edge of the alpha grid" in caplog.text and "TEFF" not in caplog.text
    caplog.clear()
    grid = np.array([[3.0], [2.0], [1.0], [0.5]])  # (length, alpha) grid 2 x 2, flattened
    assert list(pr.select(grid, "k", (2, 2), ("length factor", "alpha"))) == [3]
    assert "edge of the length factor and alpha grid" in caplog.text


def test_precision_rows_bin_by_snr_and_match_accuracy_metrics(rng):
    n = 103
    truth = rng.standard_normal((n, 3))
    snr = rng.uniform(20, 300, n)
    nn = truth + rng.standard_normal((n, 3)) * 0.1
    ridge = truth + rng.standard_normal((n, 3)) * 0.3
    crb = np.full((n, 3), 0.05)
    rows = pr.precision_rows(truth, {"NN": nn, "RIDGE": ridge}, snr=snr, crb=crb, n_bins=4,
                             extra={"LOGG": {"RIDGE_ALPHA": 0.1}})
    assert [r["BIN"] for r in rows[:5]] == ["all", "1", "2", "3", "4"] and len(rows) == 15
    order = np.argsort(snr)
    for r in rows:
        k = ("TEFF", "LOGG", "FE_H").index(r["LABEL"])
        idx = np.arange(n) if r["BIN"] == "all" else np.array_split(order, 4)[int(r["BIN"]) - 1]
        assert r["N"] == idx.size
        assert (r["SNR_MIN"], r["SNR_MAX"]) == (snr[idx].min(), snr[idx].max())
        for name, pred in (("NN", nn), ("RIDGE", ridge)):
            ref = calibration.accuracy_metrics(pred[idx, k], truth[idx, k])
            assert r[f"{name}_RMSE"] == pytest.approx(ref["rmse"])
            assert r[f"{name}_SCATTER"] == pytest.approx(ref["robust_scatter"])
            assert r[f"{name}_SCATTER_OVER_CRB"] == pytest.approx(ref["robust_scatter"] / 0.05)
        assert r["CRB_MEDIAN"] == 0.05
        assert ("RIDGE_ALPHA" in r) == (r["LABEL"] == "LOGG")
    # no SNR: the row over all stars only; no CRB: no CRB columns
    rows = pr.precision_rows(truth, {"NN": nn}, snr=None, crb=None, n_bins=4)
    assert [r["BIN"] for r in rows] == ["all"] * 3 and "CRB_MEDIAN" not in rows[0]


# ------------------------------------------------------------------------ tables step
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Synthetic train / valid / test datasets on a 300-pixel slice of the grid, and a fake
    network catalog of the test stars (in reverse order) scattering by twice the CRB."""
    root = tmp_path_factory.mktemp("precision") / "results"
    wave = apogee_grid()[2000:2300]
    for name, n, seed in (("train", 400, 1), ("valid", 150, 2), ("test", 120, 3)):
        write_spectra(root / "data" / f"{name}.fits", generate(n, seed, wave=wave,
                                                                id_prefix=name))
    data = read_spectra(root / "data" / "test.fits")
    crb = np.sqrt(np.einsum("nii->ni", cramer_rao_bound(data.label_array(), data.flux_err,
                                                         wave=wave)))
    order = np.arange(120)[::-1]
    z = np.random.default_rng(5).standard_normal((120, 3))
    budget = fake_catalog(data.label_array()[order], 2.0 * crb[order], z)
    table = export.catalog_table(data.star_id[order], budget, np.zeros(120),
                                 true_labels=data.label_array()[order],
                                 snr=np.asarray(data.labels["SNR"])[order])
    export.write_table(table, root / "predictions" / "test", provenance())
    _, _, shards = write_random_shards(root, np.random.default_rng(0), [5, 4])
    return root, shards


SETTINGS = ["--set", "tables.baselines.kernel_stars=300", "--set", "tables.snr_bins=3",
            "--set", "tables.baselines.chunk_size=64"]


def test_tables_step_writes_precision_to_explicit_paths(results, tmp_path):
    root, shards = results
    out = tmp_path / "elsewhere"
    argv = ["--predictions", root / "predictions" / "test.fits", "--jacobians", *shards,
            "--data", root / "data" / "test.fits", "--train", root / "data" / "train.fits",
            "--valid", root / "data" / "valid.fits", "--summary", out / "sum",
            "--calibration", out / "cal.csv", "--metrics", out / "m.json",
            "--precision", out / "prec.csv", *SETTINGS]
    assert main(tables.build_parser, tables.run, [str(a) for a in argv]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "cal.csv", "m.json", "prec.csv", "sum.csv", "sum.fits", "sum.parquet"]
    table = pd.read_csv(out / "prec.csv")
    assert list(table["LABEL"]) == ["TEFF"] * 4 + ["LOGG"] * 4 + ["FE_H"] * 4
    assert list(table["BIN"][:4]) == ["all", "1", "2", "3"]
    assert (table["CATALOG"] == "test").all() and (table["KRR_N_TRAIN"] == 300).all()
    assert table.loc[table["BIN"] == "all", "N"].eq(120).all()
    for col in ("NN_RMSE", "NN_SCATTER", "RIDGE_RMSE", "RIDGE_SCATTER", "KRR_RMSE",
                "KRR_SCATTER", "CRB_MEDIAN", "NN_SCATTER_OVER_CRB", "RIDGE_ALPHA",
                "KRR_ALPHA", "KRR_LENGTH_SCALE"):
        assert np.isfinite(table[col]).all(), col
    # the fake network scatters by twice each star's CRB
    np.testing.assert_allclose(table.loc[table["BIN"] == "all", "NN_SCATTER_OVER_CRB"], 2.0,
                               rtol=0.25)
    # the baselines' numbers are the library's, fitted on the same splits
    train = read_spectra(root / "data" / "train.fits", require_labels=True)
    valid = read_spectra(root / "data" / "valid.fits", require_labels=True)
    test = read_spectra(root / "data" / "test.fits")
    ridge = pr.fit_ridge(train.flux, train.label_array(), valid.flux, valid.label_array(),
                         validate({})["tables"]["baselines"]["ridge_alphas"], chunk=64)
    pred = ridge.predict(test.flux)
    for k, label in enumerate(("TEFF", "LOGG", "FE_H")):
        row = table[(table["LABEL"] == label) & (table["BIN"] == "all")].iloc[0]
        ref = calibration.accuracy_metrics(pred[:, k], test.label_array()[:, k])
        assert row["RIDGE_RMSE"] == pytest.approx(ref["rmse"], rel=1e-6)
        assert row["RIDGE_ALPHA"] == ridge.alpha[k]


def test_tables_step_defaults_to_outdir_and_finds_the_splits(results, tmp_path):
    root, shards = results
    argv = ["--predictions", root / "predictions" / "test.fits", "--jacobians", *shards,
            "--outdir", tmp_path, *SETTINGS, "--set", "tables.baselines.kernel_alphas=[0.01]"]
    assert main(tables.build_parser, tables.run, [str(a) for a in argv]) == 0
    table = pd.read_csv(tmp_path / "precision.csv")
    assert np.isfinite(table["KRR_RMSE"]).all()  # train/valid found beside the catalogs
    assert (table["KRR_ALPHA"] == 0.01).all()
    for name in ("calibration.csv", "metrics.json", "jacobian_summary.fits"):
        assert (tmp_path / name).is_file()


def test_tables_step_without_baselines_or_outputs(results, tmp_path, capsys):
    root, shards = results
    base = ["--predictions", root / "predictions" / "test.fits", "--jacobians", *shards]
    argv = [*base, "--outdir", tmp_path, "--set", "tables.baselines.enabled=false"]
    assert main(tables.build_parser, tables.run, [str(a) for a in argv]) == 0
    table = pd.read_csv(tmp_path / "precision.csv")
    assert "RIDGE_RMSE" not in table.columns and np.isfinite(table["NN_RMSE"]).all()
    argv = [*base, "--calibration", tmp_path / "c.csv"]
    assert main(tables.build_parser, tables.run, [str(a) for a in argv]) == 1
    assert "--summary or --outdir" in capsys.readouterr().err
