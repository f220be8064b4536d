"""Step ``laplace``: fit the last-k-layer Laplace posterior of the trained model.

    python -m pipeline.steps.laplace --config-json J --model DIR --train F --valid F \
        [--emulator F] --out F.npz

``--emulator``: the emulator step's file, needed when the scatter model takes the offset of
the predicted labels from the emulator's best-fit labels (``laplace.scatter_emulator``).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from pipeline import LABELS, runtime
from pipeline.artifacts.model_dir import load_trained
from pipeline.artifacts.provenance import provenance
from pipeline.cli import base_parser, main
from pipeline.config import scatter_uses_emulator
from pipeline.exceptions import ConfigError
from pipeline.laplace.error_budget import noise_covariances, predict_standardized
from pipeline.laplace.noise_response import fit_noise_response, star_snr
from pipeline.laplace.posterior import LaplaceOptions, calibrate_scatter, fit_laplace
from pipeline.spectra.inputs import read_labelled_on_grid
from pipeline.spectra.validation import bad_pixel_mask
from pipeline.steps.predict import load_reference

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("Fit the last-layer Laplace posterior of the trained model.")
    parser.add_argument("--model", required=True, help="trained model directory")
    parser.add_argument("--train", required=True, help="training spectra (canonical FITS)")
    parser.add_argument("--valid", required=True, help="validation spectra (canonical FITS)")
    parser.add_argument("--emulator", help="emulator file (the emulator step's emulator.npz); "
                        "needed with laplace.scatter_emulator")
    parser.add_argument("--out", required=True, help="posterior file (.npz)")
    return parser


def run(args: argparse.Namespace, config: dict) -> None:
    """The ``laplace`` step: fit with ``config['laplace']`` and write the posterior file."""

    cfg, data = config["laplace"], config["data"]
    runtime.configure(config, args.threads)
    model, scaler, wave = load_trained(args.model)
    train, valid = read_labelled_on_grid((args.train, args.valid), wave, config)
    bad = bad_pixel_mask(valid, data["bad_pixel_err"])
    # checked before the fits: the scatter model's emulator offsets need the emulator file
    emulator_labels = (emulator_fit(args.emulator, model, scaler, valid, ~bad)
                       if scatter_uses_emulator(cfg) else None)
    flux_err = np.where(bad, 0.0, valid.flux_err)
    noise_valid = None  # flux noise of each validation star, D diag(e^2) D^T, standardized
    if cfg["hyperparameters"] == "validation" or cfg["scatter"] != "likelihood":
        noise_valid = noise_covariances(model, valid.flux, flux_err, cfg["batch_size"])
    response = None
    if cfg["noise_response"]["enabled"]:
        response = measure_noise_response(model, valid.flux, flux_err, noise_valid, cfg,
                                          int(config["seed"]))
        if noise_valid is not None:  # the scatter is what the *measured* noise leaves over
            noise_valid = response.scale(noise_valid, star_snr(valid.flux, flux_err))
    y_valid = scaler.transform(valid.label_array())
    posterior = fit_laplace(
        model, train.flux, scaler.transform(train.label_array()), x_valid=valid.flux,
        y_valid=y_valid,
        extra_covariance_valid=noise_valid if cfg["hyperparameters"] == "validation" else None,
        options=LaplaceOptions.from_config(cfg))
    posterior.noise_response = response
    if cfg["scatter"] != "likelihood":
        posterior.scatter_model = calibrate_scatter(
            posterior, model, valid.flux, y_valid, noise_valid, cfg, emulator_labels)
    posterior.save(args.out, provenance=provenance(config, device=runtime.device_name()))
    log.info("wrote %s", args.out)


def emulator_fit(path: str | None, model, scaler, valid, good):
    """The map from the validation stars' standardized predictions to the emulator's best-fit
    labels there (standardized), as the predict step fits them (``ShiftReference`` settings,
    good pixels only)."""
    if path is None:
        raise ConfigError("config key 'laplace.scatter_emulator' is true: the laplace step "
                          "needs the emulator file (--emulator, the emulator step's "
                          "emulator.npz), or set the key to false")
    reference, _ = load_reference(path, "", model, valid.flux.shape[1])

    def fit(z):
        best, _ = reference.emulator.best_fit(
            valid.flux, valid.flux_err, good, scaler.inverse_transform(z),
            reference.fit_iterations, reference.fit_margin, threads=runtime.cpu_threads())
        return scaler.transform(best)
    return fit


def measure_noise_response(model, flux, flux_err, noise_valid, cfg: dict, seed: int):
    """The network's response to flux noise (pipeline.laplace.noise_response) on
    ``laplace.noise_response.stars`` validation stars spread over the file."""
    nr = cfg["noise_response"]
    rows = np.unique(np.linspace(0, len(flux) - 1, min(nr["stars"], len(flux))).astype(int))
    flux, flux_err = np.asarray(flux[rows]), flux_err[rows]
    noise = (noise_covariances(model, flux, flux_err, cfg["batch_size"]) if noise_valid is None
             else noise_valid[rows])
    response = fit_noise_response(lambda x: predict_standardized(model, x), flux, flux_err,
                                  noise, nr["amplitudes"], nr["draws"], nr["bins"], seed)
    log.info("noise response (Monte Carlo / delta-method variance) on %d validation stars at "
             "effective SNR %s: %s", len(rows), np.round(np.exp(response.log_snr), 1),
             "; ".join(f"{label} {np.array2string(r, precision=3)}"
                       for label, r in zip(LABELS, response.ratio.T, strict=True)))
    return response


if __name__ == "__main__":
    raise SystemExit(main(build_parser, run))
