"""Labelling a survey: generated spectra through predict (full 3x3 error budget and flags) and
the sharded input Jacobians, streamed, as the Snakemake path ``predict.inputs`` runs them.

Rows (each step in its own subprocess, peaks read as in bench_memory):

* ``predict``: ``python -m pipeline.predict --format fits`` on ``small`` and ``large`` stars
  (with the model directory's shift reference, so every shift statistic is computed);
  the anonymous peak of the large run against the small one (target <= 1.2: only the catalog
  rows, ~0.2 kB a star, accumulate).
* ``jacobian``: ``python -m pipeline.steps.jacobian`` in two shards (run one after the other,
  as two jobs would on one core each); peak of the larger shard job, large vs small.
* throughput: marginal stars per second of predict + both Jacobian shards, (N_large - N_small)
  over the difference of their wall times (start-up and model loading cancel), and the
  projected time for 650,000 stars (APOGEE DR17) at that rate.
  Also the marginal stars per second of predict alone.
* ``predict_catalog`` (error budget, shift statistics against an emulator, flags, catalog
  table), and the error budget alone (with a scatter model that takes the emulator offset,
  the emulator fit of the best-fit labels it needs, not the other shift statistics), against
  ``input_jacobian`` alone on the same 2048 stars
  of the full 7213-pixel grid, in this process (target <= 1.5: the flux-noise term needs each
  star's Jacobian, so the Jacobian is the floor), and predict_catalog's stars per second.

Sizes: full mode 20000 and 200000 stars of the 7213-pixel grid through the reference network
(2048-1024-512-256-128-32, a last-2-layer Laplace posterior): 29 minutes on 2 idle cores and
about 30 GB of temporary files (the 200000-star FITS, 11.5 GB, and two Jacobian shards of 8.7 GB),
so run it alone on a free machine; quick mode 2000 and 20000 stars of 512 pixels and a 32-16 network
for the subprocess rows, the quick config's 64-32-16 network on 7213 pixels for the ratio row:
minutes. The models are untrained (timing and memory do not depend on the weights); each
posterior is fitted on 512 generated stars.

    python -m benchmarks --only survey            # full size
    python -m benchmarks.bench_survey --quick     # minutes
    python -m benchmarks.bench_survey --ratio-only --reference --n 1024   # the ratio rows
    python -m benchmarks.bench_survey --ratio-only --results results --n 1024  # a trained run
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from benchmarks.bench_memory import RSS_TARGET, SMALL_MODEL, grid, make_dataset, peak_rss
from benchmarks.common import best_time, row

REFERENCE = (2048, 1024, 512, 256, 128, 32)
QUICK_CONFIG = (64, 32, 16)  # config/quick.yaml's network
DR17_STARS = 650_000
RATIO_TARGET = 1.5


def make_model_and_posterior(root: Path, wave: np.ndarray, hidden) -> tuple[Path, Path]:
    """An untrained model directory with a shift reference (``emulator.npz``: emulator and
    thresholds fitted on 400 + 150 generated stars, as the emulator step fits them, so predict
    computes every shift statistic as on a survey) and a last-2-layer Laplace posterior."""
    from benchmarks.bench_memory import make_model_dir
    from pipeline.artifacts.model_dir import load_trained
    from pipeline.config import validate
    from pipeline.evaluation.shift import EMULATOR_FILE, fit_reference
    from pipeline.laplace import fit_laplace
    from pipeline.spectra.validation import bad_pixel_mask

    model_dir = make_model_dir(root / "model", wave, hidden)
    model, scaler, _ = load_trained(model_dir)
    rng = np.random.default_rng(1)
    x = (1.0 + 0.01 * rng.standard_normal((512, wave.size))).astype(np.float32)
    z = np.asarray(model(x[:512], training=False), np.float64) + 0.1 * rng.standard_normal(
        (512, 3))
    posterior = root / "posterior.npz"
    fit_laplace(model, x, z, last_layers=2, device="cpu").save(posterior)
    config = validate({})
    train, valid = generated(400, 4, wave, config), generated(150, 5, wave, config)
    good = [~bad_pixel_mask(s, config["data"]["bad_pixel_err"]) for s in (train, valid)]
    fit_reference(model, train, valid, *good, valid.label_array(),
                  config["emulator"]).save(model_dir / EMULATOR_FILE)
    return model_dir, posterior


def step_peaks(root: Path, n: int, wave: np.ndarray, model_dir: Path, posterior: Path,
               options: list[str]):
    """Peaks of predict and of the two Jacobian shard jobs on ``n`` generated stars."""
    data = make_dataset(root / f"survey-{n}.fits", n, wave)
    predict = peak_rss(["-m", "pipeline.predict", "--model", str(model_dir), "--posterior",
                        str(posterior), "--format", "fits", "--name", f"survey-{n}", "--out",
                        str(root / "catalogs"), *options, str(data)], timeout=36000)
    shards = [peak_rss(["-m", "pipeline.steps.jacobian", "--model", str(model_dir), "--format",
                        "fits", "--shard", str(i), "--shards", "2", "--out",
                        str(root / f"shard-{i}.fits"), *options, str(data)], timeout=36000)
              for i in range(2)]
    for i in range(2):
        (root / f"shard-{i}.fits").unlink(missing_ok=True)  # (n, 3, P) float32 each
    data.unlink()
    return predict, shards


def generated(n: int, seed: int, wave: np.ndarray, config: dict):
    """``n`` generated spectra with bad pixels set as the data step sets them."""
    from pipeline.spectra.synthetic import generate

    spectra = generate(n, seed, wave=wave)
    spectra.flux_err[~(spectra.flux_err > 0)] = config["data"]["bad_pixel_err"]
    spectra.flux[spectra.flux_err >= config["data"]["bad_pixel_err"]] = 1.0
    return spectra


def budget_vs_jacobian(model_dir: Path, posterior: Path, wave: np.ndarray, n: int,
                       batch_size: int, repeat: int = 3,
                       spectra=None) -> tuple[float, float, float]:
    """Best times of ``predict_catalog`` (error budget, shift statistics against the model
    directory's emulator, flags, catalog table), of the error budget alone
    (``mixture_budget``: prediction, model, scatter and flux-noise covariances; with a scatter
    model that takes the emulator offset, the emulator fit of the labels it needs too,
    ``ShiftReference.best_fit_only``) and of
    ``input_jacobian`` alone on the same stars (``spectra``, else ``n`` generated ones),
    interleaved so all see the same load of shared cores. The Jacobian pass is compiled as
    the predict step compiles it (``inference_jit``)."""
    from pipeline.config import validate
    from pipeline.nn.derivatives import set_jit_compile
    from pipeline.runtime import gpu_visible

    config = validate({"predict": {"batch_size": batch_size}})
    # the predict step's Jacobian pass, XLA-compiled as config inference_jit says (auto: on
    # without a GPU), for every timed path alike; the caller's setting restored after
    previous = set_jit_compile(not gpu_visible() if config["inference_jit"] == "auto"
                               else config["inference_jit"])
    try:
        return _best_times(model_dir, posterior, wave, n, batch_size, repeat, spectra, config)
    finally:
        set_jit_compile(previous)


def _best_times(model_dir, posterior, wave, n, batch_size, repeat, spectra, config):
    """The best times of :func:`budget_vs_jacobian` under the compile setting in force."""
    from pipeline.artifacts.model_dir import load_trained
    from pipeline.evaluation.shift import EMULATOR_FILE, ShiftReference
    from pipeline.laplace import Posterior
    from pipeline.laplace.error_budget import needs_emulator
    from pipeline.nn.derivatives import input_jacobian
    from pipeline.steps.predict import mixture_budget, predict_catalog

    model, scaler, _ = load_trained(model_dir)
    post = Posterior.load(posterior, model)
    spectra = generated(n, 3, wave, config) if spectra is None else spectra
    reference = ShiftReference.load(model_dir / EMULATOR_FILE)
    run_full = lambda: predict_catalog(model, post, scaler, spectra, False, config,  # noqa: E731
                                       reference)
    needs = reference.best_fit_only() if needs_emulator(post) else None
    run_budget = lambda: mixture_budget([(model, post, scaler)], spectra, config,  # noqa: E731
                                        reference=needs)
    run_alone = lambda: input_jacobian(model, spectra.flux, batch_size=batch_size,  # noqa: E731
                                       scaler=scaler)
    runs = (run_full, run_budget, run_alone)
    for run in runs:  # traces
        run()
    best = [np.inf] * len(runs)
    for _ in range(repeat):
        best = [min(b, best_time(run, 1)) for b, run in zip(best, runs, strict=True)]
    return tuple(best)


def marginal_rate(sizes: tuple[int, int], seconds: list[float]) -> tuple[float, float]:
    """(stars per second, start-up seconds) from the wall times of two star counts: the rate
    of the extra stars, so start-up and model loading cancel. When load on shared cores
    swamped the difference, the large run's rate with its start-up included."""
    if seconds[1] > seconds[0]:
        rate = (sizes[1] - sizes[0]) / (seconds[1] - seconds[0])
        return rate, seconds[0] - sizes[0] / rate
    return sizes[1] / seconds[1], 0.0


def run(quick: bool, sizes: tuple[int, int] | None = None, n_pixels: int | None = None,
        hidden=None, workdir: str | Path | None = None,
        ratio_network: tuple[int | None, tuple] | None = None) -> list[dict]:
    """Benchmark rows (module docstring); arguments shrink it for tests. ``ratio_network``:
    (pixels, hidden) of the network of the predict_catalog / input_jacobian row, by default
    the full grid with the quick config's network (quick) or the reference network."""
    sizes = sizes or ((2000, 20000) if quick else (20000, 200000))
    n_pixels = n_pixels or (512 if quick else None)
    hidden = hidden or (SMALL_MODEL if quick else REFERENCE)
    ratio_pixels, ratio_hidden = ratio_network or (None, QUICK_CONFIG if quick else REFERENCE)
    wave = grid(n_pixels)
    batch = 256
    # both sizes at least a few chunks, so the large run is not just "one more chunk"
    chunk = min(2048, max(batch, sizes[0] // 4 // batch * batch))
    options = ["--set", f"predict.chunk_size={chunk}", "--set", f"jacobian.chunk_size={chunk}"]
    n_ratio = min(sizes[0], 2048)
    with tempfile.TemporaryDirectory(prefix="bench-survey-", dir=workdir) as tmp:
        root = Path(tmp)
        model_dir, posterior = make_model_and_posterior(root, wave, hidden)
        (small_p, small_j), (large_p, large_j) = (
            step_peaks(root, n, wave, model_dir, posterior, options) for n in sizes)
        ratio = ratio_rows(root, ratio_pixels, ratio_hidden, n_ratio, batch)
    tag = f"{sizes[1]} vs {sizes[0]} stars x {wave.size} px, hidden {'-'.join(map(str, hidden))}"
    p_ratio = large_p.anon / small_p.anon
    j_small, j_large = (max(p.anon for p in shards) for shards in (small_j, large_j))
    seconds = [p.seconds + sum(s.seconds for s in shards)
               for p, shards in ((small_p, small_j), (large_p, large_j))]
    rate, start_up = marginal_rate(sizes, seconds)
    predict_rate, _ = marginal_rate(sizes, [small_p.seconds, large_p.seconds])
    projected = (start_up + DR17_STARS / rate) / 3600
    return [
        row(f"survey: peak anonymous memory of predict (error budget + flags), {tag} "
            f"({large_p.seconds:.0f} s vs {small_p.seconds:.0f} s)", large_p.anon, small_p.anon,
            "MB", p_ratio, f"<= {RSS_TARGET:g}x", bool(p_ratio <= RSS_TARGET)),
        row(f"survey: peak anonymous memory of a jacobian shard job (2 shards), {tag}",
            j_large, j_small, "MB", j_large / j_small, f"<= {RSS_TARGET:g}x",
            bool(j_large / j_small <= RSS_TARGET)),
        row(f"survey: marginal throughput of predict + 2 jacobian shards, {tag} "
            f"({seconds[1]:.0f} s vs {seconds[0]:.0f} s in all)", rate, None, "stars/s", None,
            "report", None),
        row(f"survey: projected time for {DR17_STARS} stars at that rate on this machine "
            f"(start-up {start_up:.0f} s)", projected, None, "h", None, "report", None),
        row(f"survey: marginal throughput of predict alone (error budget, shift statistics, "
            f"flags, catalog written chunk by chunk), {tag}", predict_rate, None, "stars/s",
            None, "report", None),
        *ratio,
    ]


def ratio_rows(root: Path, pixels: int | None, hidden, n: int, batch: int = 256) -> list[dict]:
    """The predict_catalog / input_jacobian row and the throughput row, for an untrained
    network of ``hidden`` units on ``pixels`` (None: the full grid) with a last-2-layer
    posterior, on ``n`` stars."""
    wave = grid(pixels)
    model_dir, posterior = make_model_and_posterior(root / "ratio", wave, hidden)
    return ratio_table(*budget_vs_jacobian(model_dir, posterior, wave, n, batch), n,
                       f"{n} stars x {wave.size} px, hidden {'-'.join(map(str, hidden))}, "
                       f"batch {batch}, inference_jit auto")


def ratio_table(full: float, budget: float, alone: float, n: int, tag: str) -> list[dict]:
    """The ratio rows (predict_catalog, the error budget alone) and the throughput row from
    the best times on ``n`` stars."""
    return [
        row(f"survey: predict_catalog (error budget + shift statistics + flags) vs "
            f"input_jacobian alone, {tag}", full, alone, "s", full / alone,
            f"<= {RATIO_TARGET:g}x", bool(full / alone <= RATIO_TARGET)),
        row(f"survey: error budget alone (prediction, model, scatter with the emulator labels "
            f"it needs, flux-noise covariances) vs input_jacobian alone, {tag}", budget, alone,
            "s", budget / alone,
            f"<= {RATIO_TARGET:g}x", bool(budget / alone <= RATIO_TARGET)),
        row(f"survey: predict_catalog throughput in one process, {tag}", n / full, n / alone,
            "stars/s", None, "report (baseline: input_jacobian)", None),
    ]


def trained_ratio_rows(results: Path, n: int, batch: int = 256) -> list[dict]:
    """The rows of :func:`ratio_rows` on a finished run: its trained model, emulator and
    posterior, and the first ``n`` stars of its test split: what a survey meets, where the
    untrained network's outputs need not resemble real labels (its ratio came out lower, 2.0x
    against 2.3x, benchmarks/RESULTS.md)."""
    from pipeline.spectra.fits import read_spectra

    spectra = read_spectra(results / "data" / "test.fits")
    spectra = spectra.subset(np.arange(min(n, spectra.n_stars)))
    times = budget_vs_jacobian(results / "model", results / "laplace" / "posterior.npz",
                               spectra.wave, spectra.n_stars, batch, spectra=spectra)
    return ratio_table(*times, spectra.n_stars,
                       f"{spectra.n_stars} test stars of {results}, its trained model, "
                       f"batch {batch}, inference_jit auto")


if __name__ == "__main__":
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.run import table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes)")
    parser.add_argument("--ratio-only", action="store_true",
                        help="only the predict_catalog / input_jacobian rows (seconds)")
    parser.add_argument("--reference", action="store_true",
                        help="with --ratio-only: the reference network, not the quick one")
    parser.add_argument("--n", type=int, default=2048, help="stars of the ratio rows")
    parser.add_argument("--results", type=Path,
                        help="with --ratio-only: a finished run's results directory (its "
                             "trained model and test stars instead of generated ones)")
    args = parser.parse_args()
    if args.ratio_only and args.results:
        rows = trained_ratio_rows(args.results, args.n)
    elif args.ratio_only:
        with tempfile.TemporaryDirectory(prefix="bench-survey-") as tmp:
            rows = ratio_rows(Path(tmp), None, REFERENCE if args.reference else QUICK_CONFIG,
                              args.n)
    else:
        rows = run(quick=args.quick)
    print(table(rows))
