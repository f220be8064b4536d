"""Refit the scatter model offline from a run's catalogs: two covariates, labels, squares, offset.

    python -m benchmarks.scatter_refit --results results [--min-stars 100] [--hinge-scan]
        [--catalog new_stars.fits [--fit-sizes 900 3000]]

Reads ``predictions/valid.fits`` and ``predictions/test.fits`` (columns L, L_TRUE,
L_ERR_MODEL, L_ERR_NOISE, SNR, L_EMULATOR) and ``model/scaler.json`` of a finished run, refits
the scatter model (``pipeline.laplace.scatter.fit_scatter``, default ridge and cap) on the
validation stars with u = [log model std, log noise std], with the predicted labels added, with
their squares too, and with the offset from the emulator's best-fit labels too
(``laplace.scatter_labels`` false, degree 1, degree 2, ``laplace.scatter_emulator``; the last
only when the catalogs have the emulator's labels), and prints for the test
stars, per label: the std of z = r / sqrt(s^2 + m^2 + e^2) and the fraction with |z| < 1
(0.683 for a calibrated Gaussian) and the excess kurtosis of z (0 for a Gaussian), over all
stars, in SNR quintiles of at least
``--min-stars`` stars, and for true [Fe/H] < -1. With the emulator's labels in the catalogs it
first prints, per split, the median |error| of the network's and the emulator's labels and
Spearman's rho of the catalog's own |z| (L_ERR) with |offset| / L_ERR, the SNR and the
predicted labels: what the tail of the residuals follows. ``--catalog`` scores the refits on
another catalog with true labels instead of the test split, e.g. the 15000 new stars that
``python -m benchmarks.binned_calibration --keep DIR`` labels (``DIR/catalogs/reference.fits``),
where the label x SNR-quintile bins outside z std 1 +- 0.1 or 68.3% +- 3 points mean something
(3000 stars a bin): their count is printed per refit. Writes nothing.

``--fit-sizes N [N ...]`` (with ``--catalog``) asks how many stars the scatter model needs:
half of the catalog's stars, drawn at random, are scored; the other half is cut into disjoint
draws of N stars each, the refit with every covariate the catalogs allow is fitted on each
draw, and the line of each draw gives its scores and its counts of label x SNR-quintile and
label x label-tercile (of the predicted labels, as calibration.csv bins them) bins outside the
bands on the scored half, after the same fit on the run's validation stars. How
much the count moves between draws of one size is what a calibration set of that size leaves
to chance.

``--hinge-scan`` instead scores the hinge factor c of the emulator-offset component
(``pipeline.laplace.scatter.OFFSET_HINGE``) without the test stars: for each c of
``HINGE_FACTORS`` (and without the offset), five-fold cross-validation on the validation
stars (the model fitted on four fifths, z computed on the fifth left out) and, over the
out-of-fold z, the std, the 1-sigma coverage, the excess kurtosis, the mean Gaussian negative
log-likelihood, the number of the 15 label x SNR-quintile bins outside z std 1 +- 0.1 or
68.3% +- 3 points and the RMS residual over RMS error of the tenth of the stars with the
smallest errors. Validation spectra cover only the training SNR range: how c treats a noisier
spectrum is not seen here (docs/laplace.md).

Where it stops holding: the catalogs carry only the diagonal of the model and flux-noise
covariances, which is all the scatter levels use, but the correlation R refitted here is not
the laplace step's; the fit sees the catalogs' rounded physical columns, not the step's float64
standardized arrays, so the coefficients differ slightly from the posterior's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from astropy.table import Table
from scipy import stats

from benchmarks.calibration_check import decile_ratio
from pipeline.laplace.scatter import OFFSET_HINGE, fit_scatter
from pipeline.nn.scaler import LabelScaler

LABELS = ("TEFF", "LOGG", "FE_H")
# (label degree, emulator offset) of each refit and its name
VARIANTS = {(0, False): "", (1, False): ", labels", (2, False): ", labels, squared labels",
            (2, True): ", labels, squared labels, emulator offset"}
HINGE_FACTORS = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0)
FOLDS = 5


def read_split(path: Path, scaler: LabelScaler) -> dict:
    """Standardized predictions, truths, model and noise variances (N, 3) and SNR (N,)."""
    t = Table.read(path, hdu=1)

    def col(suffix):
        return np.stack([np.asarray(t[lab + suffix], np.float64) for lab in LABELS], axis=1)

    scale = np.asarray(scaler.scale, np.float64)
    return {"pred": scaler.transform(col("")), "true": scaler.transform(col("_TRUE")),
            "model": (col("_ERR_MODEL") / scale) ** 2, "noise": (col("_ERR_NOISE") / scale) ** 2,
            "err": col("_ERR") / scale if "TEFF_ERR" in t.colnames else None,
            "snr": np.asarray(t["SNR"], np.float64),
            "feh": np.asarray(t["FE_H_TRUE"], np.float64),
            "offset": (scaler.transform(col("")) - scaler.transform(col("_EMULATOR"))
                       if "TEFF_EMULATOR" in t.colnames else None)}


def stars(data: dict, rows) -> dict:
    """The :func:`read_split` arrays of the stars ``rows`` (absent columns stay None)."""
    return {k: v[rows] if isinstance(v, np.ndarray) else v for k, v in data.items()}


def emulator_diagnostics(split: str, data: dict) -> None:
    """Median |error| of the network's and the emulator's labels (standardized), and
    Spearman's rho of the catalog's |z| with the offset |d| / err, the SNR and the labels."""
    if data["offset"] is None or data["err"] is None:
        return
    error = np.abs(data["pred"] - data["true"])
    emulator_error = np.abs(data["pred"] - data["offset"] - data["true"])
    z = error / data["err"]
    print(f"== {split}: median |error| network "
          f"{np.array2string(np.median(error, 0), precision=4)}, emulator "
          f"{np.array2string(np.median(emulator_error, 0), precision=4)} (standardized)")
    others = {"|offset| / err": np.abs(data["offset"]) / data["err"],
              "SNR": np.repeat(data["snr"][:, None], 3, axis=1), "labels": data["pred"]}
    for name, x in others.items():
        rho = [stats.spearmanr(z[:, k], x[:, k]).statistic for k in range(3)]
        print(f"   Spearman rho of the catalog's |z| with {name:16s} {np.round(rho, 3)}")


def summary(name: str, z: np.ndarray) -> str:
    return (f"{name:28s} N={len(z):5d}  z std {np.array2string(z.std(0, ddof=1), precision=3)}"
            f"  |z|<1 {np.array2string(np.mean(np.abs(z) < 1, axis=0), precision=3)}"
            f"  kurtosis {np.array2string(stats.kurtosis(z, axis=0), precision=2)}")


def refit_z(fit_on: dict, apply_to: dict, degree: int, offset: bool,
            hinge: float = OFFSET_HINGE) -> tuple[np.ndarray, np.ndarray]:
    """z and the total std (N, 3) of the ``apply_to`` stars under the scatter model fitted on
    the ``fit_on`` stars (labels up to ``degree``, with the emulator offset or not)."""
    fit = fit_scatter(fit_on["pred"] - fit_on["true"], fit_on["model"], fit_on["noise"],
                      labels=fit_on["pred"] if degree else None, label_degree=max(degree, 1),
                      offset=fit_on["offset"] if offset else None, offset_hinge=hinge)
    s = fit.std(apply_to["model"], apply_to["noise"], apply_to["pred"], apply_to["offset"])
    total = np.sqrt(s**2 + apply_to["model"] + apply_to["noise"])
    return (apply_to["pred"] - apply_to["true"]) / total, total


def bins_outside(z: np.ndarray, snr: np.ndarray, n_bins: int = 5) -> int:
    """Label x SNR-quintile bins (``n_bins`` equal-count bins of ``snr``, or of any other
    per-star value) whose z std is off 1 by more than 0.1 or whose 1-sigma coverage is off
    68.3% by more than 3 points."""
    edges = np.quantile(snr, np.linspace(0, 1, n_bins + 1))
    count = 0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        zb = z[(snr >= lo) & (snr <= hi)]
        count += int(np.sum((np.abs(zb.std(0, ddof=1) - 1) > 0.1)
                            | (np.abs(np.mean(np.abs(zb) < 1, axis=0) - 0.683) > 0.03)))
    return count


def smallest_decile(z: np.ndarray, total: np.ndarray) -> np.ndarray:
    """(3,) RMS residual over RMS predicted error of the tenth of the stars with the smallest
    predicted errors (1 when those are right; the bin of ENCE where a variance floor shows)."""
    return np.array([decile_ratio(z[:, k] * total[:, k], z[:, k])[0] for k in range(3)])


def hinge_scan(valid: dict) -> None:
    """Out-of-fold calibration of each hinge factor (module docstring)."""
    if valid["offset"] is None:
        print("== no emulator labels in the validation catalog: nothing to scan")
        return
    n = len(valid["pred"])
    fold = np.random.default_rng(0).permutation(n) % FOLDS
    split = {f: [stars(valid, rows) for rows in (fold != f, fold == f)] for f in range(FOLDS)}
    print(f"== hinge of the emulator-offset component, {FOLDS}-fold cross-validation on {n} "
          "validation stars (Teff, log g, [Fe/H])")
    for hinge in (None, *HINGE_FACTORS):
        z, total = np.empty((n, 3)), np.empty((n, 3))
        for f, (fit_on, left_out) in split.items():
            z[fold == f], total[fold == f] = refit_z(
                fit_on, left_out, 2, hinge is not None, OFFSET_HINGE if hinge is None else hinge)
        nll = np.mean(0.5 * z**2 + np.log(total) + 0.5 * np.log(2 * np.pi), axis=0)
        name = "no offset" if hinge is None else f"hinge c = {hinge:g}"
        print(f"{summary(name, z)}  NLL {np.array2string(nll, precision=3)}"
              f"  bins outside {bins_outside(z, valid['snr'])}/15  smallest-error decile RMSE / "
              f"RMV {np.array2string(smallest_decile(z, total), precision=2)}")


def fit_size_scan(valid: dict, catalog: dict, sizes: list[int], seed: int = 0) -> None:
    """Scores on a random half of ``catalog`` of the refit (all covariates present) fitted on
    the validation stars and on disjoint draws of each of ``sizes`` stars from the other
    half (module docstring, ``--fit-sizes``)."""
    n = len(catalog["pred"])
    order = np.random.default_rng(seed).permutation(n)
    scored, pool = order[: n // 2], order[n // 2:]
    if max(sizes) > len(pool):
        raise SystemExit(f"--fit-sizes: the largest draw ({max(sizes)} stars) exceeds the "
                         f"{len(pool)} stars the catalog leaves after the scored half; "
                         "use smaller sizes or a larger catalog")
    offset = valid["offset"] is not None and catalog["offset"] is not None
    score = stars(catalog, scored)
    print(f"== fitted on a calibration set of N stars (labels, squared labels"
          f"{', emulator offset' if offset else ''}), scored on {len(scored)} other stars")
    fits = [(f"validation split ({len(valid['pred'])})", valid)]
    fits += [(f"{size} stars, draw {i + 1}", stars(catalog, pool[i * size:(i + 1) * size]))
             for size in sizes for i in range(len(pool) // size)]
    for name, fit_on in fits:
        z, _ = refit_z(fit_on, score, 2, offset)
        by_label = sum(bins_outside(z, score["pred"][:, k], 3) for k in range(3))
        print(f"{summary(name, z)}  label x SNR-quintile bins outside "
              f"{bins_outside(z, score['snr'])}/15, label x label-tercile bins outside "
              f"{by_label}/27")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, type=Path, help="a run's results folder")
    parser.add_argument("--min-stars", type=int, default=100, help="smallest SNR bin reported")
    parser.add_argument("--hinge-scan", action="store_true",
                        help="cross-validate the offset hinge on the validation stars instead")
    parser.add_argument("--catalog", type=Path, help="score on this catalog (with true labels) "
                        "instead of the run's test split")
    parser.add_argument("--fit-sizes", type=int, nargs="+", help="with --catalog: refit on "
                        "disjoint draws of these many of its stars instead (module docstring)")
    args = parser.parse_args(argv)
    if args.fit_sizes and args.catalog is None:
        parser.error("--fit-sizes draws its calibration sets from --catalog: give one")
    scaler = LabelScaler.load(args.results / "model" / "scaler.json")
    valid = read_split(args.results / "predictions" / "valid.fits", scaler)
    if args.hinge_scan:
        hinge_scan(valid)
        return 0
    test = read_split(args.catalog or args.results / "predictions" / "test.fits", scaler)
    if args.fit_sizes:
        fit_size_scan(valid, test, args.fit_sizes)
        return 0
    for split, data in (("valid", valid), ("test", test)):
        emulator_diagnostics(split, data)
    edges = np.quantile(test["snr"], np.linspace(0, 1, 6))
    for (degree, offset), name in VARIANTS.items():
        if offset and (valid["offset"] is None or test["offset"] is None):
            print("== no emulator labels in the catalogs: the offset refit is skipped")
            continue
        z, _ = refit_z(valid, test, degree, offset)
        print(f"== covariates: model, noise{name} "
              f"(fitted on {len(valid['pred'])} validation stars)")
        print(f"{summary('test, all', z)}  label x SNR-quintile bins outside "
              f"{bins_outside(z, test['snr'])}/15")
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            rows = (test["snr"] >= lo) & (test["snr"] <= hi)
            if rows.sum() >= args.min_stars:
                print(summary(f"  SNR {lo:.0f}-{hi:.0f}", z[rows]))
        if np.count_nonzero(test["feh"] < -1.0) > 1:
            print(summary("  true [Fe/H] < -1", z[test["feh"] < -1.0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
