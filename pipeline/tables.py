"""Step ``tables``: Jacobian summary, calibration table and test-split accuracy metrics.

    python -m pipeline.tables [--config-json J] --predictions F... --jacobians F... \
        [--data F...] --outdir results/tables

writes

* ``jacobian_summary.{fits,parquet,csv}``: one row per pixel, ``PIX``, ``WAVE`` and for each
  label L ``L_MEAN``, ``L_MEDIAN``, ``L_P16``, ``L_P84``, ``L_MEAN_ABS`` over all stars of all
  shards. Streaming: means are float64 sums over chunks of stars; the percentiles are exact
  (numpy 'linear' method on all stars) computed one label and one block of pixels at a time, the
  block sized so that it holds at most ``jacobian.summary_memory_mb`` of values.
* ``calibration.csv``: one row per prediction catalog (that has true labels) and label, with the
  statistics of ``pipeline.calibration``; for synthetic data also the ratios to the
  Cramér–Rao bound, computed from the catalog's dataset FITS (``--data``, else
  ``<results>/data/<name>.fits`` beside the catalog's ``<results>/predictions`` directory).
* ``metrics.json``: bias, RMSE and robust scatter per label on the catalog named ``test``
  (else the last catalog with true labels), in physical units.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import astropy.units as u
import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.table import Table

from pipeline import LABEL_UNITS, LABELS, calibration
from pipeline.cli import base_parser, main
from pipeline.exceptions import DataError
from pipeline.export import write_table
from pipeline.io import atomic_path, provenance, read_spectra

log = logging.getLogger(__name__)

PERCENTILES = (16.0, 50.0, 84.0)


# --------------------------------------------------------------------- Jacobian summary
@contextlib.contextmanager
def open_shards(paths):
    """Open shard FITS files memory-mapped; check they share one wavelength grid."""
    with contextlib.ExitStack() as stack:
        shards, wave = [], None
        for path in map(Path, paths):
            if not path.is_file():
                raise DataError(f"Jacobian shard '{path}' does not exist; run the jacobian step")
            hdul = stack.enter_context(fits.open(path, memmap=True))
            if "JACOBIAN" not in hdul or "WAVE" not in hdul:
                raise DataError(f"'{path}' is not a Jacobian shard: it needs HDUs JACOBIAN and "
                                "WAVE (written by python -m pipeline.jacobian)")
            w = np.asarray(hdul["WAVE"].data, np.float64)
            if wave is None:
                wave, first = w, path
            elif w.shape != wave.shape or not np.array_equal(w, wave):
                raise DataError(f"'{path}': HDU 'WAVE' differs from that of '{first}'; all "
                                "shards of one summary must share the model grid")
            if hdul["JACOBIAN"].header["NAXIS3"] > 0:
                shards.append(hdul["JACOBIAN"].data)
        if wave is None:
            raise DataError("no Jacobian shards given (--jacobians)")
        yield shards, wave


def jacobian_summary(paths, memory_mb: float) -> Table:
    """Per-pixel statistics over all stars of the shards ``paths`` (see module docstring)."""
    with open_shards(paths) as (shards, wave):
        n_stars = sum(s.shape[0] for s in shards)
        if n_stars == 0:
            raise DataError(f"Jacobian shards {list(map(str, paths))} hold no stars")
        n_pix = wave.size
        budget = memory_mb * 2**20
        total = np.zeros((len(LABELS), n_pix))
        total_abs = np.zeros((len(LABELS), n_pix))
        chunk = max(1, int(budget // (len(LABELS) * n_pix * 8)))
        for data in shards:
            for start in range(0, data.shape[0], chunk):
                block = np.asarray(data[start:start + chunk], np.float64)
                total += block.sum(axis=0)
                total_abs += np.abs(block).sum(axis=0)
        pct = np.empty((len(LABELS), len(PERCENTILES), n_pix))
        width = max(1, int(budget // (n_stars * 8 * 2)))
        for p0 in range(0, n_pix, width):
            cols = slice(p0, min(p0 + width, n_pix))
            for k in range(len(LABELS)):
                values = np.concatenate([np.asarray(d[:, k, cols], np.float64) for d in shards])
                pct[k, :, cols] = np.percentile(values, PERCENTILES, axis=0)
    return summary_table(wave, total / n_stars, total_abs / n_stars, pct)


def summary_table(wave, mean, mean_abs, pct) -> Table:
    table = Table()
    table["PIX"] = np.arange(wave.size, dtype=np.int32)
    table["PIX"].description = "pixel index on the model grid"
    table["WAVE"] = wave
    table["WAVE"].unit = u.AA
    table["WAVE"].description = "vacuum wavelength"
    for k, label in enumerate(LABELS):
        columns = {"MEAN": mean[k], "MEDIAN": pct[k, 1], "P16": pct[k, 0], "P84": pct[k, 2],
                   "MEAN_ABS": mean_abs[k]}
        for stat, values in columns.items():
            name = f"{label}_{stat}"
            table[name] = values
            table[name].description = (f"{stat.lower()} over stars of d {label} / d flux "
                                       f"[{LABEL_UNITS[label]} per unit normalized flux]")
            if label == "TEFF":
                table[name].unit = u.K
    return table


# -------------------------------------------------------------------------- calibration
def read_catalog(path: Path) -> Table:
    if not path.is_file():
        raise DataError(f"prediction catalog '{path}' does not exist; run the predict step")
    try:
        if path.suffix == ".fits":
            return Table.read(path, hdu="CATALOG")
        return Table.read(path, format="parquet" if path.suffix == ".parquet" else "ascii.csv")
    except Exception as exc:
        raise DataError(f"'{path}': not a readable prediction catalog ({exc})") from None


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
    from pipeline.synthetic import cramer_rao_bound

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
