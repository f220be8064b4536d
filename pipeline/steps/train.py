"""Step ``train``: fit the label network with Adam, resumably and deterministically.

    python -m pipeline.steps.train --config-json J --train F --valid F --outdir results/model

The training recipe, checkpoints and resume are those of :mod:`pipeline.nn.training`.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import runtime
from pipeline.cli import base_parser, main
from pipeline.nn.training import check_inputs, train_model
from pipeline.spectra.fits import read_options, read_spectra


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("Train the label network (resumes from outdir/checkpoints).")
    parser.add_argument("--train", required=True, help="training spectra (canonical FITS)")
    parser.add_argument("--valid", required=True, help="validation spectra (canonical FITS)")
    parser.add_argument("--outdir", required=True, help="output directory, e.g. results/model")
    return parser


def run(args: argparse.Namespace, config: dict) -> None:
    runtime.configure(config, args.threads)
    kwargs = {**read_options(config), "require_labels": True}
    train = read_spectra(args.train, **kwargs)
    train.flux_err = None  # training never uses the errors: free them before the next read
    valid = read_spectra(args.valid, **kwargs)
    valid.flux_err = None
    check_inputs(train, valid, names=(args.train, args.valid))  # messages name the files
    train_model(config, train, valid, args.outdir)


if __name__ == "__main__":
    sys.exit(main(build_parser, run))
