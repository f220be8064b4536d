"""Peak memory of the streaming steps: it must not grow with the number of stars.

Each step runs in its own subprocess under a small wrapper that reads two peaks of the child:
its anonymous resident memory (RssAnon from /proc, polled every 20 ms: the arrays a step
allocates) and its high-water resident set (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``),
which also counts the file pages of memory maps: a writer that fills a memory-mapped FITS
(``SpectraWriter``) shows its whole output there, pages the kernel writes back and drops under
pressure. Rows compare a 10x larger input with the smaller one; a step that streams stars in
batches keeps its anonymous peak within ``RSS_TARGET`` of the small run (TensorFlow's own
~0.5 GB dominates both), one that holds the whole input grows ~linearly.

* ``jacobian``: ``python -m pipeline.steps.jacobian --shard 0 --shards 1`` on canonical FITS of
  ``small`` and ``large`` stars (written chunk by chunk with
  ``pipeline.spectra.fits.SpectraWriter``,
  flux ~ 1 with 1 % noise) with a small untrained dense model saved in the layout of
  ``pipeline.artifacts.model_dir.load_trained`` (model.keras, scaler.json, wave.npy).
* ``data``: ``python -m pipeline.steps.data`` generating the synthetic splits of ``small`` and
  ``large`` stars in all.
* ``train``: one epoch of ``python -m pipeline.steps.train`` (small dense network, batch 256) on
  20000 and 200000 training stars (plus a tenth as many validation stars) of a reduced grid,
  streamed from the memory-mapped files (``train.stream: true``, target <= 1.2x) and, as the
  baseline in the same run, read into memory (``train.stream: false``).

Command line, for the paper-size check recorded in docs/performance.md::

    python -m benchmarks.bench_memory --data-stars 60000 --train-epoch  # 50000 + 5000 + 5000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from benchmarks.common import row

RSS_TARGET = 1.2
SMALL_MODEL = (32, 16)
# Runs argv[1:], polls the child's anonymous resident memory (RssAnon: heap, arrays; not the
# file pages of a memory map, which the kernel can drop) every 20 ms, and prints the child's
# high-water RSS (ru_maxrss, all pages) and the largest RssAnon seen, both in KiB.
WRAPPER = """
import resource, subprocess, sys, time
child = subprocess.Popen(sys.argv[1:])
anon = 0
while child.poll() is None:
    try:
        with open(f"/proc/{child.pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    anon = max(anon, int(line.split()[1]))
    except OSError:
        pass
    time.sleep(0.02)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, anon)
sys.exit(child.returncode)
"""


class Peak(NamedTuple):
    """Peak memory of one child process, in MB, and its wall time in seconds."""

    rss: float  # high-water resident set, file-backed pages of memory maps included
    anon: float  # largest anonymous resident set seen (20 ms polling)
    seconds: float


def peak_rss(cmd: list[str], timeout: float = 600, cwd: Path | None = None) -> Peak:
    """Peak memory of ``python *cmd`` run to completion in a child process (Linux).

    Raises RuntimeError with the child's stderr tail if it fails.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", WRAPPER, sys.executable, *cmd],
                         capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {out.returncode}):\n"
                           f"{out.stderr[-2000:]}")
    rss_kib, anon_kib = map(int, out.stdout.strip().splitlines()[-1].split())
    return Peak(rss_kib / 1024.0, anon_kib / 1024.0, wall)


def grid(n_pixels: int | None) -> np.ndarray:
    """The synthetic APOGEE grid, or its first ``n_pixels`` pixels (smaller tests)."""
    from pipeline.spectra.synthetic import apogee_grid

    wave = apogee_grid()
    return wave if n_pixels is None else wave[:n_pixels]


def make_model_dir(path: Path, wave: np.ndarray, hidden=SMALL_MODEL) -> Path:
    """An untrained dense model with its scaler and grid, as the train step lays them out."""
    from pipeline.artifacts.model_dir import MODEL_FILE, SCALER_FILE, WAVE_FILE
    from pipeline.nn.model import build_model
    from pipeline.nn.scaler import LabelScaler

    path.mkdir(parents=True, exist_ok=True)
    if not (path / MODEL_FILE).is_file():
        build_model(wave.size, {"type": "dense", "hidden": list(hidden)}, 0).save(
            path / MODEL_FILE)
        LabelScaler(np.array([5000.0, 3.0, 0.0]), np.array([800.0, 1.0, 0.4])).save(
            path / SCALER_FILE)
        np.save(path / WAVE_FILE, wave)
    return path


def make_dataset(path: Path, n_stars: int, wave: np.ndarray, chunk: int = 1000) -> Path:
    """A canonical FITS of ``n_stars`` noisy flat spectra, streamed (memory of one chunk)."""
    from astropy.table import Table

    from pipeline.spectra.fits import SpectraWriter

    if path.is_file():
        return path
    rng = np.random.default_rng(n_stars)
    labels = Table({"STAR_ID": [f"BENCH-{i:07d}" for i in range(n_stars)],
                    "TEFF": rng.uniform(4000, 6000, n_stars), "LOGG": rng.uniform(1, 5, n_stars),
                    "FE_H": rng.uniform(-1, 0.3, n_stars)})
    with SpectraWriter(path, wave, labels, {"ORIGIN": "benchmarks.bench_memory"}) as out:
        for start in range(0, n_stars, chunk):
            n = min(chunk, n_stars - start)
            flux = 1.0 + 0.01 * rng.standard_normal((n, wave.size), dtype=np.float32)
            out.write(start, flux, np.full((n, wave.size), 0.01, np.float32))
    return path


def peak_rows(step: str, sizes: tuple[int, int], peaks: list[Peak], what: str) -> list[dict]:
    """Two rows: anonymous memory (the target) and high-water RSS (file pages included)."""
    anon, rss = peaks[1].anon / peaks[0].anon, peaks[1].rss / peaks[0].rss
    tag = f"{step} step, {sizes[1]} vs {sizes[0]} {what}"
    return [
        row(f"peak anonymous memory of {tag} ({peaks[1].seconds:.0f} s vs "
            f"{peaks[0].seconds:.0f} s)", peaks[1].anon, peaks[0].anon, "MB", anon,
            f"<= {RSS_TARGET:g}x", bool(anon <= RSS_TARGET)),
        row(f"peak RSS incl. memory-mapped file pages of {tag}", peaks[1].rss, peaks[0].rss,
            "MB", rss, "report", None),
    ]


def jacobian_rows(root: Path, sizes: tuple[int, int], wave: np.ndarray,
                  chunk: int | None = None) -> list[dict]:
    """Rows of the jacobian step; ``chunk`` overrides ``jacobian.chunk_size`` (stars read at a
    time, default 2048): both sizes must be at least one chunk for a fair comparison."""
    model_dir = make_model_dir(root / f"model-{wave.size}", wave)
    options = [] if chunk is None else ["--set", f"jacobian.chunk_size={chunk}"]
    peaks = []
    for n in sizes:
        data = make_dataset(root / f"stars-{n}-{wave.size}.fits", n, wave)
        out = root / f"jacobian-{n}.fits"
        peaks.append(peak_rss(["-m", "pipeline.steps.jacobian", "--model", str(model_dir),
                               "--format", "fits", "--shard", "0", "--shards", "1",
                               "--out", str(out), *options, str(data)]))
        out.unlink(missing_ok=True)  # (n, 3, P) float32: 1.7 GB for 20k stars
    what = f"stars x {wave.size} px" + ("" if chunk is None else f", chunk {chunk}")
    return peak_rows("jacobian", sizes, peaks, what)


def data_step(root: Path, n_stars: int, keep: bool = False, chunk: int | None = None) -> Peak:
    """Peak memory of ``python -m pipeline.steps.data`` writing ``n_stars`` synthetic stars in all
    (5/6 train, 1/12 valid, 1/12 test, the paper's 50000 + 5000 + 5000 proportions) into
    ``root/data-<n_stars>``, deleted afterwards unless ``keep``; ``chunk`` overrides
    ``data.synthetic.chunk_size`` (default 1000)."""
    n_valid = max(1, n_stars // 12)
    data = {"n_train": n_stars - 2 * n_valid, "n_valid": n_valid, "n_test": n_valid}
    if chunk is not None:
        data["synthetic"] = {"chunk_size": chunk}
    outdir = root / f"data-{n_stars}"
    try:
        return peak_rss(["-m", "pipeline.steps.data", "--config-json", json.dumps({"data": data}),
                         "--outdir", str(outdir)], timeout=1800)
    finally:
        for split in outdir.glob("*.fits") if not keep else ():
            split.unlink()


def train_step(root: Path, data_dir: Path, epochs: int = 1, stream: bool = True,
               batch_size: int = 64) -> Peak:
    """Peak memory of ``python -m pipeline.steps.train`` for ``epochs`` epochs of the small dense
    network on ``data_dir/{train,valid}.fits`` (the data, not the network, sets the memory);
    ``stream`` is config ``train.stream`` (False: both files read into memory first)."""
    config = {"model": {"hidden": list(SMALL_MODEL)},
              "train": {"epochs": epochs, "stream": stream, "batch_size": batch_size}}
    outdir = root / f"model-trained-{data_dir.name}-{'stream' if stream else 'memory'}"
    return peak_rss(["-m", "pipeline.steps.train", "--config-json", json.dumps(config),
                     "--train", str(data_dir / "train.fits"), "--valid",
                     str(data_dir / "valid.fits"), "--outdir", str(outdir)], timeout=3600)


def train_rows(root: Path, sizes: tuple[int, int], wave: np.ndarray,
               batch_size: int = 256) -> list[dict]:
    """One epoch of the train step on ``sizes`` training stars (plus a tenth as many validation
    stars), streamed (``train.stream: true``, the target: flat) and read into memory (the
    baseline, measured in the same run: it grows with the stars)."""
    peaks = {}
    for n in sizes:
        data_dir = root / f"train-{n}-{wave.size}"
        data_dir.mkdir(exist_ok=True)
        make_dataset(data_dir / "train.fits", n, wave)
        make_dataset(data_dir / "valid.fits", max(1, n // 10), wave)
        for stream in (True, False):
            peaks[n, stream] = train_step(root, data_dir, stream=stream, batch_size=batch_size)
        for split in data_dir.glob("*.fits"):
            split.unlink()
    small, large = sizes
    tag = f"train step, 1 epoch, {large} vs {small} training stars x {wave.size} px"
    streamed = peaks[large, True].anon / peaks[small, True].anon
    in_memory = peaks[large, False].anon / peaks[small, False].anon
    return [
        row(f"peak anonymous memory of {tag}, streamed ({peaks[large, True].seconds:.0f} s vs "
            f"{peaks[small, True].seconds:.0f} s)", peaks[large, True].anon,
            peaks[small, True].anon, "MB", streamed, f"<= {RSS_TARGET:g}x",
            bool(streamed <= RSS_TARGET)),
        row(f"peak anonymous memory of {tag}, read into memory (train.stream: false; "
            f"{peaks[large, False].seconds:.0f} s vs {peaks[small, False].seconds:.0f} s)",
            peaks[large, False].anon, peaks[small, False].anon, "MB", in_memory, "report", None),
        row(f"peak anonymous memory at {large} training stars x {wave.size} px, streamed vs "
            "read into memory", peaks[large, True].anon, peaks[large, False].anon, "MB",
            peaks[large, True].anon / peaks[large, False].anon, "report (< 1: streaming saves)",
            None),
    ]


def data_rows(root: Path, sizes: tuple[int, int], chunk: int | None = None) -> list[dict]:
    peaks = [data_step(root, n, chunk=chunk) for n in sizes]
    rate = sizes[1] / peaks[1].seconds
    what = "synthetic stars" + ("" if chunk is None else f", chunk {chunk}")
    return peak_rows("data", sizes, peaks, f"{what} ({rate:.0f} stars/s incl. start-up)")


def run(quick: bool, sizes: tuple[int, int] | None = None, n_pixels: int | None = None,
        workdir: str | Path | None = None, train_sizes: tuple[int, int] | None = None,
        train_pixels: int | None = None) -> list[dict]:
    """Benchmark rows; ``sizes`` (small, large) stars and ``n_pixels`` shrink it for tests.

    The full run uses the default chunk sizes (2000 and 20000 stars, each at least about one
    chunk); smaller runs shrink the chunks so that the small size still fills one. The train
    step runs on ``train_sizes`` (default 20000 and 200000) training stars of the first
    ``train_pixels`` pixels (default 256 in quick mode, 1024 in full: 0.2 and 0.8 GB per image
    at 200000 stars, so that the in-memory baseline visibly grows while the run takes minutes).
    """
    train_sizes = train_sizes or (20000, 200000)
    train_pixels = train_pixels or (256 if quick else 1024)
    sizes = sizes or ((300, 3000) if quick else (2000, 20000))
    small_run = quick or sizes[0] < 2000
    jacobian_chunk = max(1, sizes[0] // 2) if small_run else None
    data_chunk = max(1, sizes[0] // 12) if small_run else None
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=workdir) as tmp:
        root = Path(tmp)
        rows = jacobian_rows(root, sizes, grid(n_pixels), jacobian_chunk)
        if n_pixels is None:  # the data step always writes the full grid
            rows += data_rows(root, sizes, data_chunk)
        rows += train_rows(root, train_sizes, grid(train_pixels))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-stars", type=int, default=60000,
                        help="stars of the data-step run (train + valid + test)")
    parser.add_argument("--train-epoch", action="store_true",
                        help="then train one epoch of a small dense network on those splits")
    parser.add_argument("--workdir", help="where the temporary files go (default: $TMPDIR)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=args.workdir) as tmp:
        root = Path(tmp)
        peak = data_step(root, args.data_stars, keep=args.train_epoch)
        print(f"data step, {args.data_stars} stars: peak anonymous memory {peak.anon:.0f} MB, "
              f"peak RSS incl. memory-mapped file pages {peak.rss:.0f} MB, {peak.seconds:.0f} s",
              flush=True)
        if args.train_epoch:
            peak = train_step(root, root / f"data-{args.data_stars}")
            print(f"train step, 1 epoch, hidden {SMALL_MODEL}: peak anonymous memory "
                  f"{peak.anon:.0f} MB, peak RSS {peak.rss:.0f} MB, {peak.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
