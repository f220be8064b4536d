"""Step ``predict``: labels with a full 3x3 error budget for every star of one or more inputs.

    python -m pipeline.predict [--config-json J] --model DIR --posterior FILE \
        [--format auto|fits|apstar] [--name NAME] --out DIR INPUT...

writes ``DIR/<name>.{fits,parquet,csv}`` per input (name defaults to the input's file stem, or
the directory name for a directory of apStar files). Inputs on another wavelength grid are
mapped onto the model's grid (``pipeline.spectra.validation.match_grid``) and flagged when that
needed interpolation. Catalog columns and FLAG bits: ``pipeline.artifacts.catalog`` and
docs/outputs.md.

Bad pixels (flux set to the continuum 1, error ``data.bad_pixel_err``) are fixed replacement
values, not noisy measurements: they add nothing to the flux-noise term (error 0 there), and a
star with more than ``predict.flag_bad_pixel_fraction`` of them is flagged (FLAG bit 1).

A canonical FITS input is read ``predict.chunk_size`` stars at a time (memory-mapped row
slices): only the catalog rows (~0.2 kB a star) accumulate, so a survey of any size fits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from astropy.table import vstack

from pipeline import runtime
from pipeline.artifacts import catalog as export
from pipeline.artifacts.model_dir import load_trained
from pipeline.artifacts.provenance import provenance
from pipeline.cli import base_parser, main
from pipeline.evaluation.flags import model_error_ratio, star_flags
from pipeline.exceptions import ConfigError, DataError
from pipeline.laplace import Posterior
from pipeline.laplace.error_budget import error_budget
from pipeline.spectra.dataset import Spectra
from pipeline.spectra.inputs import FORMATS, detect_format, input_chunks
from pipeline.spectra.validation import bad_pixel_mask

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ catalog
def predict_catalog(model, posterior, scaler, spectra: Spectra, resampled: bool,
                    config: dict):
    """The prediction catalog (astropy Table) of ``spectra`` on the model grid."""
    bad = bad_pixel_mask(spectra, config["data"]["bad_pixel_err"])
    noise_err = np.where(bad, 0.0, spectra.flux_err).astype(np.float32)
    budget = error_budget(model, posterior, scaler, spectra.flux, noise_err,
                          config["predict"]["batch_size"])
    flags = star_flags(budget["prediction"], budget["total"], bad.mean(axis=1), resampled,
                       scaler, config["predict"],
                       model_error_ratio(budget["model"], scaler, posterior))
    has_labels = any(name in spectra.labels.colnames for name in ("TEFF", "LOGG", "FE_H"))
    snr = spectra.labels["SNR"] if "SNR" in spectra.labels.colnames else None
    return export.catalog_table(spectra.star_id, budget, flags,
                                true_labels=spectra.label_array() if has_labels else None,
                                snr=snr)


def chunk_stars(cfg: dict) -> int:
    """Stars per chunk: ``chunk_size`` rounded down to whole batches of ``batch_size`` (at
    least one), so the network sees the same batches, and gives the same float32 bits, as on
    the whole input."""
    return max(1, cfg["chunk_size"] // cfg["batch_size"]) * cfg["batch_size"]


def catalog_names(inputs: list[str], name: str | None) -> list[str]:
    """Output names: ``--name`` for a single input, else each input's stem (must be unique)."""
    if name is not None:
        if len(inputs) != 1:
            raise ConfigError(f"--name '{name}' names one catalog but {len(inputs)} inputs were "
                              "given; drop --name to name each catalog after its input")
        return [name]
    names = [Path(p).name if Path(p).is_dir() else Path(p).stem for p in inputs]
    if len(set(names)) != len(names):
        raise ConfigError(f"inputs {inputs} give duplicate catalog names {names}; run them "
                          "separately with --name")
    return names


def build_parser():
    parser = base_parser("Predict labels with a full 3x3 error budget (model, scatter, noise).")
    parser.add_argument("--model", required=True, help="trained model directory")
    parser.add_argument("--posterior", required=True, help="Laplace posterior (.npz)")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                        help="input format (default: recognized from each input's content)")
    parser.add_argument("--name", help="catalog name (one input only; default: input stem)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("inputs", nargs="+", help="canonical FITS, apStar files or directories")
    return parser


def run(args, config: dict) -> None:
    runtime.configure(config, args.threads)
    names = catalog_names(args.inputs, args.name)
    for path in args.inputs:
        if not Path(path).exists():
            raise DataError(f"input '{path}' does not exist")
    model, scaler, wave = load_trained(args.model)
    posterior = Posterior.load(args.posterior, model)
    device = runtime.device_name()
    for path, name in zip(args.inputs, names, strict=True):
        fmt = detect_format(path) if args.format == "auto" else args.format
        table = vstack([predict_catalog(model, posterior, scaler, spectra, resampled, config)
                        for spectra, resampled in input_chunks(
                            path, fmt, wave, config, chunk_stars(config["predict"]),
                            desc="predict")], metadata_conflicts="silent")
        header = provenance(config, device=device, model=str(args.model),
                            posterior=str(args.posterior), input=str(path),
                            nstars=len(table), nflagged=int(np.count_nonzero(table["FLAG"])))
        paths = export.write_table(table, Path(args.out) / name, header)
        log.info("%s: %d stars (%d flagged) -> %s", path, len(table),
                 np.count_nonzero(table["FLAG"]), ", ".join(map(str, paths)))


if __name__ == "__main__":
    raise SystemExit(main(build_parser, run))
