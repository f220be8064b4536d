"""Step ``emulator``: the reference of the label-free shift flags (``emulator.npz``).

    python -m pipeline.steps.emulator --config-json J --model DIR --train F --valid F --out F

Fits the label -> flux emulator and the last-hidden-feature cloud on the training split, then
sets the SNR trend of the emulator chi^2 and the two flag thresholds on the validation split,
the chi^2 at the emulator's best-fit labels started from the network's predicted labels
(``pipeline.evaluation.shift``), as the predict step computes it. The predict step reads the
file; docs/outputs.md describes the columns and FLAG bits 5-6.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from pipeline import runtime
from pipeline.artifacts.model_dir import load_trained
from pipeline.artifacts.provenance import provenance
from pipeline.cli import base_parser, main
from pipeline.evaluation.shift import fit_reference
from pipeline.spectra.inputs import read_labelled_on_grid
from pipeline.spectra.validation import bad_pixel_mask

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("Fit the label -> flux emulator and the thresholds of the shift flags.")
    parser.add_argument("--model", required=True, help="trained model directory")
    parser.add_argument("--train", required=True, help="training spectra (canonical FITS)")
    parser.add_argument("--valid", required=True, help="validation spectra (canonical FITS)")
    parser.add_argument("--out", required=True, help="emulator file (.npz)")
    return parser


def run(args: argparse.Namespace, config: dict) -> None:
    cfg, data = config["emulator"], config["data"]
    runtime.configure(config, args.threads)
    model, scaler, wave = load_trained(args.model)
    train, valid = read_labelled_on_grid((args.train, args.valid), wave, config)
    good = [~bad_pixel_mask(s, data["bad_pixel_err"]) for s in (train, valid)]
    prediction = scaler.inverse_transform(np.asarray(
        model.predict(valid.flux, batch_size=cfg["batch_size"], verbose=0), np.float64))
    reference = fit_reference(model, train, valid, *good, prediction, cfg,
                              seed=int(config["seed"]), threads=runtime.cpu_threads())
    reference.info["provenance"] = provenance(config, device=runtime.device_name(),
                                              model=str(args.model))
    reference.save(args.out)
    info = reference.info
    flagged = ", ".join(f"{100 * value:.2f}% ({key.removeprefix('valid_flagged_')})"
                        for key, value in info.items() if key.startswith("valid_flagged_"))
    log.info("wrote %s: %d regions; validation flagged %s; label-range margins %s; chi2 "
             "median %.3g", args.out, info["regions"], flagged,
             np.round(reference.range_margin, 3), info["valid_chi2_median"])

if __name__ == "__main__":
    raise SystemExit(main(build_parser, run))
