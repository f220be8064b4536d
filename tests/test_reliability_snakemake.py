"""Reliability through Snakemake itself (issue 9): determinism of two complete runs, recovery
from SIGKILL during training, the Laplace fit and a Jacobian shard, and failed jobs whose
message lands in the rule's log.

Every run uses tests/data/tiny.yaml in a temporary copy of the checkout (tracked files plus the
working tree's pipeline/) and stops at the tables (figures are not compared). One uninterrupted
reference run is shared by the module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from tests.conftest import REPO

pytestmark = pytest.mark.slow

CONFIG = "tests/data/tiny.yaml"
TARGET = "results/tables/metrics.json"  # data, train, laplace, predict x2, jacobian, tables
TIMESTAMP_CARDS = ("DATE",)


# ---------------------------------------------------------------------------- running
_SNAPSHOT: list[Path] = []


def snapshot(tmp_root: Path) -> Path:
    """One tar of the tracked files and the working tree's pipeline/ (uncommitted edits
    included), taken once per module so every run of the module uses the same code even while
    others edit the checkout."""
    if not _SNAPSHOT:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                               check=True).stdout.decode().split("\0")
        archive = tmp_root / "checkout.tar"
        with tarfile.open(archive, "w") as tar:
            for name in filter(None, files):
                if (REPO / name).is_file():
                    tar.add(REPO / name, arcname=name, recursive=False)
            tar.add(REPO / "pipeline", arcname="pipeline",
                    filter=lambda info: None if "__pycache__" in info.name else info)
            tar.add(REPO / CONFIG, arcname=CONFIG)
        _SNAPSHOT.append(archive)
    return _SNAPSHOT[0]


def copy_checkout(dest: Path) -> Path:
    dest.mkdir(parents=True)
    with tarfile.open(_SNAPSHOT[0]) as tar:
        tar.extractall(dest, filter="data")
    return dest


@pytest.fixture(scope="module", autouse=True)
def _snapshot(tmp_path_factory):
    snapshot(tmp_path_factory.mktemp("snapshot"))
    yield
    _SNAPSHOT.clear()


def snakemake_command(*extra, configs=(CONFIG,)) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", *configs,
            "--nocolor", *extra]


def environment() -> dict:
    # the rules call `python`: the interpreter running the tests must come first on PATH
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}


def snakemake(repo: Path, *extra, configs=(CONFIG,),
              timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_command(*extra, configs=configs), cwd=repo, env=environment(),
                          capture_output=True, text=True, timeout=timeout)


def step_processes(parent, step: str) -> list:
    """The ``python -m pipeline.steps.<step>`` processes below ``parent`` (not bash)."""
    import psutil

    found = []
    for proc in parent.children(recursive=True):
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if "-m" in cmd and f"pipeline.steps.{step}" in cmd:
            found.append(proc)
    return found


def log_has(path: Path, text: str) -> bool:
    try:
        return text in path.read_text()
    except OSError:
        return False


# When to kill each step: mid-work, after its first results exist but before its output.
KILL_POINTS = {
    "train": lambda repo: any((repo / "results/model/checkpoints").glob("epoch-*/state.json")),
    "laplace": lambda repo: log_has(repo / "results/logs/laplace.log", "valid.fits"),
    "jacobian": lambda repo: log_has(repo / "results/logs/jacobian/test-0.log", "bad pixels"),
}
STEP_OUTPUT = {"train": "results/model/model.keras", "laplace": "results/laplace/posterior.npz",
               "jacobian": "results/jacobians/test/shard-0.fits"}


def run_killing(repo: Path, steps: set[str], timeout: float = 400) -> tuple[str | None, str]:
    """Run Snakemake; SIGKILL the first of ``steps`` that reaches its kill point.

    Returns (the step killed or None, Snakemake's output).
    """
    import psutil

    out = open(repo / "snakemake.out", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(snakemake_command(TARGET), cwd=repo, env=environment(),
                            stdout=out, stderr=subprocess.STDOUT)
    parent, killed, deadline = psutil.Process(proc.pid), None, time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if killed is None:
                for step in steps:
                    victims = step_processes(parent, step)
                    if victims and KILL_POINTS[step](repo):
                        for victim in victims:
                            victim.send_signal(signal.SIGKILL)
                        killed = step
                        assert not (repo / STEP_OUTPUT[step]).exists(), f"{step} had finished"
                        break
            time.sleep(0.01)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
    text = (repo / "snakemake.out").read_text()
    if killed is not None:
        assert proc.returncode != 0, text[-3000:]
    return killed, text


@pytest.fixture(scope="module")
def reference(tmp_path_factory, _snapshot) -> Path:
    repo = copy_checkout(tmp_path_factory.mktemp("reference") / "repo")
    done = snakemake(repo, TARGET)
    assert done.returncode == 0, done.stderr[-4000:]
    return repo


# -------------------------------------------------------------------------- comparing
def compare_fits(a: Path, b: Path) -> None:
    """Every HDU's data exactly equal; headers equal except timestamp cards."""
    with fits.open(a) as ha, fits.open(b) as hb:
        assert [h.name for h in ha] == [h.name for h in hb]
        for x, y in zip(ha, hb, strict=True):
            keys = [k for k in x.header if k not in TIMESTAMP_CARDS]
            assert keys == [k for k in y.header if k not in TIMESTAMP_CARDS], (a, x.name)
            assert all(x.header[k] == y.header[k] for k in keys if k not in ("COMMENT",
                                                                              "HISTORY")), a
            if x.data is None:
                assert y.data is None
            elif isinstance(x, fits.BinTableHDU):
                for col in x.columns.names:
                    np.testing.assert_array_equal(x.data[col], y.data[col], err_msg=f"{a} {col}")
            else:
                np.testing.assert_array_equal(x.data, y.data, err_msg=str(a))


def compare_posteriors(a: Path, b: Path) -> None:
    with np.load(a) as pa, np.load(b) as pb:
        assert sorted(pa.files) == sorted(pb.files)
        for key in pa.files:
            if key == "info":  # holds the provenance, with its DATE card
                ia, ib = json.loads(str(pa[key])), json.loads(str(pb[key]))
                for info in (ia, ib):
                    info.get("provenance", {}).pop("DATE", None)
                assert ia == ib
            else:
                np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)


def compare_runs(a: Path, b: Path) -> None:
    """Catalogs, Jacobians, tables, posterior and history of two runs are identical."""
    ra, rb = a / "results", b / "results"
    csvs = sorted(p.relative_to(ra) for p in ra.rglob("*.csv") if "checkpoints" not in p.parts)
    assert {"predictions/test.csv", "tables/calibration.csv", "tables/jacobian_summary.csv",
            "model/history.csv"} <= {str(p) for p in csvs}
    for rel in csvs:
        assert (ra / rel).read_bytes() == (rb / rel).read_bytes(), rel
    for rel in (p.relative_to(ra) for p in ra.rglob("*.fits")):
        compare_fits(ra / rel, rb / rel)
    for rel in (p.relative_to(ra) for p in ra.rglob("*.parquet")):
        pd.testing.assert_frame_equal(pd.read_parquet(ra / rel), pd.read_parquet(rb / rel))
    ma, mb = (json.loads((r / "tables/metrics.json").read_text()) for r in (ra, rb))
    for m in (ma, mb):
        m.get("provenance", {}).pop("DATE", None)
    assert ma == mb
    compare_posteriors(ra / "laplace/posterior.npz", rb / "laplace/posterior.npz")


# ------------------------------------------------------------------------------ tests
def test_two_complete_runs_are_identical(reference, tmp_path):
    repo = copy_checkout(tmp_path / "repo")
    done = snakemake(repo, TARGET)
    assert done.returncode == 0, done.stderr[-4000:]
    compare_runs(reference, repo)


def test_killed_steps_rerun_to_identical_results(reference, tmp_path):
    """SIGKILL train (after a checkpoint), laplace and a jacobian shard, one per run; each
    rerun picks up where it stopped and the final results equal the uninterrupted run's."""
    repo = copy_checkout(tmp_path / "repo")
    pending, logs = {"train", "laplace", "jacobian"}, {}
    for _ in range(3):
        # train runs first; laplace and jacobian both wait only for it, in either order
        killed, text = run_killing(repo, {"train"} if "train" in pending else pending)
        assert killed in pending, text[-3000:]
        pending.discard(killed)
        logs[killed] = text
        if killed == "train":
            kept = list((repo / "results/model/checkpoints").glob("epoch-*"))
            assert kept and not (repo / "results/model/model.keras").exists()
        else:
            assert "resuming from checkpoint" in (repo / "results/logs/train.log").read_text()
    for step, text in logs.items():
        assert "Error in rule" in text and f"pipeline.steps.{step}" in text, text[-2000:]
    done = snakemake(repo, TARGET)
    assert done.returncode == 0, done.stderr[-4000:]
    compare_runs(reference, repo)


def test_bad_data_file_fails_the_data_job_with_its_message_logged(tmp_path):
    repo = copy_checkout(tmp_path / "repo")
    (repo / "broken.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 100)
    (repo / "fits_source.yaml").write_text(
        "data: {source: fits, fits: {path: broken.fits}}\n")
    done = snakemake(repo, TARGET, configs=(CONFIG, "fits_source.yaml"))
    assert done.returncode != 0
    assert "Error in rule data" in done.stderr
    log = (repo / "results/logs/data.log").read_text()
    assert "error: 'broken.fits': not a readable FITS file" in log
    assert "re-create or re-download it" in log and "Traceback" not in log
    assert not list((repo / "results").glob("data/*.fits"))


def test_corrupt_posterior_fails_predict_with_its_message_logged(reference, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(reference, repo, symlinks=True)
    posterior = repo / "results/laplace/posterior.npz"
    posterior.write_bytes(b"not a posterior\n" * 64)  # newer than the catalogs: they rerun
    done = snakemake(repo, TARGET)
    assert done.returncode != 0
    assert "Error in rule predict" in done.stderr
    corrupted = posterior.stat().st_mtime
    failed = [p for p in (repo / "results/logs/predict").glob("*.log")
              if p.stat().st_mtime > corrupted]  # logs of this run, not the reference's
    assert failed
    for log in failed:
        text = log.read_text()
        assert "posterior.npz': not a readable posterior file" in text, text[-2000:]
        assert "rerun the laplace step" in text and "Traceback" not in text
        # the stale catalog of the failed job is gone: nothing looks complete
        assert not list((repo / "results/predictions").glob(f"{log.stem}.*"))


# ----------------------------------------------------------------------------- report
def embedded_figures(report: str) -> dict[str, bytes]:
    """Figure name -> decoded PNG bytes of every figure embedded in a Snakemake report."""
    import base64
    import re

    pattern = (r'"results/figures/(\w+)\.png": \{.*?"caption": "(.*?)", .*?'
               r'"data_uri": "data:image/png;[^"]*?base64,([A-Za-z0-9+/=]+)"')
    return {name: (caption, base64.b64decode(data))
            for name, caption, data in re.findall(pattern, report, flags=re.S)}


def chromium_loads(images: dict[str, bytes], workdir: Path) -> int | None:
    """How many of ``images`` headless Chromium decodes (onload, naturalWidth > 0); None
    without Chromium."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return None
    tags = []
    for name, png in images.items():
        (workdir / f"{name}.png").write_bytes(png)
        tags.append(f'<img src="{name}.png" onload="done(this.naturalWidth > 0)" '
                    'onerror="done(false)">')
    page = workdir / "figures.html"
    page.write_text("<html><head><script>let seen = 0, ok = 0; function done(good) {"
                    f"seen += 1; ok += good ? 1 : 0; if (seen === {len(images)}) "
                    "document.title = 'loaded=' + ok;}</script></head><body>"
                    + "".join(tags) + "</body></html>")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={workdir / 'chromium'}", "--timeout=10000", "--dump-dom",
             page.as_uri()]
    dom = subprocess.run([browser, *flags], capture_output=True, text=True, timeout=120).stdout
    return int(dom.split("<title>loaded=")[1].split("<")[0]) if "loaded=" in dom else 0


def test_report_holds_every_figure_with_its_caption(reference, tmp_path):
    """The paper figures, then `snakemake --report`: every figure embedded with its caption,
    a valid PNG that a browser (headless Chromium, when installed) decodes."""
    import yaml

    figures = snakemake(reference)
    assert figures.returncode == 0, figures.stderr[-4000:]
    report = snakemake(reference, "--report", "results/report.html")
    assert report.returncode == 0, report.stderr[-4000:]
    captions = yaml.safe_load((reference / "docs/report/captions.yaml").read_text())
    found = embedded_figures((reference / "results/report.html").read_text())
    assert sorted(found) == sorted(captions)
    for _name, (caption, png) in found.items():
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
        assert len(caption) > 40, "every figure needs a real caption"
    loaded = chromium_loads({k: v[1] for k, v in found.items()}, tmp_path)
    if loaded is None:
        pytest.skip("Chromium is not installed: figures checked as PNG only")
    assert loaded == len(found)


# ------------------------------------------------------------------------------ paper
def test_paper_numbers_and_zip_report_from_the_run(reference):
    """The paper rules on the reference run: numbers.tex from the tables, datasets,
    benchmark files and catalog provenance the run wrote, a one-column journal PDF, and
    `--report NAME.zip` (Snakemake writes a zip archive when the name ends in .zip)."""
    import zipfile

    from pipeline.artifacts.latex_numbers import read_numbers, tex_to_text
    from pipeline.steps.paper import LABEL_MACRO, render_block

    targets = ("results/paper/numbers.tex", "results/paper/figures/training_curves.pdf")
    done = snakemake(reference, *targets)
    assert done.returncode == 0, done.stderr[-4000:]
    numbers = read_numbers(reference / targets[0])
    assert (numbers["ConfigName"], numbers["ConfigSeed"]) == ("tiny", "5")
    assert [numbers[f"NStars{s}"] for s in ("Train", "Valid", "Test")] == ["120", "60", "60"]
    metrics = json.loads((reference / "results/tables/metrics.json").read_text())
    for label, macro in LABEL_MACRO.items():  # 2 significant figures of the table's value
        shown = float(tex_to_text(numbers[f"{macro}RMSETest"]).split()[0])
        assert shown == pytest.approx(metrics["labels"][label]["rmse"], rel=0.05), label
    for rule in ("Data", "Train", "Laplace", "Predict", "Jacobian", "Tables"):
        assert re.fullmatch(r"[\d.]+\\,(s|min|h)", numbers[f"Runtime{rule}"]), rule
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", numbers["TensorFlowVersion"])
    assert "| Teff |" in render_block(numbers)
    report = snakemake(reference, *targets, "--report", "results/paper/report.zip")
    assert report.returncode == 0, report.stderr[-4000:]
    with zipfile.ZipFile(reference / "results/paper/report.zip") as archive:
        names = archive.namelist()
    for name in ("numbers.tex", "training_curves.pdf", "metrics.json", "report.html"):
        assert any(n.endswith(f"/{name}") for n in names), (name, names)
