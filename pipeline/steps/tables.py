"""Step ``tables``: Jacobian summary, calibration table and test-split accuracy metrics.

    python -m pipeline.steps.tables [--config-json J] --predictions F... --jacobians F... \
        [--data F...] --outdir results/tables

writes

* ``jacobian_summary.{fits,parquet,csv}``: one row per pixel over all stars of all shards
  (:mod:`pipeline.evaluation.jacobian_summary`, in at most ``jacobian.summary_memory_mb``).
* ``calibration.csv``: one row per prediction catalog (that has true labels) and label, with the
  statistics of ``pipeline.evaluation.calibration``; for synthetic data also the ratios to the
  Cramér–Rao bound, computed from the catalog's dataset FITS (``--data``, else
  ``<results>/data/<name>.fits`` beside the catalog's ``<results>/predictions`` directory).
* ``metrics.json``: bias, RMSE and robust scatter per label on the catalog named ``test``
  (else the last catalog with true labels), in physical units.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.table import Table

from pipeline import LABEL_UNITS, LABELS
from pipeline.artifacts.atomic import atomic_path
from pipeline.artifacts.catalog import read_catalog, write_table
from pipeline.artifacts.provenance import provenance
from pipeline.cli import base_parser, main
from pipeline.evaluation import calibration
from pipeline.evaluation.jacobian_summary import jacobian_summary
from pipeline.exceptions import DataError
from pipeline.spectra.fits import read_spectra
from pipeline.spectra.synthetic import cramer_rao_bound

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------- calibration
def has_truth(table: Table) -> bool:
    return all(f"{label}_TRUE" in table.colnames for label in LABELS)


def data_file_for(catalog_path: Path, data_paths: dict) -> Path:
    name = catalog_path.stem
    if name in data_paths:
        return data_paths[name]
    return catalog_path.parent.parent / "data" / f"{name}.fits"


def crb_sigma(table: Table, data_path: Path, config: dict) -> np.ndarray | None:
    """(N, 3) Cramér–Rao 1-sigma bounds of the catalog's stars, or None when not computable."""
    if config["data"]["source"] != "synthetic" or not data_path.is_file():
        return None
    data = read_spectra(data_path, bad_pixel_err=config["data"]["bad_pixel_err"],
                        max_bad_pixel_fraction=config["data"]["max_bad_pixel_fraction"])
    if not data.has_labels:
        return None
    row = pd.Index(data.star_id).get_indexer(np.asarray(table["STAR_ID"]).astype(str))
    if np.any(row < 0):
        raise DataError(f"'{data_path}': has no star '{table['STAR_ID'][np.argmin(row)]}' "
                        "of the catalog; pass the catalog's own dataset with --data")
    bound = cramer_rao_bound(data.label_array()[row], data.flux_err[row], wave=data.wave)
    return np.sqrt(np.einsum("nii->ni", np.asarray(bound, np.float64)))


def calibration_rows(name: str, table: Table, crb: np.ndarray | None, n_bins: int) -> list:
    rows = []
    for k, label in enumerate(LABELS):
        pred, err, true = (np.asarray(table[c], np.float64)
                           for c in (label, f"{label}_ERR", f"{label}_TRUE"))
        row = {"CATALOG": name, "LABEL": label, "UNIT": LABEL_UNITS[label]}
        row.update(calibration.calibration_metrics(pred, err, true, n_bins))
        if crb is not None:
            row.update(calibration.crb_metrics(pred, err, true, crb[:, k]))
        rows.append(row)
    return rows


def accuracy(name: str, table: Table) -> dict:
    out = {"catalog": name, "n_stars": len(table),
           "n_flagged": int(np.count_nonzero(table["FLAG"])) if "FLAG" in table.colnames else 0,
           "labels": {}}
    for label in LABELS:
        metrics = calibration.accuracy_metrics(table[label], table[f"{label}_TRUE"])
        out["labels"][label] = {"unit": LABEL_UNITS[label], **metrics}
    return out


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------- step
def build_parser():
    parser = base_parser("Jacobian summary, calibration table and accuracy metrics.")
    parser.add_argument("--predictions", nargs="+", required=True, help="prediction catalogs")
    parser.add_argument("--jacobians", nargs="+", required=True, help="Jacobian shard files")
    parser.add_argument("--data", nargs="*", default=[],
                        help="dataset FITS of the catalogs (matched by file stem)")
    parser.add_argument("--outdir", required=True, help="output directory")
    return parser


def run(args, config: dict) -> None:
    outdir = Path(args.outdir)
    data_paths = {Path(p).stem: Path(p) for p in args.data}
    header = provenance(config)
    catalogs = [(Path(p).stem, Path(p), read_catalog(Path(p))) for p in args.predictions]
    truth = [(name, path, table) for name, path, table in catalogs if has_truth(table)]
    for _, path, table in catalogs:
        if not has_truth(table):
            log.warning("%s: no true labels (L_TRUE columns); left out of the calibration",
                        path)
    if not truth:
        raise DataError(f"none of the catalogs {args.predictions} has true labels "
                        "(TEFF_TRUE, LOGG_TRUE, FE_H_TRUE): calibration needs labelled splits")
    rows = []
    for name, path, table in truth:
        crb = crb_sigma(table, data_file_for(path, data_paths), config)
        rows += calibration_rows(name, table, crb, config["predict"]["calibration_bins"])
    test = next((c for c in truth if c[0] == "test"), truth[-1])
    metrics = {"provenance": header, **accuracy(test[0], test[2])}
    summary = jacobian_summary(args.jacobians, config["jacobian"]["summary_memory_mb"])
    write_table(summary, outdir / "jacobian_summary", header, extname="JACOBIAN_SUMMARY")
    with atomic_path(outdir / "calibration.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.8g")
    with atomic_path(outdir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(_json_safe(metrics), indent=2) + "\n")
    log.info("tables: %d pixels, %d calibration rows, metrics of '%s' -> %s",
             len(summary), len(rows), test[0], outdir)


if __name__ == "__main__":
    raise SystemExit(main(build_parser, run))
