"""Smoke tests of the benchmarks: tiny sizes, row format, finite ratios, sound references."""

from __future__ import annotations

import importlib.util
import math
import re

import numpy as np
import pytest

from benchmarks import (
    bench_cholesky,
    bench_jacobian,
    bench_laplace,
    bench_laplace_torch,
    bench_memory,
    bench_shift,
    bench_survey,
    binned_calibration,
)
from benchmarks.run import discover, table
from pipeline.config import validate
from pipeline.spectra.fits import write_spectra

ROW_KEYS = {"benchmark", "value", "baseline", "unit", "ratio", "target", "ok"}
# laplace-torch 0.3 calls torch.jit.script, deprecated in torch 2.13
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def check_rows(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        assert set(r) == ROW_KEYS, r
        assert isinstance(r["benchmark"], str) and r["benchmark"]
        assert r["ok"] in (True, False, None)
        if r["value"] is not None:
            assert math.isfinite(r["value"]), r
        if r["ratio"] is not None:
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
    text = table(rows)
    assert text.count("\n") == len(rows) + 1


def test_each_module_runs_in_a_fresh_interpreter(monkeypatch):
    """The runner's rows come back from a child interpreter (NumPy scalars as plain numbers)
    and what a module sets process-wide stays there: op determinism set in one child is not
    set in the next, nor here."""
    from benchmarks import run as runner

    child = runner._CHILD.replace("from benchmarks.run import module_rows", (
        "import numpy as np, tensorflow as tf\n"
        "from tensorflow.python.framework.config import is_op_determinism_enabled\n"
        "def module_rows(name, quick, given):\n"
        "    was = is_op_determinism_enabled()\n"
        "    tf.config.experimental.enable_op_determinism()\n"
        "    return [{'benchmark': name, 'value': np.float32(2.5), 'ok': np.bool_(not was),"
        " 'quick': quick, **given}]"))
    monkeypatch.setattr(runner, "_CHILD", child)
    rows = [runner.isolated_rows(name, True, {"configfile": "x"}) for name in ("a", "b")]
    assert rows == [[{"benchmark": n, "value": 2.5, "ok": True, "quick": True,
                      "configfile": "x"}] for n in ("a", "b")]


def test_runner_discovers_these_benchmarks():
    names = discover()
    for name in ("bench_cholesky", "bench_jacobian", "bench_memory", "bench_laplace_torch",
                 "bench_shift", "bench_survey"):
        assert name in names


def test_cholesky_rows_and_extrapolation():
    rows = bench_cholesky.run(quick=True, sizes=(60, 120))
    check_rows(rows)
    assert any("scipy" in r["benchmark"] and "n=120" in r["benchmark"] for r in rows)
    last = rows[-1]
    assert "EXTRAPOLATED" in last["benchmark"] and str(bench_cholesky.LAST3) in last["benchmark"]
    scipy_120 = next(r for r in rows if "n=120, scipy" in r["benchmark"])
    # t(37123) = t(120) * (37123 / 120)^3, exactly
    assert last["value"] == pytest.approx(scipy_120["value"] * (37123 / 120) ** 3, rel=1e-12)


def test_posterior_precision_is_spd_and_sized():
    a = bench_cholesky.posterior_precision(50)
    assert a.shape == (50, 50) and np.allclose(a, a.T, rtol=0, atol=1e-14)
    assert np.linalg.eigvalsh(a).min() >= 1.0 - 1e-12  # G >= 0 plus unit prior precision
    assert bench_cholesky.LAST2 == 4227 and bench_cholesky.LAST3 == 37123


def test_jacobian_rows_tiny_model():
    rows = bench_jacobian.run(quick=True, n_pixels=40, hidden=(16, 8), n_stars=48, n_loop=4,
                              batch_sizes=(16,))
    check_rows(rows)
    assert {r["unit"] for r in rows} == {"spectra/s", "s/star", "s", "abs", "rel", "% of stars"}
    xla = [r for r in rows if "XLA" in r["benchmark"]]
    assert len(xla) == 4 and all(r["ok"] is not False for r in xla)  # deterministic, close


def test_per_star_loop_matches_finite_differences():
    """The naive baseline is itself a correct Jacobian (float64 central differences)."""
    import keras

    keras.config.set_floatx("float64")
    try:
        model = bench_jacobian.reference_model(6, (5,), seed=1)
    finally:
        keras.config.set_floatx("float32")
    x = np.random.default_rng(0).random((2, 6)).astype(np.float32)
    jac = bench_jacobian.per_star_loop(model, x)
    w = [np.asarray(v, np.float64) for layer in model.layers
         if isinstance(layer, keras.layers.Dense) for v in layer.get_weights()]
    mean, var = model.get_layer("flux_norm").get_weights()[:2]
    assert np.all(mean == 0) and np.all(var == 1)  # input standardization: identity unadapted

    def f(v):  # the dense ReLU net in float64 numpy
        return np.maximum(v @ w[0] + w[1], 0) @ w[2] + w[3]

    h = 1e-6
    for n in range(2):
        for p in range(6):
            e = np.zeros(6)
            e[p] = h
            fd = (f(x[n] + e) - f(x[n] - e)) / (2 * h)
            np.testing.assert_allclose(jac[n, :, p], fd, rtol=1e-4, atol=1e-5)


def test_peak_rss_sees_a_large_allocation():
    """Both peaks see a 300 MB array held for 0.3 s in the child."""
    small = bench_memory.peak_rss(["-c", "import time; time.sleep(0.3)"])
    large = bench_memory.peak_rss(["-c", "import time, numpy as np; a = np.ones(300 * 2**20 // 8)"
                                   "; time.sleep(0.3)"])
    assert large.rss - small.rss == pytest.approx(300, abs=40)
    assert large.anon - small.anon == pytest.approx(300, abs=40)


def test_closed_form_matches_brute_force():
    rng = np.random.default_rng(3)
    phi, phi_test = rng.standard_normal((30, 4)), rng.standard_normal((5, 4))
    cov = bench_laplace_torch.closed_form_covariance(phi, phi_test, 3)
    # brute force: the full 15-parameter linear model, J_n = I_3 kron [phi_n, 1]
    def jac(v):
        return np.kron(np.eye(3), np.append(v, 1.0)[None])

    s, d = bench_laplace_torch.SIGMA_NOISE, bench_laplace_torch.PRIOR_PRECISION
    precision = sum(jac(v).T @ jac(v) for v in phi) / s**2 + d * np.eye(15)
    want = np.stack([jac(v) @ np.linalg.inv(precision) @ jac(v).T for v in phi_test])
    np.testing.assert_allclose(cov, want, rtol=1e-10, atol=1e-14)


@pytest.mark.skipif(importlib.util.find_spec("laplace") is None, reason="laplace-torch absent")
def test_laplace_torch_matches_closed_form():
    """Our use of laplace-torch (Identity + Linear, fixed hyperparameters) is the exact BLR."""
    model = bench_jacobian.reference_model(10, (6,), seed=2)
    rng = np.random.default_rng(4)
    x = rng.random((40, 10)).astype(np.float32)
    y = rng.standard_normal((40, 3))
    la, _ = bench_laplace_torch.fit_laplace_torch(model, x, y)
    phi = bench_laplace_torch.features(model, x)
    got = bench_laplace_torch.laplace_torch_covariance(la, phi[:7])
    want = bench_laplace_torch.closed_form_covariance(phi, phi[:7], 3)
    assert bench_laplace_torch.relative_difference(got, want) < 1e-10


def test_laplace_torch_rows_or_skip_note():
    rows = bench_laplace_torch.run(quick=True, n_pixels=12, hidden=(8,), n_train=60, n_test=5)
    check_rows(rows)
    if "SKIPPED" in rows[0]["benchmark"]:
        assert rows[0]["ok"] is None
    else:
        assert all(r["ok"] is not False for r in rows), rows


def test_evidence_rows_tiny():
    rows = bench_laplace.bench_evidence(quick=True, n=80, hidden=[12, 8, 4])
    check_rows(rows)
    assert rows[0]["unit"] == "max rel. diff" and rows[0]["ok"] is True, rows[0]
    assert "Cholesky + inverse evaluations" in rows[1]["benchmark"]


@pytest.mark.skipif(importlib.util.find_spec("laplace") is None, reason="laplace-torch absent")
def test_last_two_layer_rows_have_equal_variances():
    rows = bench_laplace_torch.run_last2(quick=True, n_pixels=12, hidden=(10, 8, 6),
                                         n_train=60, n_test=5)
    check_rows(rows)
    assert "SKIPPED" not in rows[0]["benchmark"]
    assert rows[0]["value"] < 1e-10 and rows[0]["ok"] is True  # same posterior, float64
    assert rows[1]["ok"] is None and "at 4096 stars" in rows[1]["target"]  # not judged here


@pytest.mark.slow
def test_predictive_covariance_rows_tiny():
    rows = bench_laplace.bench_predictive(True, hidden=(16, 8), n=64)
    check_rows(rows)
    assert rows[1]["ok"] and rows[1]["value"] < 1e-10  # the two routes agree


def test_memory_rows_tiny(tmp_path):
    rows = bench_memory.run(quick=True, sizes=(20, 200), n_pixels=30, workdir=tmp_path,
                            train_sizes=(20, 200), train_pixels=30)
    check_rows(rows)
    assert rows[0]["unit"] == "MB" and rows[0]["value"] > 50
    assert any("train step" in r["benchmark"] and "streamed" in r["benchmark"] for r in rows)


def shift_catalog(z: np.ndarray, flag: np.ndarray):
    """A prediction catalog whose z values are ``z`` (N, 3): errors 2, truths 10."""
    from astropy.table import Table

    from pipeline import LABELS

    table = Table({"FLAG": flag.astype(np.int32)})
    for j, label in enumerate(LABELS):
        table[label] = 10.0 + 2.0 * z[:, j]
        table[f"{label}_ERR"] = np.full(len(z), 2.0)
        table[f"{label}_TRUE"] = np.full(len(z), 10.0)
    return table


def test_shift_metrics_and_verdict_against_brute_force(rng):
    z = rng.standard_normal((400, 3)) * np.array([1.0, 1.5, 0.5])
    flag = np.where(rng.random(400) < 0.25, 1 << rng.integers(0, 6, 400), 0)
    m = bench_shift.shift_metrics(shift_catalog(z, flag))
    keep = flag == 0
    assert m["flagged"] == pytest.approx(100 * np.mean(flag != 0))
    for j, label in enumerate(("TEFF", "LOGG", "FE_H")):
        zz = z[keep, j]
        assert m[label]["n"] == keep.sum()
        assert m[label]["z_std"] == pytest.approx(np.std(zz, ddof=1), rel=1e-10)
        assert m[label]["z_mean"] == pytest.approx(np.mean(zz), rel=1e-10)
        assert m[label]["coverage"] == pytest.approx(100 * np.mean(np.abs(zz) < 1), rel=1e-10)
    masked = bench_shift.shift_metrics(shift_catalog(z, flag), mask=0b10)
    assert masked["flagged"] == pytest.approx(100 * np.mean(flag & 2 != 0))
    # the verdict: calibrated unflagged stars, or >= 90% flagged
    ok = {"flagged": 10.0, "TEFF": {"z_std": 1.1, "coverage": 64.0}}
    assert bench_shift.verdict(ok, "TEFF")
    assert not bench_shift.verdict({**ok, "TEFF": {"z_std": 1.3, "coverage": 68.0}}, "TEFF")
    assert not bench_shift.verdict({**ok, "TEFF": {"z_std": 1.0, "coverage": 62.0}}, "TEFF")
    assert bench_shift.verdict({"flagged": 90.0, "TEFF": {"z_std": 7.0, "coverage": 5.0}},
                               "TEFF")
    assert not bench_shift.verdict(ok, "TEFF", reference=True)  # > 2% flagged
    assert bench_shift.verdict({"flagged": 2.0, "TEFF": {"z_std": 1.05, "coverage": 70.0}},
                               "TEFF", reference=True)


def test_lines_limit_split_of_the_line_strength_shift(rng):
    """The suite's line-strength set is split at LINES_LIMIT = 0.25 (its change): the share of
    stars below and the flagged share of each group, as counted by hand; a row and a summary
    line for that set only."""
    n = 300
    z, flag = rng.standard_normal((n, 3)), np.where(rng.random(n) < 0.6, 1 << 11, 0)
    table = shift_catalog(z, flag)
    table["LINES_LIMIT"] = rng.uniform(0.0, 0.5, n)
    below = table["LINES_LIMIT"] < 0.25
    m = bench_shift.shift_metrics(table)
    assert m["lines_limit"]["below"] == pytest.approx(100 * below.mean())
    assert m["lines_limit"]["flagged_below"] == pytest.approx(100 * np.mean(flag[below] != 0))
    assert m["lines_limit"]["flagged_above"] == pytest.approx(100 * np.mean(flag[~below] != 0))
    results = {"reference": m, bench_shift.LINES_SET: m}
    rows = [r for r in bench_shift.rows_of(results) if "LINES_LIMIT" in r["benchmark"]]
    assert len(rows) == 1 and rows[0]["benchmark"].startswith("shift lines_x1.25: flagged")
    assert rows[0]["value"] == m["lines_limit"]["flagged_below"]
    assert bench_shift.summary(results).count("LINES_LIMIT is below 0.25") == 1
    none_below = bench_shift.by_lines_limit(np.ones(5), np.zeros(5, bool))
    assert none_below["below"] == 0 and np.isnan(none_below["flagged_below"])


def test_snr_bins_find_the_miscalibrated_bin_and_the_chance_of_missing(rng):
    """Per-SNR-bin calibration: calibrated bins pass, the bin whose errors are 25% too small
    misses, and a cell of 300 calibrated stars misses "within 3 points" about a quarter of
    the time (simulated here), one of 3000 almost never."""
    n = 20000
    snr = rng.uniform(10, 300, n)
    z = rng.standard_normal((n, 3))
    z[snr > 242, 1] *= 1.25  # the top SNR bin of log g: errors too small
    table = shift_catalog(z, np.zeros(n))
    table["SNR"] = snr
    rows = binned_calibration.bin_rows(table, 5)
    assert len(rows) == 15 and all(r["n"] == n // 5 for r in rows)
    missed = {(r["bin"], r["label"]) for r in rows if not r["ok"]}
    assert missed == {("5", "LOGG")}
    top = next(r for r in rows if (r["bin"], r["label"]) == ("5", "LOGG"))
    assert top["z_std"] == pytest.approx(1.25, abs=0.04) and top["range"][0] > 240
    by_label = binned_calibration.bin_rows(table, 5, label_bins=2)  # + 2 bins of each label
    assert len(by_label) == 15 + 3 * 2 * 3
    assert {r["group"] for r in by_label} == {"SNR", "TEFF", "LOGG", "FE_H"}
    draws = rng.standard_normal((4000, 300))
    cover = 100 * (np.abs(draws) < 1).mean(axis=1)
    std = draws.std(axis=1, ddof=1)
    simulated = np.mean((np.abs(cover - 68.27) > 3) | (std < 0.9) | (std > 1.1))
    assert binned_calibration.chance_of_missing(300) == pytest.approx(simulated, abs=0.04)
    assert binned_calibration.chance_of_missing(3000) < 0.01
    assert "cells missing the target: 1 of 15" in binned_calibration.report(rows, 0.5)


def test_binned_calibration_of_an_existing_model(tiny_model_dir, tiny_posterior_file, tmp_path):
    """The command's path: draw, predict with the run's model, bin by SNR."""
    from tests.conftest import REPO

    (tmp_path / "tmp").mkdir()
    rows, flagged = binned_calibration.measure(tiny_model_dir, tiny_posterior_file, 40, 2, 1,
                                               REPO / "config" / "quick.yaml",
                                               workdir=tmp_path / "tmp", keep=tmp_path / "kept")
    assert [r["n"] for r in rows] == [20] * 6 and 0.0 <= flagged <= 100.0
    assert rows[0]["range"][1] <= rows[3]["range"][0]  # bin 1 below bin 2
    assert not list((tmp_path / "tmp").iterdir())  # the temporary directory is gone
    assert (tmp_path / "kept" / "catalogs" / "reference.fits").is_file()  # --keep


@pytest.mark.slow
def test_shift_rows_tiny_model(tmp_path):
    """The whole suite path (data, train, laplace, predict on two shifts) at the smallest size."""
    # 16 units: with 4 every last-hidden unit can die in one epoch (the emulator step refuses)
    sizes = {"n_train": 120, "n_valid": 40, "n_shift": 20, "hidden": [16], "epochs": 1}
    rows = bench_shift.run(sizes=sizes, names=["teff_hot", "spikes"], workdir=tmp_path)
    check_rows(rows)
    names = [r["benchmark"] for r in rows]
    assert len(rows) == 3 * 4 and names[0] == "shift reference: flagged"
    assert any(n.startswith("shift teff_hot TEFF: ") for n in names)
    # unflagged stars only: at most the 20 of a set
    assert all(0 < int(re.search(r"n=(\d+)", n)[1]) <= 20 for n in names if "z std" in n)


def test_shift_rows_of_an_existing_model(tiny_model_dir, tiny_posterior_file, tmp_path):
    """``--model-dir``/``--posterior``: no training, the run's model predicts every set
    (the reference set once, whether named or not; a name repeated, once)."""
    from tests.conftest import REPO

    sizes = {"n_shift": 15}
    rows = bench_shift.run(sizes=sizes, names=["reference", "snr_12", "snr_12"], workdir=tmp_path,
                           model_dir=tiny_model_dir, posterior=tiny_posterior_file,
                           configfile=REPO / "config" / "quick.yaml")
    check_rows(rows)
    assert len(rows) == 2 * 4 and all("n=15" in r["benchmark"] for r in rows[1:4])
    with pytest.raises(ValueError, match="--posterior"):
        bench_shift.run(sizes=sizes, names=["snr_12"], model_dir=tiny_model_dir)
    with pytest.raises(ValueError, match=r"unknown shifts \['snr_5'\]"):
        bench_shift.run(sizes=sizes, names=["snr_5"], model_dir=tiny_model_dir,
                        posterior=tiny_posterior_file)


@pytest.mark.slow
def test_survey_steps_tiny(tmp_path):
    """The survey benchmark's pieces on 40 stars: predict writes a 40-row catalog, both shard
    jobs run, and the in-process budget/Jacobian timing returns positive times (the full
    ``run`` is 6 subprocesses: the rows are checked by ``python -m benchmarks --only survey``)."""
    from astropy.table import Table

    wave = bench_memory.grid(30)
    model_dir, posterior = bench_survey.make_model_and_posterior(tmp_path, wave, (8,))
    predict, shards = bench_survey.step_peaks(tmp_path, 40, wave, model_dir, posterior,
                                              ["--set", "predict.chunk_size=16"])
    catalog = Table.read(tmp_path / "catalogs" / "survey-40.fits", hdu="CATALOG")
    assert len(catalog) == 40 and np.isfinite(catalog["CHI2_LINES"]).all()  # shift statistics
    assert predict.anon > 50 and len(shards) == 2 and all(s.anon > 50 for s in shards)
    times = bench_survey.budget_vs_jacobian(model_dir, posterior, wave, 32, 16, 1)
    assert len(times) == 3 and min(times) > 0
    results = tmp_path / "results"  # a finished run's layout: --ratio-only --results
    for link, target in (("model", model_dir), ("laplace/posterior.npz", posterior)):
        (results / link).parent.mkdir(parents=True, exist_ok=True)
        (results / link).symlink_to(target)
    (results / "data").mkdir()
    write_spectra(results / "data" / "test.fits",
                  bench_survey.generated(20, 6, wave, validate({})))
    rows = bench_survey.trained_ratio_rows(results, 16, batch=8)
    check_rows(rows)
    assert len(rows) == 3 and "16 test stars" in rows[0]["benchmark"]
    assert bench_survey.marginal_rate((10, 30), [3.0, 5.0]) == (10.0, 2.0)
    assert bench_survey.marginal_rate((10, 30), [5.0, 3.0]) == (10.0, 0.0)  # swamped by load
