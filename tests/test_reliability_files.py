"""Reliability matrix, part 2: bad configuration, model, scaler and posterior files, and outputs
that cannot be written (issue 9).

Same contract as tests/test_reliability_inputs.py: exit status 1, an ``error:`` line naming the
file or config key and what would fix it, no traceback, no output file.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import catalog as export
from pipeline.spectra.fits import write_spectra
from tests.test_reliability_inputs import assert_nothing_written, run_step


@pytest.fixture(scope="module")
def stars(tiny_model_dir, tmp_path_factory) -> Path:
    from pipeline.spectra.synthetic import generate

    path = tmp_path_factory.mktemp("reliability_files") / "stars.fits"
    write_spectra(path, generate(10, 31, wave=np.load(tiny_model_dir / "wave.npy")))
    return path


def data_argv(out: Path, *extra) -> list:
    """The data step (no TensorFlow import) for the configuration cases."""
    small = {"data": {"n_train": 3, "n_valid": 2, "n_test": 2}}
    return ["--config-json", json.dumps(small), *extra, "--outdir", out]


def check_failure(capsys, rc: int, fragments, outputs) -> str:
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "error: " in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert_nothing_written(outputs)
    return err


# ------------------------------------------------------------------------------- config
CONFIG_CASES = [
    ("wrong-type", ["--set", "data.n_train=many"],
     ["config key 'data.n_train'", "'many' is not of type 'integer'"]),
    ("wrong-type-nested-list", ["--set", "model.hidden=[16, wide]"],
     ["config key 'model.hidden.1'", "not of type 'integer'"]),
    ("out-of-range", ["--set", "laplace.last_layers=0"],
     ["config key 'laplace.last_layers'", "less than the minimum of 1"]),
    ("out-of-range-fraction", ["--set", "data.max_bad_pixel_fraction=1.5"],
     ["config key 'data.max_bad_pixel_fraction'", "greater than the maximum of 1"]),
    ("unknown-key", ["--set", "train.epoch=3"],
     ["config key 'train'", "'epoch' was unexpected", "unknown key",
      "check its spelling against config/schema.yaml"]),
    ("bad-choice", ["--set", "laplace.curvature=fisher"],
     ["config key 'laplace.curvature'", "valid choices: ggn, hessian"]),
    ("bad-override-syntax", ["--set", "laplace.curvature"], ["must look like key.subkey=value"]),
]


@pytest.mark.parametrize(("extra", "fragments"), [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_value(tmp_path, capsys, extra, fragments):
    out = tmp_path / "out"
    check_failure(capsys, run_step("data", data_argv(out, *extra)), fragments, [out])


@pytest.mark.parametrize(("content", "fragments"), [
    ("data: {n_train: [1, 2\n", ["is not valid YAML"]),
    ("- just\n- a list\n", ["must hold a mapping of keys to values"]),
    (None, ["does not exist"]),
], ids=["invalid-yaml", "not-a-mapping", "missing-file"])
def test_bad_config_file(tmp_path, capsys, content, fragments):
    path = tmp_path / "my_config.yaml"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    rc = run_step("data", ["--configfile", path, "--outdir", out])
    check_failure(capsys, rc, ["my_config.yaml", *fragments], [out])


def test_bad_config_json(tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_step("data", ["--config-json", "{seed: 1", "--outdir", out])
    check_failure(capsys, rc, ["--config-json is not valid JSON"], [out])


# --------------------------------------------------------------- model, scaler, posterior
def copy_model(src: Path, dst: Path, name: str, content: bytes | None) -> Path:
    """A copy of the model directory with ``name`` replaced by ``content`` (None: deleted)."""
    shutil.copytree(src, dst)
    if content is None:
        (dst / name).unlink()
    else:
        (dst / name).write_bytes(content)
    return dst


MODEL_CASES = [
    ("missing-model", "model.keras", None, ["model.keras", "does not exist",
                                            "rerun the train step"]),
    ("corrupt-model", "model.keras", b"PK\x03\x04 not really a zip",
     ["model.keras", "is corrupt", "rerun the train step"]),
    ("missing-scaler", "scaler.json", None, ["scaler.json", "does not exist"]),
    ("corrupt-scaler", "scaler.json", b'{"labels": ["TEFF", "LOGG", "FE_H"], "mean": [1',
     ["scaler.json", "is corrupt", "rerun the train step"]),
    ("wrong-scaler", "scaler.json",
     json.dumps({"labels": ["TEFF", "LOGG", "FE_H"], "mean": [0, 0, 0],
                 "scale": [1, 0, 1]}).encode(),
     ["scaler.json", "positive scale"]),
    ("corrupt-wave", "wave.npy", b"\x93NUMPY garbage", ["wave.npy", "is corrupt"]),
]


@pytest.mark.parametrize("step", ["predict", "jacobian"])
@pytest.mark.parametrize(("name", "content", "fragments"), [c[1:] for c in MODEL_CASES],
                         ids=[c[0] for c in MODEL_CASES])
def test_bad_model_directory(tiny_model_dir, tiny_posterior_file, stars, tmp_path, capsys,
                             step, name, content, fragments):
    model = copy_model(tiny_model_dir, tmp_path / "model", name, content)
    out = tmp_path / "out"
    if step == "predict":
        argv = ["--model", model, "--posterior", tiny_posterior_file, "--out", out, stars]
    else:
        argv = ["--model", model, "--out", out / "shard-0.fits", stars]
    check_failure(capsys, run_step(step, argv), fragments, [out])


def test_missing_model_directory_in_laplace_step(stars, tmp_path, capsys):
    out = tmp_path / "out" / "posterior.npz"
    rc = run_step("laplace", ["--model", tmp_path / "no_model", "--train", stars,
                              "--valid", stars, "--out", out])
    check_failure(capsys, rc, ["no_model", "does not exist", "run the train step"], [out])


def other_model_posterior(tiny_model_dir, stars, tmp_path) -> Path:
    """A posterior fitted to a network of the same architecture with other weights."""
    from pipeline.artifacts.model_dir import load_trained
    from pipeline.laplace import fit_laplace
    from pipeline.nn.model import build_model
    from pipeline.spectra.fits import read_spectra

    model, scaler, _ = load_trained(tiny_model_dir)
    other = build_model(model.input_shape[-1], {"type": "dense", "hidden": [8]}, seed=99)
    spectra = read_spectra(stars)
    posterior = fit_laplace(other, spectra.flux, scaler.transform(spectra.label_array()),
                            last_layers=1)
    path = tmp_path / "other_posterior.npz"
    posterior.save(path)
    return path


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def _foreign_npz(src: Path, dst: Path) -> Path:
    with open(dst, "wb") as fh:
        np.savez(fh, weights=np.zeros(3))
    return dst


def _garbage(src: Path, dst: Path) -> Path:
    dst.write_bytes(b"this is not a posterior\n" * 20)
    return dst


@pytest.mark.parametrize(("make", "fragments"), [
    (None, ["posterior.npz", "does not exist", "run the laplace step"]),
    (_garbage, ["bad_posterior.npz", "not a readable posterior file", "rerun the laplace step"]),
    (_truncated, ["bad_posterior.npz", "rerun the laplace step"]),
    (_foreign_npz, ["bad_posterior.npz", "rerun the laplace step"]),
    ("other-model", ["posterior saved for a different model", "rerun the laplace step"]),
], ids=["missing", "garbage", "truncated", "foreign-npz", "other-model"])
def test_bad_posterior(tiny_model_dir, tiny_posterior_file, stars, tmp_path, capsys, make,
                       fragments):
    if make is None:
        posterior = tmp_path / "posterior.npz"
    elif make == "other-model":
        posterior = other_model_posterior(tiny_model_dir, stars, tmp_path)
    else:
        posterior = make(tiny_posterior_file, tmp_path / "bad_posterior.npz")
    out = tmp_path / "out"
    rc = run_step("predict", ["--model", tiny_model_dir, "--posterior", posterior,
                              "--out", out, stars])
    check_failure(capsys, rc, fragments, [out])


# -------------------------------------------------------------------------------- outputs
def test_output_directory_under_a_file(tiny_model_dir, tiny_posterior_file, stars, tmp_path,
                                       capsys):
    """An output path whose parent is a regular file cannot be created, even by root."""
    (tmp_path / "plain_file").write_text("")
    out = tmp_path / "plain_file" / "catalogs"
    rc = run_step("predict", ["--model", tiny_model_dir, "--posterior", tiny_posterior_file,
                              "--out", out, stars])
    check_failure(capsys, rc, ["cannot write to", "plain_file",
                               "choose a writable output directory"], [])


def test_unwritable_data_directory(tmp_path, capsys):
    (tmp_path / "plain_file").write_text("")
    rc = run_step("data", data_argv(tmp_path / "plain_file" / "data"))
    check_failure(capsys, rc, ["cannot write to", "plain_file"], [])
    assert (tmp_path / "plain_file").read_text() == ""


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_a_catalog(tiny_model_dir, tiny_posterior_file, stars, tmp_path,
                                           capsys, monkeypatch):
    """The CSV writer fails after the FITS and Parquet files were written: none is left."""
    monkeypatch.setattr(export, "write_csv", _disk_full)
    out = tmp_path / "out"
    rc = run_step("predict", ["--model", tiny_model_dir, "--posterior", tiny_posterior_file,
                              "--out", out, stars])
    err = check_failure(capsys, rc, ["stars.csv", "No space left on device",
                                     "check free disk space"], [out])
    assert err.count("failed") == 1, "one message, not one wrapped in another"


def test_disk_full_while_streaming_a_jacobian_shard(tiny_model_dir, stars, tmp_path, capsys,
                                                    monkeypatch):
    from astropy.io import fits

    monkeypatch.setattr(fits.StreamingHDU, "write", _disk_full)
    out = tmp_path / "out"
    rc = run_step("jacobian", ["--model", tiny_model_dir, "--out", out / "shard-0.fits", stars])
    check_failure(capsys, rc, ["shard-0.fits", "No space left on device",
                               "check free disk space"], [out])


def test_disk_full_while_writing_a_data_split(tmp_path, capsys, monkeypatch):
    import os

    real_replace = os.replace

    def replace(src, dst):  # the second split's rename fails
        if str(dst).endswith("valid.fits"):
            _disk_full()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    rc = run_step("data", data_argv(out))
    check_failure(capsys, rc, ["valid.fits", "No space left on device"], [])
    left = sorted(p.name for p in out.iterdir())
    assert left == ["train.fits"], "only the completed split remains, no temporary file"


def test_failed_atomic_write_leaves_no_directory_it_created(tmp_path):
    """A writer that fails leaves neither its file nor the directories created for it; a
    directory that existed before, or one that holds other files, stays."""
    from pipeline.artifacts.atomic import atomic_path

    target = tmp_path / "new" / "deeper" / "out.fits"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("writer failed")
    assert not (tmp_path / "new").exists() and tmp_path.is_dir()
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "other.csv").write_text("x")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "keep" / "sub" / "a.fits"):
        raise RuntimeError("writer failed")
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == ["other.csv"]
    with atomic_path(target) as tmp:  # success keeps the file and its directories
        tmp.write_text("done")
    assert target.read_text() == "done"
