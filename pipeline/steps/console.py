"""The ``stellar-laplace`` command installed with the package.

    stellar-laplace <command> [options]

Commands are the pipeline steps (``data``, ``train``, ``laplace``, ``emulator``, ``predict``,
``jacobian``, ``tables``, ``figures``, ``paper``; the same options as
``python -m pipeline.steps.<command>``) and ``info``, which describes a trained model
directory (and its posterior). ``--help`` after a command shows that command's options under
the name typed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# runtime before anything that imports TensorFlow: it imports it with the start-up lines hidden
from pipeline import LABELS, __version__, cli, runtime  # noqa: F401
from pipeline.artifacts.model_dir import load_trained
from pipeline.laplace import Posterior
from pipeline.steps import (
    data,
    emulator,
    figures,
    jacobian,
    laplace,
    paper,
    predict,
    tables,
    train,
)

PROG = "stellar-laplace"
STEPS = {"data": data, "train": train, "laplace": laplace, "emulator": emulator,
         "predict": predict, "jacobian": jacobian, "tables": tables, "figures": figures,
         "paper": paper}
SUMMARY = {
    "data": "build the train / valid / test spectra files from the configured source",
    "train": "train the label network (resumes from its checkpoints)",
    "laplace": "fit the Laplace posterior of the network's last layers",
    "emulator": "label -> flux emulator and thresholds of the label-free shift flags",
    "predict": "labels with a full 3x3 error budget for any spectra (FITS or apStar)",
    "jacobian": "input Jacobians d label / d flux of one shard of stars",
    "tables": "Jacobian summary, calibration, accuracy and precision tables",
    "figures": "one paper figure",
    "paper": "numbers.tex for a paper, and the README tables rendered from it",
    "info": "describe a trained model directory and its posterior",
}


def info_parser() -> argparse.ArgumentParser:
    parser = cli.base_parser("Describe a trained model directory and its Laplace posterior.")
    parser.add_argument("model", help="trained model directory (model.keras, scaler.json, ...)")
    parser.add_argument("--posterior", help="posterior file (.npz) of that model")
    return parser


def run_info(args, config: dict) -> None:
    """Print what a model directory holds: network, grid, label ranges, provenance."""
    model, scaler, wave = load_trained(args.model)
    print(f"model directory  {Path(args.model)}")
    print(f"network          {model.name}: {model.count_params():,} weights, "
          f"{len(model.layers)} layers")
    print(f"wavelength grid  {wave.size} pixels, {wave[0]:.2f}-{wave[-1]:.2f} Angstrom")
    lo, hi = scaler.label_min, scaler.label_max
    for k, label in enumerate(LABELS):
        span = "" if lo is None else f", training range {lo[k]:.4g} .. {hi[k]:.4g}"
        print(f"{label:<17}mean {scaler.mean[k]:.4g}, scale {scaler.scale[k]:.4g}{span}")
    if args.posterior:
        post = Posterior.load(args.posterior, model)
        print(f"posterior        {post.n_params} weights of the last "
              f"{post.info['last_layers']} layers, {post.curvature}, prior precision "
              f"{np.array2string(post.prior_precision, precision=4)}, noise std "
              f"{np.array2string(post.noise_std, precision=4)}, log evidence "
              f"{post.log_evidence:.6g}")


def usage() -> str:
    lines = [f"usage: {PROG} <command> [options]   (version {__version__})", "", "commands:"]
    lines += [f"  {name:<10}{text}" for name, text in SUMMARY.items()]
    lines.append(f"\n'{PROG} <command> --help' shows the options of a command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "info":
        build, run = info_parser, run_info
    elif name in STEPS:
        build, run = STEPS[name].build_parser, STEPS[name].run
    else:
        print(f"{PROG}: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2

    def named_parser() -> argparse.ArgumentParser:
        parser = build()
        parser.prog = f"{PROG} {name}"
        return parser

    return cli.main(named_parser, run, rest)


if __name__ == "__main__":
    raise SystemExit(main())
