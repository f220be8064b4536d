"""Step ``predict``: labels with a full 3x3 error budget for every star of one or more inputs.

    python -m pipeline.predict [--config-json J] --model DIR --posterior FILE \
        --format fits|apstar [--name NAME] --out DIR INPUT...

writes ``DIR/<name>.{fits,parquet,csv}`` per input (name defaults to the input's file stem, or
the directory name for a directory of apStar files). Inputs on another wavelength grid are
mapped onto the model's grid (``pipeline.validation.match_grid``) and flagged when that needed
interpolation. Catalog columns and FLAG bits: ``pipeline.export`` and docs/outputs.md.

Bad pixels (flux set to the continuum 1, error ``data.bad_pixel_err``) are fixed replacement
values, not noisy measurements: they add nothing to the flux-noise term (error 0 there), and a
star with more than ``predict.flag_bad_pixel_fraction`` of them is flagged (FLAG bit 1).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline import export
from pipeline.cli import base_parser, main
from pipeline.exceptions import ConfigError, DataError, ModelFileError
from pipeline.io import Spectra, provenance, read_spectra
from pipeline.validation import bad_pixel_mask

log = logging.getLogger(__name__)

FORMATS = ("fits", "apstar")


# ------------------------------------------------------------------------- shared loaders
def device_name() -> str:
    """The device TensorFlow computes on: the first GPU if one is visible, else 'CPU'."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else "CPU"


def load_model(model_dir: str | Path):
    """``(model, scaler, wave)`` of a trained model directory, with a clear error if absent."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFileError(f"model directory '{model_dir}' does not exist; run the train "
                             "step first or pass the directory holding model.keras")
    from pipeline.model import load_trained

    return load_trained(model_dir)


def load_posterior(path: str | Path, model):
    """The Laplace posterior of ``model`` (ModelFileError if missing or for another model)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"posterior file '{path}' does not exist; run the laplace step "
                             "first or pass --posterior results/laplace/posterior.npz")
    from pipeline.laplace import Posterior

    return Posterior.load(path, model)


def load_input(path: str | Path, fmt: str, wave: np.ndarray, config: dict,
               rows: slice | None = None) -> tuple[Spectra, bool]:
    """Spectra of ``path`` on the model grid ``wave`` and whether they were interpolated.

    ``fmt`` 'fits' reads a canonical dataset FITS (DESIGN section 3) and maps it with
    ``match_grid`` (GridMismatchError when the grid does not cover the model's); 'apstar'
    reads one apStar file or a directory of them (``pipeline.apogee.read_apstar_files``).
    ``rows`` reads only that slice of a canonical FITS (memory-mapped), for streaming.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format '{fmt}' is not valid; valid choices: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"input '{path}' does not exist")
    if fmt == "apstar":
        from pipeline.apogee import read_apstar_files

        spectra = read_apstar_files([path], wave, config)
        return spectra, bool(spectra.meta.get("RESAMPLD", False))
    from pipeline.validation import match_grid

    bad_pixel_err = config["data"]["bad_pixel_err"]
    spectra = read_spectra(path, bad_pixel_err=bad_pixel_err,
                           max_bad_pixel_fraction=config["data"]["max_bad_pixel_fraction"],
                           rows=rows)
    spectra.meta.pop("RESAMPLD", None)  # a card of the input file says nothing about this run
    spectra = match_grid(spectra, wave, path=path, bad_pixel_err=bad_pixel_err)
    return spectra, bool(spectra.meta.get("RESAMPLD", False))


# -------------------------------------------------------------------------------- flags
def training_range(scaler) -> tuple[np.ndarray, np.ndarray]:
    """Training label range (lo, hi) (3,) from the scaler; its mean when it stores no range."""
    lo, hi = getattr(scaler, "label_min", None), getattr(scaler, "label_max", None)
    if lo is None or hi is None:
        log.warning("the label scaler stores no training label range: out-of-range flags use "
                    "distance from the training mean instead")
        return np.asarray(scaler.mean, np.float64), np.asarray(scaler.mean, np.float64)
    return np.asarray(lo, np.float64), np.asarray(hi, np.float64)


def model_error_ratio(model_cov: np.ndarray, scaler, posterior) -> np.ndarray:
    """(N,) largest ratio over labels of the model error to its training 99th percentile.

    Zeros when the posterior records no training reference (files from older versions).
    """
    reference = getattr(posterior, "info", {}).get("train_model_std_q99")
    if reference is None:
        return np.zeros(model_cov.shape[0])
    std = np.sqrt(np.diagonal(model_cov, axis1=1, axis2=2)) / np.asarray(scaler.scale)
    return np.max(std / np.maximum(np.asarray(reference, np.float64), 1e-300), axis=1)


def star_flags(prediction: np.ndarray, total: np.ndarray, bad_fraction: np.ndarray,
               resampled: bool, scaler, predict_cfg: dict,
               model_ratio: np.ndarray | None = None) -> np.ndarray:
    """FLAG bit field (N,) int32; bits documented in ``pipeline.export.FLAG_BITS``.

    ``model_ratio`` (N,) is :func:`model_error_ratio`; bit 4 is set where it exceeds
    ``predict.ood_model_factor``.
    """
    lo, hi = training_range(scaler)
    margin = predict_cfg["ood_sigma"] * np.asarray(scaler.scale, np.float64)
    ood = np.any((prediction < lo - margin) | (prediction > hi + margin), axis=1)
    nonfinite = ~(np.all(np.isfinite(prediction), axis=1)
                  & np.all(np.isfinite(total), axis=(1, 2)))
    flags = np.zeros(prediction.shape[0], np.int32)
    flags |= np.where(ood, export.FLAG_OOD, 0).astype(np.int32)
    flags |= np.where(bad_fraction > predict_cfg["flag_bad_pixel_fraction"],
                      export.FLAG_BADPIX, 0).astype(np.int32)
    if resampled:
        flags |= export.FLAG_RESAMPLED
    flags |= np.where(nonfinite, export.FLAG_NONFINITE, 0).astype(np.int32)
    if model_ratio is not None:
        far = model_ratio > predict_cfg["ood_model_factor"]
        flags |= np.where(far, export.FLAG_MODEL_OOD, 0).astype(np.int32)
    return flags


# ------------------------------------------------------------------------------ catalog
def predict_catalog(model, posterior, scaler, spectra: Spectra, resampled: bool,
                    config: dict):
    """The prediction catalog (astropy Table) of ``spectra`` on the model grid."""
    from pipeline.error_budget import error_budget

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
    parser.add_argument("--format", choices=FORMATS, default="fits", help="input format")
    parser.add_argument("--name", help="catalog name (one input only; default: input stem)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("inputs", nargs="+", help="canonical FITS, apStar files or directories")
    return parser


def run(args, config: dict) -> None:
    names = catalog_names(args.inputs, args.name)
    for path in args.inputs:
        if not Path(path).exists():
            raise DataError(f"input '{path}' does not exist")
    model, scaler, wave = load_model(args.model)
    posterior = load_posterior(args.posterior, model)
    device = device_name()
    for path, name in zip(args.inputs, names, strict=True):
        spectra, resampled = load_input(path, args.format, wave, config)
        table = predict_catalog(model, posterior, scaler, spectra, resampled, config)
        header = provenance(config, device=device, model=str(args.model),
                            posterior=str(args.posterior), input=str(path),
                            nstars=len(table), nflagged=int(np.count_nonzero(table["FLAG"])))
        paths = export.write_table(table, Path(args.out) / name, header)
        log.info("%s: %d stars (%d flagged) -> %s", path, len(table),
                 np.count_nonzero(table["FLAG"]), ", ".join(map(str, paths)))


if __name__ == "__main__":
    raise SystemExit(main(build_parser, run))
