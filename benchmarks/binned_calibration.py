"""Calibration per SNR bin and per label region on many new in-distribution stars: miscalibration
or noise?

    python -m benchmarks.binned_calibration --model-dir results/model \
        --posterior results/laplace/posterior.npz [--n 15000] [--bins 5] [--label-bins 3]

On the 1500-star test split a SNR bin holds 300 stars, whose 68.3% coverage strays by 2.7
points (one standard error) by chance alone, so the target "within 3 points in every bin" is
missed in about a quarter of the (bin, label) cells of perfectly calibrated errors. Here
``n`` new stars are drawn as the shift suite's in-distribution reference set is (the
generator with the run's label and SNR distributions and another seed,
``pipeline.spectra.shifts.reference_spectra``), labelled by ``pipeline.predict`` with the
run's model, posterior and emulator, and grouped as calibration.csv groups them
(``pipeline.steps.tables.calibration_groups``): ``bins`` equal-count SNR bins and
``label_bins`` equal-count bins of each predicted label. Printed per group, bin and label:
stars, z std and 68.3% coverage with their standard errors, and whether the cell meets the
target (z std in [0.9, 1.1], coverage within 3 points); then the flagged fraction (target
<= 2%), the cells that miss and how many would miss by chance with calibrated errors (from
the standard errors: a cell fails by chance with probability 1 - (1 - p_z)(1 - p_cov)).
Writes nothing outside a temporary directory unless ``--keep DIR``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import norm

from benchmarks.bench_shift import (
    COVERAGE_POINTS,
    Z_STD_RANGE,
    _step,
    bench_config,
    in_band,
    write_sets,
)

SET_NAME = "reference"  # the in-distribution set of the shift suite (write_sets)


def chance_of_missing(n: int) -> float:
    """Probability that a cell of ``n`` calibrated stars misses the target by noise alone."""
    from pipeline.evaluation.calibration import sampling_errors

    se = sampling_errors(n)
    p_z = 2 * norm.sf((Z_STD_RANGE[1] - 1.0) / se["Z_STD_SE"])
    p_cov = 2 * norm.sf(COVERAGE_POINTS / (100.0 * se["COVERAGE_68.3_SE"]))
    return float(1 - (1 - p_z) * (1 - p_cov))


def bin_rows(catalog, n_bins: int, label_bins: int = 1) -> list[dict]:
    """Per group (SNR, then each label's predicted value), bin and label: N, z std, coverage
    (percent), their standard errors, verdict, chance of missing."""
    from pipeline import LABELS
    from pipeline.evaluation.calibration import calibration_metrics
    from pipeline.steps.tables import calibration_groups

    snr = np.asarray(catalog["SNR"], np.float64)
    config = {"tables": {"snr_bins": n_bins, "label_bins": label_bins}}
    rows = []
    for group, name, lo, hi, index in calibration_groups(catalog, snr, config)[1:]:
        for label in LABELS:
            m = calibration_metrics(*(np.asarray(catalog[c], np.float64)[index]
                                      for c in (label, f"{label}_ERR", f"{label}_TRUE")), 5)
            cov = 100.0 * m["COVERAGE_68.3"]
            rows.append({"group": group, "bin": name, "range": (lo, hi), "label": label,
                         "n": m["N"], "z_std": m["Z_STD"], "z_std_se": m["Z_STD_SE"],
                         "coverage": cov, "coverage_se": 100.0 * m["COVERAGE_68.3_SE"],
                         "ok": in_band(m["Z_STD"], cov),
                         "chance": chance_of_missing(m["N"])})
    return rows


def report(rows: list[dict], flagged: float) -> str:
    """The Markdown table and the summary lines."""
    lines = ["| group | bin | range | label | N | z std | coverage % | target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['bin']} | {r['range'][0]:.4g} to {r['range'][1]:.4g}"
                     f" | {r['label']} | "
                     f"{r['n']} | {r['z_std']:.3f} +- {r['z_std_se']:.3f} | "
                     f"{r['coverage']:.1f} +- {r['coverage_se']:.1f} | "
                     f"{'ok' if r['ok'] else 'MISS'} |")
    missed = sum(not r["ok"] for r in rows)
    lines += ["", f"flagged: {flagged:.2f}% of the stars (target <= 2%)",
              f"cells missing the target: {missed} of {len(rows)}; expected by chance with "
              f"calibrated errors: {sum(r['chance'] for r in rows):.1f}"]
    return "\n".join(lines)


def measure(model_dir: Path, posterior: Path, n: int, n_bins: int, label_bins: int = 1,
            configfile=None, threads: int = 2, workdir=None, keep=None
            ) -> tuple[list[dict], float]:
    """Draw, label and bin ``n`` in-distribution stars; (rows, flagged percent). ``keep``: a
    directory that keeps the spectra (``sets/``) and the catalog (``catalogs/``), e.g. for
    ``benchmarks.scatter_refit --catalog``; else a temporary one."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        return _measure(Path(model_dir), Path(posterior), n, n_bins, label_bins, configfile,
                        threads, Path(keep) if keep else Path(tmp))


def _measure(model_dir, posterior, n, n_bins, label_bins, configfile, threads, root):
    from pipeline.artifacts.catalog import read_table

    config = bench_config({}, configfile, existing_model=True)
    (path,) = write_sets((), n, config, np.load(model_dir / "wave.npy"), root / "sets")
    _step("predict", ["--config-json", json.dumps(config), "--threads", str(threads),
                      "--model", str(model_dir), "--posterior", str(posterior),
                      "--format", "fits", "--out", str(root / "catalogs"), str(path)])
    catalog = read_table(root / "catalogs" / f"{SET_NAME}.fits")
    flagged = 100.0 * float((np.asarray(catalog["FLAG"]) != 0).mean())
    return bin_rows(catalog, n_bins, label_bins), flagged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="a run's model directory")
    parser.add_argument("--posterior", required=True, help="its Laplace posterior (.npz)")
    parser.add_argument("--configfile", help="that run's config (default: the schema's)")
    parser.add_argument("--n", type=int, default=15000, help="stars to draw (default 15000)")
    parser.add_argument("--bins", type=int, default=5, help="equal-count SNR bins (default 5, "
                        "as tables.snr_bins)")
    parser.add_argument("--label-bins", type=int, default=3, help="equal-count bins of each "
                        "predicted label (default 3, as tables.label_bins; 1: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", help="directory to keep the spectra and the catalog in "
                        "(catalogs/reference.fits; default: a temporary one)")
    args = parser.parse_args(argv)
    rows, flagged = measure(args.model_dir, args.posterior, args.n, args.bins,
                            args.label_bins, args.configfile, args.threads, keep=args.keep)
    print(report(rows, flagged))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
