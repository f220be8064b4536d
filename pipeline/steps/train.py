"""Step ``train``: fit the label network with Adam, resumably and deterministically.

    python -m pipeline.steps.train --config-json J --train F --valid F --outdir results/model

The training recipe, checkpoints and resume are those of :mod:`pipeline.nn.training`. With
``train.stream`` (default) both splits stay in their memory-mapped files and batches are read
row by row, so the step's memory does not grow with the number of stars.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import runtime
from pipeline.cli import base_parser, main
from pipeline.nn.training import check_inputs, train_model
from pipeline.spectra.fits import open_spectra, read_options, read_spectra


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("Train the label network (resumes from outdir/checkpoints).")
    parser.add_argument("--train", required=True, help="training spectra (canonical FITS)")
    parser.add_argument("--valid", required=True, help="validation spectra (canonical FITS)")
    parser.add_argument("--outdir", required=True, help="output directory, e.g. results/model")
    return parser


def read_split(path: str, config: dict):
    """A labelled split for training: streamed from disk (``train.stream``) or read whole.

    Streamed (:func:`~pipeline.spectra.fits.open_spectra`), the flux stays in the memory-mapped
    file and each batch reads its rows, so memory does not grow with the number of stars; read
    whole, the flux is in memory. Both give the same values, hence the same weights.
    """
    kwargs = {**read_options(config), "require_labels": True}
    if config["train"]["stream"]:
        return open_spectra(path, **kwargs)
    spectra = read_spectra(path, **kwargs)
    if not config["train"]["noise_augmentation"]:
        spectra.flux_err = None  # only the noise augmentation uses the errors: free them
    return spectra


def run(args: argparse.Namespace, config: dict) -> None:
    runtime.configure(config, args.threads)
    train = read_split(args.train, config)
    valid = read_split(args.valid, config)
    check_inputs(train, valid, names=(args.train, args.valid))  # messages name the files
    train_model(config, train, valid, args.outdir)


if __name__ == "__main__":
    sys.exit(main(build_parser, run))
