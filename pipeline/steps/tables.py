"""Step ``tables``: Jacobian summary, calibration, accuracy and precision tables.

    python -m pipeline.steps.tables [--config-json J] --predictions F... --jacobians F... \
        [--data F...] [--train F --valid F] --outdir results/tables

or with every output path explicit (what the Snakemake rule passes): ``--summary STEM
--calibration F --metrics F --precision F`` (each defaults to its fixed name in ``--outdir``).
Writes

* ``jacobian_summary.{fits,parquet,csv}``: one row per pixel over all stars of all shards
  (:mod:`pipeline.evaluation.jacobian_summary`, in at most ``jacobian.summary_memory_mb``).
* ``calibration.csv``: per prediction catalog (that has true labels), group of stars (all;
  equal-count bins of SNR; equal-count bins of each predicted label) and label, the
  statistics of ``pipeline.evaluation.calibration`` and whether the catalog is in-sample
  (train, valid); for synthetic data also the ratios to the Cramér–Rao bound, computed from
  the catalog's dataset FITS (``--data``, else ``<results>/data/<name>.fits`` beside the
  catalog's ``<results>/predictions`` directory), which also gives the SNR of a catalog
  without an SNR column.
* ``metrics.json``: bias, RMSE and robust scatter per label on the catalog named ``test``
  (else the last catalog with true labels), in physical units.
* ``precision.csv``: RMSE and robust scatter of the network on that catalog next to two
  baselines fitted here on the training split with hyperparameters chosen on the validation
  split (linear ridge, RBF kernel ridge: :mod:`pipeline.evaluation.precision`), over all stars
  and per SNR bin, with the ratios to the Cramér–Rao bound for synthetic data. ``--train`` and
  ``--valid`` default to ``<results>/data/{train,valid}.fits`` beside the catalogs; without
  them (or with ``tables.baselines.enabled: false``) the table holds the network only.
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
from pipeline.artifacts.model_dir import read_diagnostics
from pipeline.artifacts.provenance import provenance
from pipeline.cli import base_parser, main
from pipeline.evaluation import calibration, precision
from pipeline.evaluation.jacobian_summary import jacobian_summary
from pipeline.exceptions import ConfigError, DataError
from pipeline.nn.diagnostics import network_health
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


def read_dataset(path: Path, config: dict, **kwargs):
    return read_spectra(path, bad_pixel_err=config["data"]["bad_pixel_err"],
                        max_bad_pixel_fraction=config["data"]["max_bad_pixel_fraction"],
                        **kwargs)


def catalog_rows(table: Table, data, data_path: Path) -> np.ndarray:
    """Row of each catalog star (by STAR_ID) in the dataset ``data`` read from ``data_path``."""
    row = pd.Index(data.star_id).get_indexer(np.asarray(table["STAR_ID"]).astype(str))
    if np.any(row < 0):
        raise DataError(f"'{data_path}': has no star '{table['STAR_ID'][np.argmin(row)]}' "
                        "of the catalog; pass the catalog's own dataset with --data")
    return row


def catalog_dataset(table: Table, data_path: Path, config: dict):
    """The dataset of a catalog when it exists and is needed (the Cramér–Rao bounds of
    synthetic data, or the SNR of a catalog without an SNR column); else None."""
    needed = config["data"]["source"] == "synthetic" or "SNR" not in table.colnames
    return read_dataset(data_path, config) if needed and data_path.is_file() else None


def crb_sigma(table: Table, data, data_path: Path, config: dict) -> np.ndarray | None:
    """(N, 3) Cramér–Rao 1-sigma bounds of the catalog's stars, or None when not computable."""
    if config["data"]["source"] != "synthetic" or data is None or not data.has_labels:
        return None
    row = catalog_rows(table, data, data_path)
    bound = cramer_rao_bound(data.label_array()[row], data.flux_err[row], wave=data.wave)
    return np.sqrt(np.einsum("nii->ni", np.asarray(bound, np.float64)))


IN_SAMPLE = ("train", "valid")  # catalogs whose stars fitted the network or its error model


def calibration_groups(table: Table, snr: np.ndarray | None, config: dict) -> list:
    """(GROUP, BIN, BIN_LO, BIN_HI, rows) of calibration.csv: every star; equal-count bins of
    SNR; equal-count bins (terciles by default) of each predicted label."""
    cfg = config["tables"]
    out = [("all", "all", math.nan, math.nan, np.arange(len(table)))]
    variables = [("SNR", snr, cfg["snr_bins"])] + [
        (label, np.asarray(table[label], np.float64), cfg["label_bins"]) for label in LABELS]
    for group, values, n_bins in variables:
        for name, index in precision.snr_bins(values, n_bins)[1:]:
            out.append((group, name, float(values[index].min()), float(values[index].max()),
                        index))
    return out


def calibration_rows(name: str, table: Table, crb: np.ndarray | None, snr: np.ndarray | None,
                     config: dict) -> list:
    """Rows of calibration.csv for one catalog: per group, bin and label (docs/outputs.md)."""
    n_bins = config["predict"]["calibration_bins"]
    columns = {label: [np.asarray(table[c], np.float64)
                       for c in (label, f"{label}_ERR", f"{label}_TRUE")] for label in LABELS}
    rows = []
    for group, bin_name, lo, hi, index in calibration_groups(table, snr, config):
        for k, label in enumerate(LABELS):
            pred, err, true = (a[index] for a in columns[label])
            row = {"CATALOG": name, "LABEL": label, "UNIT": LABEL_UNITS[label]}
            row.update(calibration.calibration_metrics(pred, err, true, n_bins))
            if crb is not None:
                row.update(calibration.crb_metrics(pred, err, true, crb[index, k]))
            row["CRPS"] = row.pop("CRPS")  # new columns after the existing ones
            row.update({"GROUP": group, "BIN": bin_name, "BIN_LO": lo, "BIN_HI": hi,
                        "IN_SAMPLE": name in IN_SAMPLE})
            rows.append(row)
    return rows


def catalog_snr(table: Table, data=None, data_path: Path | None = None) -> np.ndarray | None:
    """SNR of the catalog's stars: its SNR column, else the dataset's labels, else None."""
    if "SNR" in table.colnames:
        return np.asarray(table["SNR"], np.float64)
    if data is not None and "SNR" in data.labels.colnames:
        return np.asarray(data.labels["SNR"], np.float64)[catalog_rows(table, data, data_path)]
    return None


def accuracy(name: str, table: Table) -> dict:
    out = {"catalog": name, "n_stars": len(table),
           "n_flagged": int(np.count_nonzero(table["FLAG"])) if "FLAG" in table.colnames else 0,
           "labels": {}}
    for label in LABELS:
        metrics = calibration.accuracy_metrics(table[label], table[f"{label}_TRUE"])
        out["labels"][label] = {"unit": LABEL_UNITS[label], **metrics}
    return out


# ---------------------------------------------------------------------------- precision
def baselines(train_path: Path, valid_path: Path, config: dict):
    """Ridge and kernel ridge fitted on the training split, tuned on the validation split."""
    cfg = config["tables"]["baselines"]
    chunk = cfg["chunk_size"]
    options = {"require_labels": True, "nan_labels": config["data"]["nan_labels"]}
    train = read_dataset(train_path, config, **options)
    train.flux_err = None  # N x P x 4 bytes the fits never use
    valid = read_dataset(valid_path, config, **options)
    valid.flux_err = None
    if train.n_pixels != valid.n_pixels or not np.allclose(train.wave, valid.wave):
        raise DataError(f"'{valid_path}' is not on the wavelength grid of '{train_path}'")
    ridge = precision.fit_ridge(train.flux, train.label_array(), valid.flux,
                                valid.label_array(), cfg["ridge_alphas"], chunk=chunk)
    kernel = precision.fit_kernel_ridge(
        train.flux, train.label_array(), valid.flux, valid.label_array(),
        cfg["kernel_length_factors"], cfg["kernel_alphas"], max_stars=cfg["kernel_stars"],
        seed=config["seed"], chunk=chunk)
    return ridge, kernel, train.wave


def precision_table(name: str, table: Table, data_path: Path, train_path: Path | None,
                    valid_path: Path | None, crb: np.ndarray | None,
                    config: dict) -> pd.DataFrame:
    """precision.csv of catalog ``table`` (see docs/outputs.md); ``crb``: its stars'
    Cramér–Rao bounds (:func:`crb_sigma`) or None."""
    truth = np.stack([np.asarray(table[f"{label}_TRUE"], np.float64) for label in LABELS], 1)
    predictions = {"NN": np.stack([np.asarray(table[label], np.float64) for label in LABELS], 1)}
    data = read_dataset(data_path, config) if data_path.is_file() else None
    extra = {}
    cfg = config["tables"]["baselines"]
    if cfg["enabled"] and train_path is not None and valid_path is not None:
        if data is None:
            raise DataError(f"'{data_path}': the dataset of catalog '{name}' is needed for the "
                            "baselines of precision.csv; pass it with --data")
        ridge, kernel, wave = baselines(train_path, valid_path, config)
        if data.n_pixels != wave.size or not np.allclose(data.wave, wave):
            raise DataError(f"'{data_path}' is not on the wavelength grid of '{train_path}'")
        row = catalog_rows(table, data, data_path)
        flux = data.flux[row]
        predictions["RIDGE"] = ridge.predict(flux, cfg["chunk_size"])
        predictions["KRR"] = kernel.predict(flux, cfg["chunk_size"])
        for k, label in enumerate(LABELS):
            extra[label] = {"RIDGE_ALPHA": ridge.alpha[k], "KRR_ALPHA": kernel.alpha[k],
                            "KRR_LENGTH_SCALE": kernel.length[k],
                            "KRR_N_TRAIN": kernel.n_train}
    elif cfg["enabled"]:
        log.warning("precision.csv: no training/validation dataset (--train, --valid); "
                    "the table holds the network only, without baselines")
    snr = catalog_snr(table, data, data_path)
    rows = precision.precision_rows(truth, predictions, snr=snr, crb=crb,
                                    n_bins=config["tables"]["snr_bins"], extra=extra)
    return pd.DataFrame([{"CATALOG": name, **r} for r in rows])


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
    parser.add_argument("--train", help="training dataset FITS of the baselines "
                        "(default: <results>/data/train.fits beside the catalogs)")
    parser.add_argument("--valid", help="validation dataset FITS of the baselines "
                        "(default: <results>/data/valid.fits beside the catalogs)")
    parser.add_argument("--diagnostics", help="diagnostics.json of the trained model: its "
                        "dead-unit and conditioning summary goes into metrics.json")
    parser.add_argument("--outdir", help="output directory: default of every output below")
    parser.add_argument("--summary", help="Jacobian summary path without extension "
                        "(.fits, .parquet, .csv are written); default OUTDIR/jacobian_summary")
    parser.add_argument("--calibration", help="default OUTDIR/calibration.csv")
    parser.add_argument("--metrics", help="default OUTDIR/metrics.json")
    parser.add_argument("--precision", help="default OUTDIR/precision.csv")
    return parser


OUTPUT_NAMES = {"summary": "jacobian_summary", "calibration": "calibration.csv",
                "metrics": "metrics.json", "precision": "precision.csv"}


def output_paths(args) -> dict:
    """Every output path: the explicit option, else its fixed name in --outdir."""
    out = {}
    for key, name in OUTPUT_NAMES.items():
        given = getattr(args, key)
        if given is None and args.outdir is None:
            raise ConfigError(f"tables: no path for the {key} output; pass --{key} or --outdir")
        out[key] = Path(given) if given is not None else Path(args.outdir) / name
    return out


def baseline_data(args, catalog_path: Path, data_paths: dict) -> tuple:
    """The --train / --valid datasets; defaults beside the catalogs when those files exist."""
    found = []
    for split in ("train", "valid"):
        given = getattr(args, split)
        if given is not None:
            found.append(Path(given))
            continue
        path = data_file_for(catalog_path.with_name(f"{split}.fits"), data_paths)
        found.append(path if path.is_file() else None)
    return tuple(found)


def run(args, config: dict) -> None:
    paths = output_paths(args)
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
    rows, crbs = [], {}
    for name, path, table in truth:
        data_path = data_file_for(path, data_paths)
        data = catalog_dataset(table, data_path, config)
        crbs[name] = crb_sigma(table, data, data_path, config)
        rows += calibration_rows(name, table, crbs[name], catalog_snr(table, data, data_path),
                                 config)
        del data  # one dataset in memory at a time
    test = next((c for c in truth if c[0] == "test"), truth[-1])
    metrics = {"provenance": header, **accuracy(test[0], test[2])}
    if args.diagnostics:
        metrics["network"] = network_health(read_diagnostics(args.diagnostics))
    train_path, valid_path = baseline_data(args, test[1], data_paths)
    precise = precision_table(test[0], test[2], data_file_for(test[1], data_paths), train_path,
                              valid_path, crbs[test[0]], config)
    summary = jacobian_summary(args.jacobians, config["jacobian"]["summary_memory_mb"])
    write_table(summary, paths["summary"], header, extname="JACOBIAN_SUMMARY")
    with atomic_path(paths["calibration"]) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.8g")
    with atomic_path(paths["metrics"]) as tmp:
        tmp.write_text(json.dumps(_json_safe(metrics), indent=2) + "\n")
    with atomic_path(paths["precision"]) as tmp:
        precise.to_csv(tmp, index=False, float_format="%.8g")
    log.info("tables: %d pixels, %d calibration rows, metrics and precision of '%s' -> %s",
             len(summary), len(rows), test[0], ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    raise SystemExit(main(build_parser, run))
