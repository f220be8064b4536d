"""The figures step: every paper figure from a small results tree written by the pipeline's
own writers (datasets, history, a posterior fitted and saved by Posterior.save, catalogs and
summary through write_table, Jacobian shards through write_jacobian_shard), plus the numerics
behind the figures checked against brute force and closed forms."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.table import Table
from scipy.stats import norm

from pipeline import LABELS
from pipeline.artifacts.catalog import write_table
from pipeline.artifacts.jacobian_shards import write_jacobian_shard
from pipeline.config import validate
from pipeline.exceptions import DataError, ModelFileError
from pipeline.laplace import Posterior
from pipeline.plots.inputs import FigureInputs
from pipeline.spectra.dataset import Spectra
from pipeline.spectra.fits import write_spectra

N_STARS = 60
FIGURE_NAMES = ("spectra_examples", "training_curves", "laplace_diagnostics", "pred_vs_true",
                "residuals_vs_snr", "calibration", "error_budget", "jacobian_mean",
                "jacobian_map")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def small_grid() -> np.ndarray:
    """A log-linear grid of three chips with gaps, like the APOGEE one but 360 pixels."""
    log_w = 4.179 + 6e-6 * np.r_[np.arange(322, 442), np.arange(3648, 3768), np.arange(6412,
                                                                                       6532)]
    return 10.0**log_w


def linear_flux(labels: np.ndarray, wave: np.ndarray):
    """Flux exactly linear in the labels: f = 1 - c(wave) + (labels - y0) @ B(wave).T."""
    y0 = np.array([5000.0, 3.0, -0.3])
    phase = (wave - wave[0]) / 7.0
    c = 0.2 * np.sin(phase) ** 2
    slopes = np.stack([-1e-5 * np.cos(phase), 0.02 * np.sin(2 * phase), 0.05 * np.cos(phase)], 1)
    return 1.0 - c + (labels - y0) @ slopes.T, slopes


def fake_labels(rng, n: int, prefix: str) -> Table:
    return Table({"STAR_ID": [f"{prefix}{i:04d}" for i in range(n)],
                  "TEFF": rng.uniform(3800, 6800, n), "LOGG": rng.uniform(1.0, 4.8, n),
                  "FE_H": rng.uniform(-2.0, 0.4, n), "SNR": rng.uniform(30, 300, n)})


def write_results(root: Path, rng: np.random.Generator, posterior_file: Path) -> Path:
    """A results/ tree in exactly the contract formats (docs/outputs.md)."""
    wave = small_grid()
    for split in ("train", "valid", "test"):
        labels = fake_labels(rng, N_STARS, split[:2].upper())
        flux, _ = linear_flux(np.stack([labels[k] for k in LABELS], 1), wave)
        err = np.full(flux.shape, 0.01, np.float32)
        write_spectra(root / "data" / f"{split}.fits",
                      Spectra(flux.astype(np.float32), err, wave, labels))
    (root / "model").mkdir(parents=True)
    epochs = np.arange(12)
    val = 0.5 * np.exp(-epochs / 3) + 0.02 * (epochs - 7) ** 2 / 49 + 0.05
    pd.DataFrame({"epoch": epochs, "loss": 0.6 * np.exp(-epochs / 3) + 0.03,
                  "val_loss": val}).to_csv(root / "model" / "history.csv", index=False)
    (root / "laplace").mkdir()
    shutil.copy(posterior_file, root / "laplace" / "posterior.npz")  # Posterior.save wrote it
    for split in ("valid", "test"):
        write_catalog(root / "predictions" / f"{split}.fits", rng, split[:2].upper())
    write_jacobians(root, wave, rng)
    write_summary(root / "tables" / "jacobian_summary.fits", wave, rng)
    return root


def write_catalog(path: Path, rng, prefix: str) -> None:
    true = fake_labels(rng, N_STARS, prefix)
    cat = Table({"STAR_ID": true["STAR_ID"]})
    scale = np.array([80.0, 0.15, 0.08])
    for j, lab in enumerate(LABELS):
        parts = {s: scale[j] * rng.uniform(0.2, 0.6, N_STARS)
                 for s in ("MODEL", "NOISE", "SCATTER")}
        parts["NOISE"] *= 100.0 / true["SNR"]
        total = np.sqrt(sum(p**2 for p in parts.values()))
        cat[lab] = true[lab] + total * rng.standard_normal(N_STARS)
        cat[f"{lab}_ERR"] = total
        for s, p in parts.items():
            cat[f"{lab}_ERR_{s}"] = p
        cat[f"{lab}_TRUE"] = true[lab]
    for name in ("TEFF_LOGG_CORR", "TEFF_FE_H_CORR", "LOGG_FE_H_CORR"):
        cat[name] = rng.uniform(-0.5, 0.5, N_STARS)
    cat["SNR"] = true["SNR"]
    cat["FLAG"] = np.zeros(N_STARS, np.int32)
    write_table(cat, path.with_suffix(""), {}, formats=("fits",))


def write_jacobians(root: Path, wave: np.ndarray, rng, n_shards: int = 2) -> None:
    """Shards covering the test split; row i of star 'TE%04d' % i is filled with i."""
    ids = np.array([f"TE{i:04d}" for i in range(N_STARS)])
    for shard, rows in enumerate(np.array_split(np.arange(N_STARS), n_shards)):
        jac = rng.standard_normal((rows.size, 3, wave.size)).astype(np.float32)
        jac[:, 0, 0] = rows  # a tag to check which rows came back
        write_jacobian_shard(root / "jacobians" / "test" / f"shard-{shard}.fits", iter([jac]),
                             rows.size, ids[rows], rows, wave, {})


def write_summary(path: Path, wave: np.ndarray, rng) -> None:
    table = Table({"PIX": np.arange(wave.size), "WAVE": wave})
    for lab in LABELS:
        mean = rng.standard_normal(wave.size)
        mean[np.argmin(np.abs(wave - 15582.0))] = 25.0  # a CO bandhead to be named
        table[f"{lab}_MEAN"], table[f"{lab}_MEDIAN"] = mean, mean
        table[f"{lab}_P16"], table[f"{lab}_P84"] = mean - 1, mean + 1
        table[f"{lab}_MEAN_ABS"] = np.abs(mean)
    write_table(table, path.with_suffix(""), {}, formats=("fits",),
                extname="JACOBIAN_SUMMARY")


@pytest.fixture(scope="module")
def results_tree(tmp_path_factory, tiny_posterior_file) -> Path:
    return write_results(tmp_path_factory.mktemp("results"), np.random.default_rng(7),
                         tiny_posterior_file)


def figure_config(**figures) -> dict:
    return validate({"data": {"source": "fits"}, "jacobian": {"splits": ["test"]},
                     "figures": figures})


def run_cli(results: Path, outdir: Path, figure: str, source: str = "fits",
            formats=("png", "pdf"), window=None) -> int:
    from pipeline.steps.figures import main

    config = {"data": {"source": source}, "jacobian": {"splits": ["test"]},
              "figures": {"formats": list(formats), "dpi": 60, "max_points": 40,
                          "spectra_window": window}}
    return main(["--config-json", json.dumps(config), "--figure", figure,
                 "--results", str(results), "--outdir", str(outdir)])


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("figure", FIGURE_NAMES)
def test_every_figure_written_as_png_and_pdf(results_tree, tmp_path, figure):
    assert run_cli(results_tree, tmp_path, figure) == 0
    png = (tmp_path / f"{figure}.png").read_bytes()
    pdf = (tmp_path / f"{figure}.pdf").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    width, height = np.frombuffer(png[16:24], dtype=">u4")
    assert 200 < width < 2000 and 100 < height < 2000
    assert pdf.startswith(b"%PDF-") and b"%%EOF" in pdf[-64:] and len(pdf) > 5_000
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{figure}.pdf", f"{figure}.png"]


def test_spectra_examples_from_the_synthetic_generator(results_tree, tmp_path):
    assert run_cli(results_tree, tmp_path, "spectra_examples", source="synthetic",
                   formats=("png",), window=[15500.0, 15800.0]) == 0
    assert (tmp_path / "spectra_examples.png").read_bytes().startswith(PNG_MAGIC)


def test_explicit_output_files_are_the_files_written(results_tree, tmp_path):
    from pipeline.steps.figures import main

    out = [tmp_path / "a" / "cal.pdf", tmp_path / "b" / "cal.png"]
    config = {"data": {"source": "fits"}, "jacobian": {"splits": ["test"]},
              "figures": {"formats": ["svg"], "dpi": 60}}
    assert main(["--config-json", json.dumps(config), "--figure", "calibration", "--results",
                 str(results_tree), "--out", *map(str, out)]) == 0
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(out)
    assert out[0].read_bytes().startswith(b"%PDF") and out[1].read_bytes()[:8] == PNG_MAGIC


def test_caption_keys_are_the_figure_names():
    import yaml

    from pipeline.steps.figures import FIGURES

    captions = yaml.safe_load((Path(__file__).parents[1] / "docs/report/captions.yaml").read_text())
    assert tuple(captions) == FIGURE_NAMES == tuple(FIGURES)
    assert all(len(text.split()) >= 15 for text in captions.values())


@pytest.mark.parametrize("figure, relative", [
    ("training_curves", "model/history.csv"),
    ("laplace_diagnostics", "laplace/posterior.npz"),
    ("calibration", "predictions/test.fits"),
    ("jacobian_mean", "tables/jacobian_summary.fits"),
])
def test_missing_input_is_a_clear_error_and_writes_nothing(results_tree, tmp_path, capsys,
                                                           figure, relative):
    partial = tmp_path / "results"
    for path in results_tree.rglob("*"):
        target = partial / path.relative_to(results_tree)
        if path.is_file() and path.relative_to(results_tree) != Path(relative):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    outdir = tmp_path / "figures"
    assert run_cli(partial, outdir, figure) == 1
    err = capsys.readouterr().err
    assert str(partial / relative) in err and "does not exist" in err
    assert not outdir.exists() or not any(outdir.iterdir())


def test_missing_jacobian_shards_and_columns_are_named(results_tree, tmp_path):
    inputs = FigureInputs.from_results(results_tree, figure_config())
    with pytest.raises(DataError, match="no Jacobian shard files"):
        dataclasses.replace(inputs, shards=()).jacobian_shards()
    missing = tmp_path / "shard-7.fits"
    with pytest.raises(DataError, match="shard-7.fits.*does not exist"):
        dataclasses.replace(inputs, shards=(missing,)).jacobian_shards()
    pd.DataFrame({"epoch": [0, 1], "loss": [1.0, 0.5]}).to_csv(tmp_path / "h.csv", index=False)
    with pytest.raises(ModelFileError, match="missing column.*val_loss"):
        dataclasses.replace(inputs, history=tmp_path / "h.csv").history_table()


def test_unknown_figure_name_lists_the_valid_ones(results_tree, tmp_path, capsys):
    assert run_cli(results_tree, tmp_path, "no_such_figure") == 1
    assert "jacobian_map" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_posterior_without_a_required_key_is_a_clear_error(results_tree, tmp_path, capsys):
    tree = tmp_path / "results"
    shutil.copytree(results_tree, tree)
    np.savez(tree / "laplace" / "posterior.npz", noise_std=np.ones(3))
    assert run_cli(tree, tmp_path / "out", "laplace_diagnostics", formats=("png",)) == 1
    err = capsys.readouterr().err
    assert "posterior.npz" in err and "missing keys" in err and "eigenvalues" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------- numerics of the figures
def test_coverage_matches_closed_form_and_normal_sample():
    from pipeline.plots.calibration import empirical_coverage, nominal_levels

    one_sigma = norm.cdf(1) - norm.cdf(-1)
    z = np.array([0.5, -1.5, 2.5, np.nan])
    # half widths 1 - tiny, 1.95996, 2.5758: |z| = 0.5 | 1.5 | 2.5 fall in 1, 2, 3 of them
    cov = empirical_coverage(z, np.array([one_sigma - 1e-9, 0.95, 0.99]))
    np.testing.assert_allclose(cov, [1 / 3, 2 / 3, 1.0], rtol=0, atol=1e-15)
    levels = nominal_levels(9)
    np.testing.assert_allclose(levels, np.arange(1, 10) / 10, atol=1e-15)
    sample = np.random.default_rng(0).standard_normal(200_000)
    # binomial standard error at p = 0.5 is 0.0011: 5 sigma
    np.testing.assert_allclose(empirical_coverage(sample, levels), levels, atol=0.0056)
    np.testing.assert_allclose(empirical_coverage(2 * sample, levels),
                               2 * norm.cdf(norm.ppf((1 + levels) / 2) / 2) - 1, atol=0.0056)


def test_snr_bins_and_binned_medians_match_brute_force():
    from pipeline.plots.accuracy import binned, robust_std, snr_binning

    rng = np.random.default_rng(3)
    snr, y = rng.uniform(30, 300, 997), rng.standard_normal(997)
    snr[5] = np.nan
    index, centres = snr_binning(snr, 8)
    edges = np.quantile(snr[np.isfinite(snr)], np.linspace(0, 1, 9))
    for b in range(8):  # brute force: stars whose S/N lies in [edge_b, edge_b+1)
        inside = (snr >= edges[b]) & ((snr < edges[b + 1]) | (b == 7))
        np.testing.assert_array_equal(np.flatnonzero(index == b), np.flatnonzero(inside))
        assert centres[b] == np.median(snr[inside])
        assert binned(np.median, y, index, 8)[b] == np.median(y[inside])
    assert index[5] == -1
    assert abs(robust_std(rng.standard_normal(400_000)) - 1.0) < 0.006


def test_local_linear_fit_recovers_exact_derivatives(results_tree):
    from pipeline.plots.spectra import local_linear_examples

    labels = np.array([[4000.0, 1.5, 0.0], [6000.0, 4.2, -1.0]])
    wave, flux, jac = local_linear_examples(results_tree / "data" / "train.fits", labels, 30,
                                            1e3)
    expected_flux, slopes = linear_flux(labels, wave)
    # float32 flux in the file: about 1e-7 relative per star, amplified by the fit
    np.testing.assert_allclose(flux, expected_flux, rtol=0, atol=2e-7)
    # slopes are about 1e-5 / K, 0.02 / dex, 0.05 / dex: tolerances 1e-5 of each
    for j, atol in enumerate((2e-10, 2e-7, 2e-7)):
        np.testing.assert_allclose(jac[:, :, j], np.broadcast_to(slopes[:, j], jac.shape[:2]),
                                   rtol=0, atol=atol)


def test_features_are_separated_and_named():
    from pipeline.plots.lines import name_features, strongest_features

    wave = np.linspace(15500.0, 15700.0, 2001)  # 0.1 A pixels
    signal = np.zeros_like(wave)
    signal[[820, 823, 1500, 100]] = [5.0, -4.9, -3.0, 1.0]  # 823 lies 0.3 A from 820
    picks = strongest_features(wave, signal, 3, separation=2.0)
    np.testing.assert_array_equal(picks, [820, 1500, 100])
    # 15705.2 is 0.3 A from Br15 (15704.9) and 1.3 A from Ti I 15703.9: the nearest wins
    assert name_features(np.array([15582.3, 15650.0, 15705.2]), 1.0) == ["CO 3-0", "15650",
                                                                         "Br15"]


def test_jacobian_map_reads_the_right_rows_in_teff_order(results_tree):
    from pipeline.plots.jacobians import load_map

    tree = FigureInputs.from_results(results_tree, figure_config())
    wave, jac, teff = load_map(tree, 7)
    test = Table.read(results_tree / "data" / "test.fits", hdu="LABELS")
    all_teff = np.asarray(test["TEFF"])
    rows = jac[:, 0, 0].astype(int)  # the tag written into each star's Jacobian
    np.testing.assert_array_equal(all_teff[rows], teff)
    assert np.all(np.diff(teff) > 0) and teff.size == 7
    assert teff[0] == all_teff.min() and teff[-1] == all_teff.max()
    np.testing.assert_array_equal(wave, small_grid())


def test_figures_read_the_posterior_that_posterior_save_wrote(results_tree, tiny_model_dir):
    from pipeline.artifacts.model_dir import load_trained

    model, _, _ = load_trained(tiny_model_dir)
    saved = Posterior.load(results_tree / "laplace" / "posterior.npz", model)
    post = FigureInputs.from_results(results_tree, figure_config()).posterior_arrays()
    np.testing.assert_array_equal(post["eigenvalues"], saved.eigenvalues)
    np.testing.assert_array_equal(post["prior_precision"], saved.prior_precision)
    np.testing.assert_array_equal(post["evidence_curve_log_evidence"],
                                  saved.evidence_curve["log_evidence"])


def test_fewer_shards_than_on_disk_figures_and_tables_read_the_same_stars(results_tree,
                                                                            tmp_path):
    """A first run with 3 shards, a second with 2: the stale shard-2 stays on disk. The
    Jacobian summary of the tables step and the Jacobian map read the 2 shards of the config
    and so the same stars."""
    from pipeline.evaluation.jacobian_summary import jacobian_summary
    from pipeline.plots.jacobians import load_map

    tree = tmp_path / "results"
    shutil.copytree(results_tree, tree)
    shutil.rmtree(tree / "jacobians")
    rng = np.random.default_rng(3)
    write_jacobians(tree, small_grid(), rng, n_shards=3)
    stale = (tree / "jacobians" / "test" / "shard-2.fits").read_bytes()
    write_jacobians(tree, small_grid(), rng, n_shards=2)
    (tree / "jacobians" / "test" / "shard-2.fits").write_bytes(stale)
    config = figure_config()
    config["jacobian"]["shards"] = 2
    inputs = FigureInputs.from_results(tree, config)
    assert [p.name for p in inputs.jacobian_shards()] == ["shard-0.fits", "shard-1.fits"]
    summary = jacobian_summary(inputs.jacobian_shards(), memory_mb=16)
    _, jac, teff = load_map(inputs, N_STARS)
    assert teff.size == N_STARS  # every star once: none twice from the stale shard
    np.testing.assert_allclose(np.asarray(summary["TEFF_MEAN"])[1:],
                               jac[:, 0, 1:].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_spectra_window_outside_the_grid_is_a_config_error(results_tree, tmp_path, capsys):
    from pipeline.steps.figures import main

    config = {"data": {"source": "fits"}, "figures": {"spectra_window": [9000, 9100]}}
    assert main(["--config-json", json.dumps(config), "--figure", "spectra_examples",
                 "--results", str(results_tree), "--outdir", str(tmp_path)]) == 1
    assert "figures.spectra_window" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_map_cells_tile_each_chip_and_leave_the_gaps_blank():
    from pipeline.plots.jacobians import _gap_columns

    wave = small_grid()  # 3 chips of 120 pixels
    image = np.arange(2 * wave.size, dtype=np.float64).reshape(2, wave.size)
    edges, img = _gap_columns(wave, image)
    assert img.shape == (2, wave.size + 2) and edges.shape == (wave.size + 3,)
    assert np.all(np.diff(edges) > 0)
    np.testing.assert_array_equal(np.flatnonzero(np.isnan(img[0])), [120, 241])
    np.testing.assert_array_equal(img[:, ~np.isnan(img[0])], image)
    # every pixel centre lies inside its own cell, at the geometric middle (log-linear grid)
    centre_cells = np.r_[0:120, 121:241, 242:362]
    lo, hi = edges[centre_cells], edges[centre_cells + 1]
    np.testing.assert_allclose(np.sqrt(lo * hi), wave, rtol=1e-12)
    # the gap cells span exactly from half a step after one chip to half a step before the next
    ratio = 10.0**3e-6
    np.testing.assert_allclose(edges[[120, 121]], [wave[119] * ratio, wave[120] / ratio],
                               rtol=1e-12)


# ------------------------------------------------------------------- journal page layout
def pdf_text_sizes_and_fonts(pdf: bytes) -> tuple[set[float], set[str]]:
    """Font sizes of every text operator (``/F1 8 Tf``) in the PDF's Flate content streams,
    and the base font names (subset prefix removed)."""
    import zlib

    sizes = set()
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        try:
            text = zlib.decompress(stream)
        except zlib.error:  # an image or font program, not a content stream
            continue
        sizes |= {float(s) for s in re.findall(rb"/F\d+ ([\d.]+) Tf", text)}
    fonts = {name.split(b"+")[-1].decode() for name in re.findall(rb"/BaseFont /(\S+)", pdf)}
    return sizes, fonts


@pytest.mark.parametrize("figure, width", [("training_curves", 3.35), ("pred_vs_true", 7.0)])
def test_journal_preset_sets_page_widths_and_one_font(results_tree, tmp_path, figure, width):
    """--preset journal: a one-column figure is exactly 3.35 in wide, a page-wide one 7.0 in
    (PDF MediaBox in points of 1/72 in); every text is DejaVu Serif, the largest at the
    preset's font size and tick labels one point smaller."""
    from pipeline.plots.style import PRESETS
    from pipeline.steps.figures import main

    config = {"data": {"source": "fits"}, "jacobian": {"splits": ["test"]},
              "figures": {"formats": ["png"], "dpi": 60, "max_points": 40}}
    out = tmp_path / f"{figure}.pdf"
    assert main(["--config-json", json.dumps(config), "--figure", figure, "--results",
                 str(results_tree), "--preset", "journal", "--out", str(out)]) == 0
    pdf = out.read_bytes()
    box = re.search(rb"/MediaBox \[ *0 0 ([\d.]+) ([\d.]+) *\]", pdf)
    assert float(box[1]) == pytest.approx(72 * width, abs=0.01)
    sizes, fonts = pdf_text_sizes_and_fonts(pdf)
    size = PRESETS["journal"]["font_size"]
    assert max(sizes) == size and size - 1 in sizes
    assert fonts and all(f.startswith("DejaVuSerif") for f in fonts), fonts
