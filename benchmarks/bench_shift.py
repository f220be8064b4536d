"""Error bars under distribution shift: flagged fraction and calibration of the unflagged stars.

For each shift of :data:`pipeline.spectra.shifts.SHIFTS` (line strengths x1.25, continuum x0.97
and a tilt, SNR 12, Teff above the training range, an RV of 5 km/s, a broader LSF, cosmic-ray
spikes, emission lines, another line forest) the pipeline's own commands run on temporary files:
``pipeline.steps.data`` / ``train`` / ``emulator`` / ``laplace`` fit a small model on the
generator (or ``--model-dir``/``--posterior`` reuse a run's), and ``pipeline.steps.predict``
gives every shifted star its labels, full error budget and FLAG. Reported per shift: the flagged
fraction (a star is flagged when ``FLAG & mask != 0``, mask default all bits) and, per label,
the z std and 68.3% coverage of the unflagged stars (``z = (pred - true) / LABEL_ERR``); the
in-distribution reference set, drawn the same way without a shift, is the baseline row.

Verdict per shift and label (the acceptance criterion of the shift suite): at least 90% of the
stars flagged, or the unflagged stars have z std <= 1.2 and coverage within 5 points of
68.3%. The reference row must have at most 2% flagged, z std in [0.9, 1.1] and coverage within
3 points. Sizes: ``--quick`` 2-3 minutes on 2 shared cores; the full size about 12 minutes. The rows
measure the small model trained here, not the default run (use ``--model-dir`` for that).

    python -m benchmarks --only shift [--quick]
    python -m benchmarks.bench_shift --quick [--model-dir results/model \
        --posterior results/laplace/posterior.npz --configfile config/config.yaml]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import row
from pipeline.config import scatter_uses_emulator
from pipeline.evaluation.shift import EMULATOR_FILE
from pipeline.spectra.shifts import LINES_SCALE

REPO = Path(__file__).resolve().parent.parent
NOMINAL = 68.27
Z_STD_RANGE = (0.9, 1.1)
"""Band of the z std of in-distribution stars (the reference set, a calibration cell)."""
COVERAGE_POINTS = 3.0
"""Largest distance of their 68.3% coverage from nominal, in percentage points."""
SHIFT_SEED = 2026
"""Entropy of the shifted and reference sets, unrelated to the training data's seeds."""
LINES_SET = f"lines_x{LINES_SCALE:g}"
LINES_CHANGE = LINES_SCALE - 1.0
"""The line-strength shift's fractional change of every optical depth, against which each
star's LINES_LIMIT is read."""

QUICK = {"n_train": 3000, "n_valid": 600, "n_shift": 500, "hidden": [64, 32], "epochs": 25}
FULL = {"n_train": 8000, "n_valid": 1500, "n_shift": 1500, "hidden": [256, 128, 32],
        "epochs": 40}


def bench_config(sizes: dict, configfile=None, existing_model: bool = False) -> dict:
    """The validated config: ``configfile`` as it is; else for an existing model the schema
    defaults (its data ranges and predict options); else config/quick.yaml resized."""
    from pipeline.config import load_config

    if configfile is not None or existing_model:
        return load_config(configfile)
    return load_config(REPO / "config" / "quick.yaml", overrides=[
        f"data.n_train={sizes['n_train']}", f"data.n_valid={sizes['n_valid']}",
        "data.n_test=1", f"model.hidden={json.dumps(sizes['hidden'])}",
        f"train.epochs={sizes['epochs']}", "laplace.last_layers=1"])


def _step(module: str, argv: list[str]) -> None:
    """Run ``python -m pipeline.steps.<module>`` in this process; fail loudly on exit != 0."""
    import importlib

    from pipeline.cli import main

    step = importlib.import_module(f"pipeline.steps.{module}")
    status = main(step.build_parser, step.run, argv)
    if status != 0:
        raise RuntimeError(f"pipeline.steps.{module} {' '.join(argv)} exited with {status}")


def fit_model(config: dict, workdir: Path, threads: int) -> tuple[Path, Path]:
    """data -> train -> emulator -> laplace with the pipeline's commands (the laplace step's
    scatter model takes the emulator's labels when ``laplace.scatter_emulator`` says so, as
    the Snakefile's rule does); the model dir (holding the emulator file of the shift flags)
    and the posterior."""
    cfg = ["--config-json", json.dumps(config), "--threads", str(threads)]
    data = workdir / "data"
    _step("data", [*cfg, "--outdir", str(data)])
    model = workdir / "model"
    splits = ["--train", str(data / "train.fits"), "--valid", str(data / "valid.fits")]
    _step("train", [*cfg, *splits, "--outdir", str(model)])
    _step("emulator", [*cfg, "--model", str(model), *splits, "--out", str(model / EMULATOR_FILE)])
    posterior = workdir / "posterior.npz"
    emulator = (["--emulator", str(model / EMULATOR_FILE)]
                if scatter_uses_emulator(config["laplace"]) else [])
    _step("laplace", [*cfg, "--model", str(model), *splits, *emulator, "--out", str(posterior)])
    return model, posterior


def write_sets(names, n: int, config: dict, wave: np.ndarray, outdir: Path) -> list[Path]:
    """The reference set and each shifted set as canonical FITS files ``<name>.fits``."""
    from pipeline.spectra import shifts
    from pipeline.spectra.fits import write_spectra

    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("reference", *names):
        spectra = (shifts.reference_spectra(n, SHIFT_SEED, config, wave) if name == "reference"
                   else shifts.shifted_spectra(name, n, SHIFT_SEED, config, wave))
        path = outdir / f"{name}.fits"
        write_spectra(path, spectra, {"SHIFT": name})
        paths.append(path)
    return paths


def shift_metrics(catalog, mask: int = -1) -> dict:
    """Flagged fraction (``FLAG & mask != 0``) and, per label, z mean, z std (about the mean,
    as in calibration.csv) and 68.3% coverage (``|z| < 1``, in percent) of the unflagged
    stars, from a prediction catalog with ``L``, ``L_ERR``, ``L_TRUE`` columns. A shift that
    biases the labels shows in z mean and coverage more than in z std."""
    from pipeline import LABELS
    from pipeline.evaluation.calibration import calibration_metrics

    flagged = (np.asarray(catalog["FLAG"]).astype(np.int64) & mask) != 0
    out = {"n": len(flagged), "flagged": 100.0 * float(flagged.mean())}
    keep = ~flagged
    for label in LABELS:
        m = calibration_metrics(np.asarray(catalog[label])[keep],
                                np.asarray(catalog[f"{label}_ERR"])[keep],
                                np.asarray(catalog[f"{label}_TRUE"])[keep], n_bins=5)
        out[label] = {"n": m["N"], "z_mean": m["Z_MEAN"], "z_std": m["Z_STD"],
                      "coverage": 100.0 * m["COVERAGE_68.3"]}
    if "LINES_LIMIT" in catalog.colnames:
        out["lines_limit"] = by_lines_limit(np.asarray(catalog["LINES_LIMIT"]), flagged)
    return out


def by_lines_limit(limit: np.ndarray, flagged: np.ndarray,
                   change: float = LINES_CHANGE) -> dict:
    """Stars whose LINES_LIMIT is below ``change`` (a line-strength change of that size
    reaches their line-strength threshold in expectation) and the rest: the percentage of
    stars below, and the flagged percentage of each group (NaN for an empty group)."""
    below = limit < change
    return {"below": 100.0 * float(below.mean()),
            **{key: 100.0 * float(flagged[group].mean()) if group.any() else float("nan")
               for key, group in (("flagged_below", below), ("flagged_above", ~below))}}


def in_band(z_std: float, coverage: float) -> bool:
    """Whether in-distribution stars are calibrated: z std in ``Z_STD_RANGE`` and coverage
    (percent) within ``COVERAGE_POINTS`` of 68.3%."""
    return bool(Z_STD_RANGE[0] <= z_std <= Z_STD_RANGE[1]
                and abs(coverage - NOMINAL) <= COVERAGE_POINTS)


def verdict(metrics: dict, label: str, reference: bool = False) -> bool:
    """The acceptance criterion (module docstring) of one label of one set."""
    m = metrics[label]
    if reference:
        return metrics["flagged"] <= 2.0 and in_band(m["z_std"], m["coverage"])
    if metrics["flagged"] >= 90.0:
        return True
    return bool(m["z_std"] <= 1.2 and abs(m["coverage"] - NOMINAL) <= 5.0)


def rows_of(results: dict) -> list[dict]:
    """Benchmark rows: per set a flagged-fraction row, per label a z-std row whose baseline is
    the reference set's z std (coverage and unflagged count in the name)."""
    from pipeline import LABELS

    ref = results["reference"]
    out = []
    for name, m in results.items():
        is_ref = name == "reference"
        out.append(row(f"shift {name}: flagged", m["flagged"], ref["flagged"], "% of stars",
                       m["flagged"] / ref["flagged"] if ref["flagged"] > 0 else None,
                       "<= 2" if is_ref else ">= 90 (or calibrated)",
                       m["flagged"] <= 2.0 if is_ref else None))
        if name == LINES_SET and "lines_limit" in m:
            out.append(row(lines_limit_text(name, m["lines_limit"]),
                           m["lines_limit"]["flagged_below"], m["lines_limit"]["flagged_above"],
                           "% of stars", None, "report (baseline: the other stars)", None))
        for label in LABELS:
            lab = m[label]
            ok = verdict(m, label, is_ref)
            if not np.isfinite(lab["z_std"]):  # every star flagged: nothing to calibrate
                out.append(row(f"shift {name} {label}: no unflagged stars", None, None, "z std",
                               None, "", ok))
                continue
            out.append(row(
                f"shift {name} {label}: unflagged z std (z mean {lab['z_mean']:+.2f}, "
                f"cov {lab['coverage']:.1f}%, n={lab['n']})",
                lab["z_std"], ref[label]["z_std"], "z std", lab["z_std"] / ref[label]["z_std"],
                "[0.9, 1.1], cov 68.3+-3" if is_ref else "<= 1.2, cov 68.3+-5", ok))
    return out


def summary(results: dict) -> str:
    """A Markdown table: one line per set, flagged %, z mean, z std and coverage per label,
    verdict."""
    from pipeline import LABELS

    head = ("| set | flagged % | " + " | ".join(f"{lab} z mean | {lab} z std | {lab} cov %"
                                                for lab in LABELS) + " | verdict |")
    lines = [head, "|" + "---|" * (3 + 3 * len(LABELS))]
    for name, m in results.items():
        cells = [f"{m[lab]['z_mean']:+.2f} | {m[lab]['z_std']:.2f} | {m[lab]['coverage']:.1f}"
                 for lab in LABELS]
        ok = all(verdict(m, lab, name == "reference") for lab in LABELS)
        lines.append(f"| {name} | {m['flagged']:.1f} | " + " | ".join(cells)
                     + f" | {'pass' if ok else 'FAIL'} |")
    if "lines_limit" in results.get(LINES_SET, {}):
        limit = results[LINES_SET]["lines_limit"]
        lines.append(f"\n{lines_limit_text(LINES_SET, limit)}: {limit['flagged_below']:.1f}% "
                     f"(the other stars: {limit['flagged_above']:.1f}%)")
    return "\n".join(lines)


def lines_limit_text(name: str, limit: dict) -> str:
    """What the LINES_LIMIT row measures."""
    return (f"shift {name}: flagged among the {limit['below']:.1f}% of its stars whose "
            f"LINES_LIMIT is below {LINES_CHANGE:g}")


def measure(sizes: dict, names=None, workdir=None, model_dir=None, posterior=None,
            configfile=None, threads: int = 2, mask: int = -1) -> dict:
    """Fit (or reuse) a model, predict every set with the pipeline, return the metrics by
    set name (``reference`` first)."""
    from pipeline.artifacts.catalog import read_table
    from pipeline.spectra import shifts

    names = list(shifts.SHIFTS) if names is None else list(names)
    unknown = sorted(set(names) - set(shifts.SHIFTS) - {"reference"})
    if unknown:
        raise ValueError(f"unknown shifts {unknown}: choose from {sorted(shifts.SHIFTS)}")
    names = [name for name in dict.fromkeys(names) if name != "reference"]  # always measured
    if (model_dir is None) != (posterior is None):
        raise ValueError("--model-dir and --posterior go together (the run's model directory "
                         "and its Laplace posterior .npz)")
    config = bench_config(sizes, configfile, existing_model=model_dir is not None)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        if model_dir is None:
            model_dir, posterior = fit_model(config, tmp, threads)
        wave = np.load(Path(model_dir) / "wave.npy")
        inputs = write_sets(names, sizes["n_shift"], config, wave, tmp / "sets")
        _step("predict", ["--config-json", json.dumps(config), "--threads", str(threads),
                          "--model", str(model_dir), "--posterior", str(posterior),
                          "--format", "fits", "--out", str(tmp / "catalogs"),
                          *map(str, inputs)])
        return {p.stem: shift_metrics(read_table(tmp / "catalogs" / f"{p.stem}.fits"), mask)
                for p in inputs}


def run(quick: bool = False, sizes: dict | None = None, names=None, workdir=None,
        model_dir=None, posterior=None, configfile=None, mask: int = -1) -> list[dict]:
    """Rows for benchmarks/run.py; the Markdown summary goes to stderr."""
    results = measure(sizes or (QUICK if quick else FULL), names, workdir, model_dir, posterior,
                      configfile, mask=mask)
    print(summary(results), file=sys.stderr)
    return rows_of(results)


if __name__ == "__main__":
    import argparse

    from benchmarks.run import table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--model-dir", help="trained model directory of an existing run")
    parser.add_argument("--posterior", help="its Laplace posterior (.npz)")
    parser.add_argument("--configfile", help="that run's config (predict options, data ranges)")
    parser.add_argument("--n", type=int, help="stars per set")
    parser.add_argument("--mask", type=lambda s: int(s, 0), default=-1,
                        help="FLAG bits that count as flagged (default: all)")
    parser.add_argument("--shifts", nargs="+", help="only these shifts (default: the suite)")
    args = parser.parse_args()
    sizes = dict(QUICK if args.quick else FULL)
    if args.n:
        sizes["n_shift"] = args.n
    print(table(run(sizes=sizes, names=args.shifts, model_dir=args.model_dir,
                    posterior=args.posterior, configfile=args.configfile, mask=args.mask)))
