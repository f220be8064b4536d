"""Check a finished run's error bars beyond z std and coverage: correlations, tails, the cap.

    python -m benchmarks.calibration_check --results results [--split test]

Reads ``predictions/<split>.fits`` (columns L, L_TRUE, L_ERR, L_ERR_SCATTER and the three
correlation columns), ``laplace/posterior.npz`` and ``model/scaler.json`` of a run, and
prints:

* the covariance of the residuals whitened by each star's total 3x3 covariance,
  w = L^-1 r with C = L L^T built from the errors and correlations of the catalog (identity
  for calibrated covariances: off-diagonal terms near 0 mean the correlation columns say what
  the residuals do), next to the residuals' own correlation and the median reported one;
* the kurtosis of each label's z = r / L_ERR (3 for a Gaussian) and how many of the stars with
  |z| > 3 have a true label within 2% of the width of the label box from its edge (the box of
  the catalog's true labels);
* per label, in each decile of L_ERR, the RMS residual over the RMS predicted error (1 for
  calibrated errors; a variance floor shows as values below 1 in the lowest deciles);
* the largest L_ERR_SCATTER against the scatter model's cap (posterior, physical units);
* the network's noise response stored in the posterior (ratio of the Monte-Carlo to the
  delta-method flux-noise variance by effective SNR), when the laplace step measured it.

Writes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from astropy.table import Table

from pipeline import LABELS
from pipeline.nn.scaler import LabelScaler

CORRELATIONS = {(0, 1): "TEFF_LOGG_CORR", (0, 2): "TEFF_FE_H_CORR", (1, 2): "LOGG_FE_H_CORR"}


def columns(table: Table, suffix: str) -> np.ndarray:
    return np.stack([np.asarray(table[label + suffix], np.float64) for label in LABELS], axis=1)


def total_covariance(table: Table) -> np.ndarray:
    """(N, 3, 3) D R D from the catalog's errors and correlation columns."""
    err = columns(table, "_ERR")
    corr = np.broadcast_to(np.eye(3), (len(table), 3, 3)).copy()
    for (i, j), name in CORRELATIONS.items():
        corr[:, i, j] = corr[:, j, i] = np.asarray(table[name], np.float64)
    return err[:, :, None] * corr * err[:, None, :]


def decile_ratio(residual: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(10,) RMS residual over RMS error in each decile of the error (err = residual / z)."""
    err = residual / z
    deciles = np.array_split(np.argsort(err), 10)
    return np.array([np.sqrt(np.mean(residual[d] ** 2) / np.mean(err[d] ** 2)) for d in deciles])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, type=Path, help="a run's results folder")
    parser.add_argument("--split", default="test", help="catalog name (default: test)")
    args = parser.parse_args(argv)
    table = Table.read(args.results / "predictions" / f"{args.split}.fits", hdu=1)
    truth = columns(table, "_TRUE")
    residual = columns(table, "") - truth
    white = np.linalg.solve(np.linalg.cholesky(total_covariance(table)), residual[..., None])
    print(f"{args.split}: {len(table)} stars")
    print("covariance of the whitened residuals (identity if calibrated):")
    print(np.array2string(np.cov(white[..., 0].T), precision=3))
    pairs = list(CORRELATIONS)
    own = np.corrcoef(residual.T)
    print("residual correlation", [round(float(own[i, j]), 3) for i, j in pairs],
          " median reported", [round(float(np.median(table[n])), 3)
                               for n in CORRELATIONS.values()])
    z = residual / columns(table, "_ERR")
    lo, hi = truth.min(axis=0), truth.max(axis=0)
    edge = np.any((truth - lo < 0.02 * (hi - lo)) | (hi - truth < 0.02 * (hi - lo)), axis=1)
    for k, label in enumerate(LABELS):
        tail = np.abs(z[:, k]) > 3
        print(f"{label}: z kurtosis {np.mean(z[:, k] ** 4) / np.mean(z[:, k] ** 2) ** 2:.2f}, "
              f"|z| > 3: {tail.sum()} stars, {np.sum(tail & edge)} of them at the label box's "
              f"edge ({100 * np.mean(edge):.1f}% of all stars are)")
        print(f"  RMSE / RMS error by decile of {label}_ERR: "
              f"{np.array2string(decile_ratio(residual[:, k], z[:, k]), precision=2)}")
    info = json.loads(str(np.load(args.results / "laplace" / "posterior.npz")["info"]))
    scaler = LabelScaler.load(args.results / "model" / "scaler.json")
    cap = np.asarray(info["scatter"]["cap"]) * np.asarray(scaler.scale)
    print("largest scatter", np.array2string(columns(table, "_ERR_SCATTER").max(axis=0),
                                             precision=4),
          " cap", np.array2string(cap, precision=4))
    if info.get("noise_response"):
        response = info["noise_response"]
        print("noise response (Monte Carlo / delta-method noise variance) at effective SNR",
              np.round(np.exp(response["log_snr"]), 1))
        for label, ratio in zip(LABELS, np.asarray(response["ratio"]).T, strict=True):
            print(f"  {label}: {np.array2string(ratio, precision=3)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
