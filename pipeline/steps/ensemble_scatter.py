"""Step ``ensemble_scatter``: the scatter model of an ensemble's mixture, on validation stars.

    python -m pipeline.steps.ensemble_scatter --config-json J \
        --model D0 --posterior P0 --model D1 --posterior P1 ... --valid F [--emulator F] \
        --out F.npz

Runs once every member's laplace job is done (``ensemble.members`` > 1, a fitted
``laplace.scatter`` kind). It predicts the validation split with the mixture exactly as predict
does (mean of the member means; model covariance = mean of the members' Laplace covariances +
covariance of the member means; flux-noise covariance = mean of the members'), fits one scatter
model (``pipeline.laplace.scatter``: same covariates, the mixture mean as the predicted labels,
``laplace.scatter_ridge``, cap from ``laplace.scatter_cap_quantile``, residual correlation) on
the residuals of the mixture mean (with ``laplace.scatter_emulator``, also its offset from the
emulator's best-fit labels, fitted from the mixture mean with ``--emulator``, as predict does),
and writes it (``pipeline.artifacts.ensemble_scatter``) for predict's ``--scatter``.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from pipeline import runtime
from pipeline.artifacts.ensemble_scatter import write_ensemble_scatter
from pipeline.artifacts.provenance import provenance
from pipeline.cli import base_parser, main
from pipeline.config import scatter_uses_emulator
from pipeline.evaluation.shift import EMULATOR_LABEL_COLUMNS
from pipeline.exceptions import ConfigError
from pipeline.laplace.ensemble import fit_mixture_scatter
from pipeline.spectra.inputs import read_labelled_on_grid
from pipeline.steps.predict import load_members, load_reference, mixture_budget

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("Fit the scatter model of an ensemble's mixture on validation stars.")
    parser.add_argument("--model", required=True, action="append",
                        help="model directory of a member; repeated, one per member")
    parser.add_argument("--posterior", required=True, action="append",
                        help="Laplace posterior (.npz) of a member; one per --model, same order")
    parser.add_argument("--valid", required=True, help="validation spectra (canonical FITS)")
    parser.add_argument("--emulator", help="emulator file (the emulator step's emulator.npz); "
                        "needed with laplace.scatter_emulator")
    parser.add_argument("--out", required=True, help="ensemble scatter file (.npz)")
    return parser


def run(args: argparse.Namespace, config: dict) -> None:
    cfg = config["laplace"]
    if cfg["scatter"] == "likelihood":
        raise ConfigError("config key 'laplace.scatter' is 'likelihood': there is no scatter "
                          "model to refit for the ensemble (the mixture uses the members' "
                          "Laplace noise); set laplace.scatter to 'linear' or 'constant'")
    if len(args.model) < 2:
        raise ConfigError(f"the ensemble scatter needs at least 2 members, got {len(args.model)}"
                          " --model; a single model's scatter is fitted by its laplace step")
    if scatter_uses_emulator(cfg) and args.emulator is None:
        raise ConfigError("config key 'laplace.scatter_emulator' is true: the ensemble scatter "
                          "needs the emulator file (--emulator, the emulator step's "
                          "emulator.npz), or set the key to false")
    runtime.configure(config, args.threads)
    members, wave = load_members(args.model, args.posterior)
    (valid,) = read_labelled_on_grid((args.valid,), wave, config)
    reference = None
    if args.emulator is not None:
        reference, _ = load_reference(args.emulator, args.model[0], members[0][0], wave.size)
    budget, _, shift = mixture_budget(members, valid, config, reference=reference)
    scaler = members[0][2]
    scatter = fit_mixture_scatter(
        budget, valid.label_array(), scaler, cfg,
        np.stack([shift[column] for column in EMULATOR_LABEL_COLUMNS], axis=1)
        if scatter_uses_emulator(cfg) else None)
    log.info("ensemble scatter model (%s, %d members) fitted on %d validation stars: %s",
             cfg["scatter"], len(members), len(valid.flux), scatter.describe())
    write_ensemble_scatter(
        args.out, scatter, cfg["scatter"], scaler.scale, [p for _, p, _ in members],
        {"n_valid": len(valid.flux), "valid": args.valid,
         "provenance": provenance(config, device=runtime.device_name(),
                                  model=" ".join(args.model),
                                  posterior=" ".join(args.posterior))})
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    raise SystemExit(main(build_parser, run))
