"""Refit the scatter model offline from a run's catalogs: two covariates, labels, squares, offset.

    python -m benchmarks.scatter_refit --results results [--min-stars 100]

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
predicted labels: what the tail of the residuals follows. Writes nothing.

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

from pipeline.laplace.scatter import fit_scatter
from pipeline.nn.scaler import LabelScaler

LABELS = ("TEFF", "LOGG", "FE_H")
# (label degree, emulator offset) of each refit and its name
VARIANTS = {(0, False): "", (1, False): ", labels", (2, False): ", labels, squared labels",
            (2, True): ", labels, squared labels, emulator offset"}


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, type=Path, help="a run's results folder")
    parser.add_argument("--min-stars", type=int, default=100, help="smallest SNR bin reported")
    args = parser.parse_args(argv)
    scaler = LabelScaler.load(args.results / "model" / "scaler.json")
    valid = read_split(args.results / "predictions" / "valid.fits", scaler)
    test = read_split(args.results / "predictions" / "test.fits", scaler)
    for split, data in (("valid", valid), ("test", test)):
        emulator_diagnostics(split, data)
    edges = np.quantile(test["snr"], np.linspace(0, 1, 6))
    for (degree, offset), name in VARIANTS.items():
        if offset and (valid["offset"] is None or test["offset"] is None):
            print("== no emulator labels in the catalogs: the offset refit is skipped")
            continue
        fit = fit_scatter(valid["pred"] - valid["true"], valid["model"], valid["noise"],
                          labels=valid["pred"] if degree else None, label_degree=max(degree, 1),
                          offset=valid["offset"] if offset else None)
        s = fit.std(test["model"], test["noise"], test["pred"], test["offset"])
        z = (test["pred"] - test["true"]) / np.sqrt(s**2 + test["model"] + test["noise"])
        print(f"== covariates: model, noise{name} "
              f"(fitted on {len(valid['pred'])} validation stars)")
        print(summary("test, all", z))
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            rows = (test["snr"] >= lo) & (test["snr"] <= hi)
            if rows.sum() >= args.min_stars:
                print(summary(f"  SNR {lo:.0f}-{hi:.0f}", z[rows]))
        if np.count_nonzero(test["feh"] < -1.0) > 1:
            print(summary("  true [Fe/H] < -1", z[test["feh"] < -1.0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
