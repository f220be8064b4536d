"""Paper figures: ``python -m pipeline.steps.figures --figure NAME [inputs] --outdir DIR``.

Inputs are named one by one (``--train``, ``--jacobian-data``, ``--history``, ``--posterior``,
``--catalog``, ``--summary``, ``--jacobians``), as the Snakemake rule does; ``--results DIR``
fills those not given from a results directory laid out by the Snakefile for this config.

Writes ``OUTDIR/NAME.<fmt>`` for every format in config ``figures.formats`` (at
``figures.dpi``; ``--preset journal`` draws it at a journal's column or page width with one
font size instead of ``figures.width`` and ``font_size``, as the paper rules do), atomically:
all formats are rendered to temporary files and renamed only when every one succeeded. The
figure names are the keys of docs/report/captions.yaml, which the Snakefile reads to make one
job per figure; each name maps to one plotting function below.
Inputs are the result files of the other steps (see :mod:`pipeline.plots.inputs`); a missing
or malformed one is a DataError naming the file, and no output is written.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from pipeline import cli
from pipeline.artifacts.provenance import provenance
from pipeline.exceptions import ConfigError
from pipeline.plots import accuracy, calibration, jacobians, spectra, training
from pipeline.plots.inputs import FigureInputs
from pipeline.plots.style import PRESETS, apply_preset, rc_params, save_figure

log = logging.getLogger(__name__)

FIGURES: dict[str, Callable] = {
    "spectra_examples": spectra.plot_spectra_examples,
    "training_curves": training.plot_training_curves,
    "laplace_diagnostics": training.plot_laplace_diagnostics,
    "pred_vs_true": accuracy.plot_pred_vs_true,
    "residuals_vs_snr": accuracy.plot_residuals_vs_snr,
    "calibration": calibration.plot_calibration,
    "error_budget": accuracy.plot_error_budget,
    "jacobian_mean": jacobians.plot_jacobian_mean,
    "jacobian_map": jacobians.plot_jacobian_map,
}


INPUT_HELP = {
    "train": "training dataset FITS (example spectra)",
    "jacobian_data": "dataset FITS of the Jacobian shards (their true Teff)",
    "history": "training history CSV",
    "posterior": "posterior .npz",
    "catalog": "prediction catalog FITS of the paper figures",
    "summary": "Jacobian summary FITS",
}


def build_parser():
    parser = cli.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--figure", required=True, help="figure name: " + ", ".join(FIGURES))
    parser.add_argument("--results", default="results",
                        help="results directory for the inputs not named below")
    for name, help_text in INPUT_HELP.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=Path, help=help_text)
    parser.add_argument("--jacobians", nargs="+", type=Path, help="Jacobian shard files")
    parser.add_argument("--out", nargs="+", type=Path,
                        help="output files, one per format (the suffix names the format); "
                             "default: OUTDIR/NAME.<fmt> for every format of figures.formats")
    parser.add_argument("--outdir", default="results/figures", help="output directory")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="page layout replacing figures.width and font_size (paper.preset: "
                             "'journal' = 7.0 in pages, 3.35 in columns, one font size)")
    return parser


def output_paths(name: str, config: dict, outdir, out=None) -> list[Path]:
    """The files of figure ``name``: ``out`` as given (each suffix a known format), or
    ``outdir/name.<fmt>`` for every format of config ``figures.formats``."""
    if not out:
        return [Path(outdir) / f"{name}.{fmt}" for fmt in config["figures"]["formats"]]
    formats = ("png", "pdf", "svg")
    for path in out:
        if path.suffix[1:] not in formats:
            raise ConfigError(f"--out '{path}': the suffix must name a format "
                              f"({', '.join(formats)})")
    return [Path(p) for p in out]


def make_figure(name: str, results: FigureInputs, config: dict, outdir, out=None,
                preset: str | None = None) -> list:
    """Draw figure ``name`` from ``results`` and write it to every output path, in the page
    layout ``preset`` of :data:`pipeline.plots.style.PRESETS` if given."""
    import matplotlib.pyplot as plt

    if name not in FIGURES:
        raise ConfigError(f"--figure '{name}' is unknown (valid choices: {', '.join(FIGURES)})")
    paths = output_paths(name, config, outdir, out)
    cfg = dict(apply_preset(config["figures"], preset), seed=config["seed"],
               source=config["data"]["source"], bad_pixel_err=config["data"]["bad_pixel_err"])
    with plt.rc_context(rc_params(cfg)):
        fig = FIGURES[name](results, cfg)
        paths = save_figure(fig, paths, name, cfg, provenance(config, figure=name))
    log.info("wrote %s", ", ".join(map(str, paths)))
    return paths


def figure_inputs(args, config: dict) -> FigureInputs:
    """The files named on the command line, the rest from ``--results``."""
    default = FigureInputs.from_results(args.results, config)
    given = {name: getattr(args, name) for name in INPUT_HELP if getattr(args, name)}
    if args.jacobians:
        given["shards"] = tuple(args.jacobians)
    return dataclasses.replace(default, **given)


def run(args, config: dict) -> None:
    results = figure_inputs(args, config)
    make_figure(args.figure, results, config, args.outdir, args.out, args.preset)


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
