"""Reliability matrix, part 1: bad spectra files at the command line of every step that reads
them (issue 9).

Each case runs ``pipeline.cli.main(build_parser, run, argv)`` of one step on a broken input
and checks what a user sees: exit status 1, an ``error:`` line naming the file and the HDU,
column or row and what would fix it, no traceback, and no output file. The unit-level checks
behind these messages live in tests/test_io.py and tests/test_data_step.py; here every
message is checked as it reaches the terminal (and, in test_reliability_snakemake.py, a
Snakemake log).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from pipeline.cli import main
from pipeline.spectra.dataset import Spectra
from pipeline.spectra.fits import write_spectra
from tests.conftest import REPO

TINY_TRAIN = {"model": {"hidden": [4]}, "train": {"epochs": 1, "batch_size": 8}}


@dataclass
class Inputs:
    """Paths shared by the cases: a trained tiny model, its posterior, good spectra."""

    model: Path
    posterior: Path
    good: Spectra
    root: Path


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tiny_posterior_file, tmp_path_factory) -> Inputs:
    from pipeline.spectra.synthetic import generate

    wave = np.load(tiny_model_dir / "wave.npy")
    good = generate(12, 21, wave=wave)
    root = tmp_path_factory.mktemp("reliability_inputs")
    write_spectra(root / "good.fits", good)
    return Inputs(tiny_model_dir, tiny_posterior_file, good, root)


# ------------------------------------------------------------------------------ bad files
def copy_spectra(s: Spectra) -> Spectra:
    return Spectra(s.flux.copy(), s.flux_err.copy(), s.wave.copy(), s.labels.copy())


def raw_hdus(s: Spectra) -> list:
    """The HDUs of ``s`` written by hand, so that a case can break any of them."""
    return [fits.PrimaryHDU(), fits.ImageHDU(s.flux, name="FLUX"),
            fits.ImageHDU(s.flux_err, name="FLUX_ERR"), fits.ImageHDU(s.wave, name="WAVE"),
            fits.BinTableHDU(s.labels, name="LABELS")]


def write_raw(path: Path, hdus: list) -> Path:
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def truncated(ctx: Inputs, path: Path) -> Path:
    data = (ctx.root / "good.fits").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def wrong_hdus(ctx: Inputs, path: Path) -> Path:
    hdus = raw_hdus(ctx.good)
    hdus[1].name, hdus[2].name = "SPECTRA", "ERRORS"  # e.g. a survey's own layout
    return write_raw(path, hdus)


def not_fits(ctx: Inputs, path: Path) -> Path:
    path.write_text("STAR_ID,TEFF\nA,5000\n")
    return path


def row_flux(value, row: int):
    def make(ctx: Inputs, path: Path) -> Path:
        s = copy_spectra(ctx.good)
        s.flux[row] = value
        return write_raw(path, raw_hdus(s))
    return make


def negative_errors(ctx: Inputs, path: Path) -> Path:
    s = copy_spectra(ctx.good)
    s.flux_err[4] = -np.abs(s.flux_err[4])
    return write_raw(path, raw_hdus(s))


def err_shape(ctx: Inputs, path: Path) -> Path:
    s = copy_spectra(ctx.good)
    hdus = raw_hdus(s)
    hdus[2] = fits.ImageHDU(s.flux_err[:, :-5], name="FLUX_ERR")
    return write_raw(path, hdus)


def short_grid(ctx: Inputs, path: Path) -> Path:
    s = copy_spectra(ctx.good)
    half = s.wave.size // 2
    return write_raw(path, raw_hdus(Spectra(s.flux[:, :half], s.flux_err[:, :half],
                                            s.wave[:half], s.labels)))


def coarse_grid(ctx: Inputs, path: Path) -> Path:
    """Spectra on every second pixel: a valid file, but not the training grid."""
    s = copy_spectra(ctx.good)
    return write_raw(path, raw_hdus(Spectra(s.flux[:, ::2], s.flux_err[:, ::2], s.wave[::2],
                                            s.labels)))


def unsorted_wave(ctx: Inputs, path: Path) -> Path:
    s = copy_spectra(ctx.good)
    s.wave[[100, 101]] = s.wave[[101, 100]]
    return write_raw(path, raw_hdus(s))


def duplicate_ids(ctx: Inputs, path: Path) -> Path:
    s = copy_spectra(ctx.good)
    s.labels["STAR_ID"][7] = s.labels["STAR_ID"][2]
    return write_raw(path, raw_hdus(s))


def constant_label(ctx: Inputs, path: Path) -> Path:
    s = copy_spectra(ctx.good)
    s.labels["FE_H"] = -0.25
    return write_raw(path, raw_hdus(s))


def without_label(ctx: Inputs, path: Path) -> Path:
    s = copy_spectra(ctx.good)
    s.labels.remove_column("LOGG")
    return write_raw(path, raw_hdus(s))


def nan_label(ctx: Inputs, path: Path) -> Path:
    s = copy_spectra(ctx.good)
    s.labels["TEFF"][3] = np.nan
    return write_raw(path, raw_hdus(s))


def missing(ctx: Inputs, path: Path) -> Path:
    return path  # never written


# ------------------------------------------------------------------------ step commands
def predict_cmd(ctx, bad, out):
    return ["--model", ctx.model, "--posterior", ctx.posterior, "--out", out, bad], [out]


def jacobian_cmd(ctx, bad, out):
    shard = out / "shard-0.fits"
    return ["--model", ctx.model, "--out", shard, bad], [shard]


def data_cmd(ctx, bad, out, **data):
    cfg = {"data": {"source": "fits", "fits": {"path": str(bad)}, **data}}
    return ["--config-json", json.dumps(cfg), "--outdir", out], [out]


def train_cmd(ctx, bad, out, *, valid=None, **data):
    cfg = dict(TINY_TRAIN, data=data)
    valid = ctx.root / "good.fits" if valid is None else valid
    return (["--config-json", json.dumps(cfg), "--train", bad, "--valid", valid,
             "--outdir", out], [out])


def train_valid_cmd(ctx, bad, out):
    return train_cmd(ctx, ctx.root / "good.fits", out, valid=bad)


def laplace_cmd(ctx, bad, out):
    post = out / "posterior.npz"
    return (["--model", ctx.model, "--train", bad, "--valid", ctx.root / "good.fits",
             "--out", post], [post])


def nan_fail_train_cmd(ctx, bad, out):
    return train_cmd(ctx, bad, out, nan_labels="fail")


# (id, step, command, bad file maker, message fragments); {file} is the bad file's name
CASES = [
    ("truncated-fits-predict", "predict", predict_cmd, truncated,
     ["{file}", "not a readable FITS file", "re-create or re-download it"]),
    ("truncated-fits-data", "data", data_cmd, truncated, ["{file}", "not a readable FITS file"]),
    ("wrong-hdus-predict", "predict", predict_cmd, wrong_hdus,
     ["{file}", "HDU 'FLUX' is missing", "SPECTRA", "docs/data.md"]),
    ("wrong-hdus-jacobian", "jacobian", jacobian_cmd, wrong_hdus,
     ["{file}", "HDU 'FLUX' is missing"]),
    ("not-fits-jacobian", "jacobian", jacobian_cmd, not_fits, ["{file}", "not a readable FITS"]),
    ("nan-spectrum-predict", "predict", predict_cmd, row_flux(np.nan, 2),
     ["{file}", "row 2", "SYN-", "entirely NaN or infinite", "remove the spectrum"]),
    ("inf-spectrum-train", "train", train_cmd, row_flux(np.inf, 5),
     ["{file}", "row 5", "entirely NaN or infinite"]),
    ("zero-spectrum-jacobian", "jacobian", jacobian_cmd, row_flux(0.0, 1),
     ["{file}", "row 1", "all zeros", "remove the spectrum"]),
    ("zero-spectrum-data", "data", data_cmd, row_flux(0.0, 9), ["{file}", "row 9", "all zeros"]),
    ("negative-errors-predict", "predict", predict_cmd, negative_errors,
     ["{file}", "row 4", "error <= 0", "data.max_bad_pixel_fraction"]),
    ("err-shape-predict", "predict", predict_cmd, err_shape,
     ["{file}", "HDU 'FLUX_ERR' has shape", "must match"]),
    ("grid-not-covering-predict", "predict", predict_cmd, short_grid,
     ["{file}", "does not cover the model grid", "retrain the model on this grid"]),
    ("grid-not-covering-laplace", "laplace", laplace_cmd, short_grid,
     ["{file}", "does not cover the model grid"]),
    ("grid-mismatch-train", "train", train_valid_cmd, coarse_grid,
     ["{file}", "is not on the training grid", "resample"]),
    ("unsorted-wave-predict", "predict", predict_cmd, unsorted_wave,
     ["{file}", "HDU 'WAVE'", "not strictly increasing at pixel 101", "sort the pixels"]),
    ("duplicate-ids-data", "data", data_cmd, duplicate_ids,
     ["{file}", "column 'STAR_ID'", "occurs 2 times", "rows [2, 7]", "must be unique"]),
    ("duplicate-ids-jacobian", "jacobian", jacobian_cmd, duplicate_ids,
     ["{file}", "occurs 2 times"]),
    ("zero-variance-data", "data", data_cmd, constant_label,
     ["'FE_H' has zero variance", "use stars that span the label"]),
    ("zero-variance-train", "train", train_cmd, constant_label,
     ["'FE_H'", "constant", "use stars that span the label"]),
    ("missing-label-train", "train", train_cmd, without_label,
     ["{file}", "lacks column 'LOGG'", "needed for training"]),
    ("nan-label-train", "train", nan_fail_train_cmd, nan_label,
     ["{file}", "row 3 has a NaN label", "data.nan_labels: drop"]),
    ("missing-input-predict", "predict", predict_cmd, missing, ["{file}", "does not exist"]),
    ("missing-input-data", "data", data_cmd, missing, ["{file}", "does not exist"]),
]


def run_step(step: str, argv: list) -> int:
    module = importlib.import_module(f"pipeline.steps.{step}")
    return main(module.build_parser, module.run, [str(a) for a in argv])


def assert_nothing_written(outputs: list[Path]) -> None:
    """No output, and no file at all in an output directory (temporary files included)."""
    for path in outputs:
        if path.is_dir():
            left = [p for p in path.rglob("*") if p.is_file()]
            assert not left, f"a failed step left {left}"
        else:
            assert not path.exists(), f"a failed step left {path}"


@pytest.mark.parametrize(("step", "command", "make", "fragments"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly_without_output(inputs, tmp_path, capsys, step, command, make,
                                                fragments):
    bad = make(inputs, tmp_path / "bad_input.fits")
    argv, outputs = command(inputs, bad, tmp_path / "out")
    assert run_step(step, argv) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment.format(file=bad.name) in err, (fragment, err)
    assert_nothing_written(outputs)


@pytest.mark.slow
def test_real_command_line_exit_status(inputs, tmp_path):
    """One case through ``python -m``: the process itself exits 1 with the one-line message."""
    bad = row_flux(np.nan, 2)(inputs, tmp_path / "nan.fits")
    out = tmp_path / "out"
    argv, _ = predict_cmd(inputs, bad, out)
    proc = subprocess.run([sys.executable, "-m", "pipeline.predict", *map(str, argv)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1
    assert "error: " in proc.stderr and "nan.fits" in proc.stderr and "row 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
