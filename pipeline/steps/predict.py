"""Step ``predict``: labels with a full 3x3 error budget for every star of one or more inputs.

    python -m pipeline.predict [--config-json J] --model DIR --posterior FILE \
        [--model DIR --posterior FILE ... [--scatter FILE]] \
        [--emulator FILE] [--format auto|fits|apstar] [--name NAME] --out DIR INPUT...

writes ``DIR/<name>.{fits,parquet,csv}`` per input (name defaults to the input's file stem, or
the directory name for a directory of apStar files). Inputs on another wavelength grid are
mapped onto the model's grid (``pipeline.spectra.validation.match_grid``) and flagged when that
needed interpolation. Catalog columns and FLAG bits: ``pipeline.artifacts.catalog`` and
docs/outputs.md.

Repeated ``--model DIR`` with as many ``--posterior FILE`` (in the same order) are an
ensemble: the catalog reports their equally weighted mixture (``pipeline.laplace.ensemble``),
with the between-member spread in the L_ERR_ENSEMBLE columns. ``--scatter FILE`` (the
``ensemble_scatter`` step's file, ``pipeline.artifacts.ensemble_scatter``) gives the mixture
its own scatter model, fitted on the mixture's validation residuals; without it the scatter is
the mean of the members' own, which counts the members' spread twice (a warning says so).

Bad pixels (flux set to the continuum 1, error ``data.bad_pixel_err``) are fixed replacement
values, not noisy measurements: they add nothing to the flux-noise term (error 0 there), and a
star with more than ``predict.flag_bad_pixel_fraction`` of them is flagged (FLAG bit 1).

Label-free shift statistics (``pipeline.evaluation.shift``: chi^2, broadband, peak, Doppler,
line-spread and line-strength statistics against the label -> flux emulator at its best-fit
labels, fitted from the predicted ones; distance of the last hidden features from the training
cloud) and their FLAG bits 5-11 come from the emulator file, by
default ``DIR/emulator.npz`` beside the model; without one their columns are NaN and those
bits are never set (a warning says so), and a posterior whose scatter model takes the offset
from the emulator's labels (``laplace.scatter_emulator``) is refused. The statistics come
before the scatter term, which may need those labels.

A canonical FITS input is read ``predict.chunk_size`` stars at a time (memory-mapped row
slices) and each chunk's catalog rows are written before the next is read
(``pipeline.artifacts.catalog.StreamingTableWriter``): memory does not grow with the survey.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline import runtime
from pipeline.artifacts import catalog as export
from pipeline.artifacts.ensemble_scatter import FILE_NAME as SCATTER_FILE
from pipeline.artifacts.ensemble_scatter import read_ensemble_scatter
from pipeline.artifacts.model_dir import load_trained
from pipeline.artifacts.provenance import provenance
from pipeline.cli import base_parser, main
from pipeline.evaluation.feature_distance import last_dense_layer, last_hidden_units
from pipeline.evaluation.flags import model_error_ratio, star_flags
from pipeline.evaluation.shift import (
    EMULATOR_FILE,
    EMULATOR_LABEL_COLUMNS,
    ShiftReference,
    shift_statistics,
)
from pipeline.exceptions import ConfigError, DataError
from pipeline.laplace import Posterior
from pipeline.laplace.ensemble import ensemble_budget
from pipeline.laplace.error_budget import error_budget, needs_emulator, with_scatter
from pipeline.laplace.scatter import ScatterModel
from pipeline.spectra.dataset import Spectra
from pipeline.spectra.inputs import FORMATS, detect_format, input_chunks
from pipeline.spectra.validation import bad_pixel_mask, spectrum_snr

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ catalog
def mixture_budget(members: list, spectra: Spectra, config: dict,
                   scatter: ScatterModel | None = None,
                   reference: ShiftReference | None = None) -> tuple[dict, np.ndarray, dict]:
    """The error budget of ``spectra`` under the (model, posterior, scaler) ``members`` (one:
    the single model; several: their mixture, with the ensemble's ``scatter`` model when given,
    ``pipeline.laplace.ensemble``), the stars' bad-pixel mask (N, P) and their shift
    statistics against ``reference`` (the emulator file; NaN without one), whose best-fit
    emulator labels a scatter model may take as a covariate (``laplace.scatter_emulator``).

    The first member's forward pass also gives the last hidden features of the shift
    statistics; the SNR on the good pixels is measured once for every member's noise response
    and for the statistics. Bad pixels carry no flux noise (module docstring)."""
    model, _, scaler = members[0]
    sources = [p for _, p, _ in members] + ([] if scatter is None else [scatter])
    if reference is None and any(map(needs_emulator, sources)):
        raise ConfigError("the scatter model takes the offset of the predicted labels from the "
                          "emulator's (laplace.scatter_emulator): pass the emulator file "
                          "(--emulator, the emulator step's emulator.npz beside the model)")
    bad = bad_pixel_mask(spectra, config["data"]["bad_pixel_err"])
    noise_err = np.where(bad, 0.0, spectra.flux_err).astype(np.float32)
    snr = spectrum_snr(spectra.flux, noise_err, ~bad, threads=runtime.cpu_threads())
    batch = config["predict"]["batch_size"]
    layers = [] if reference is None else [last_dense_layer(model)]
    budgets = [error_budget(m, p, s, spectra.flux, noise_err, batch, snr=snr, scatter=False,
                            feature_layers=layers if i == 0 else [])
               for i, (m, p, s) in enumerate(members)]
    features = budgets[0].pop("features", [None])[0]
    prediction = np.mean([b["prediction"] for b in budgets], axis=0)  # the mixture's mean
    shift = shift_statistics(reference, model, spectra.flux, spectra.flux_err, ~bad, prediction,
                             batch, features, snr, runtime.cpu_threads())
    emulator = np.stack([shift[column] for column in EMULATOR_LABEL_COLUMNS], axis=1)
    budgets = [with_scatter(b, p, s, emulator)
               for b, (_, p, s) in zip(budgets, members, strict=True)]
    budget = ensemble_budget(budgets, scatter=scatter, scaler=scaler, emulator_labels=emulator)
    return budget, bad, shift


def predict_catalog(model, posterior, scaler, spectra: Spectra, resampled: bool,
                    config: dict, reference: ShiftReference | None = None, *,
                    members: tuple = (), scatter: ScatterModel | None = None):
    """The prediction catalog (astropy Table) of ``spectra`` on the model grid.

    ``reference`` (the emulator file) gives the shift columns and FLAG bits 5-6. ``members``:
    further ensemble members as (model, posterior, scaler) triples; the catalog is then the
    mixture of all of them (``pipeline.laplace.ensemble``), its scatter term the ensemble's
    ``scatter`` model when given, else the mean of the members' own. The training range, the
    MODEL_OOD reference and the last-hidden-layer features of the shift flags are the first
    member's.
    """
    budget, bad, shift = mixture_budget([(model, posterior, scaler), *members], spectra, config,
                                        scatter, reference)
    # the flag compares Laplace errors with their training percentile: no ensemble spread in it
    laplace_cov = budget.get("model_laplace", budget["model"])
    flags = star_flags(budget["prediction"], budget["total"], bad.mean(axis=1), resampled,
                       scaler, config["predict"], model_error_ratio(laplace_cov, scaler, posterior),
                       shift,
                       None if reference is None else reference.thresholds,
                       None if reference is None else reference.range_margin)
    has_labels = any(name in spectra.labels.colnames for name in ("TEFF", "LOGG", "FE_H"))
    snr = spectra.labels["SNR"] if "SNR" in spectra.labels.colnames else None
    return export.catalog_table(spectra.star_id, budget, flags,
                                true_labels=spectra.label_array() if has_labels else None,
                                snr=snr, shift=shift)


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


def load_members(model_dirs: list[str], posterior_files: list[str]) -> tuple[list, np.ndarray]:
    """(model, posterior, scaler) of each ensemble member, and their common wavelength grid."""
    if len(model_dirs) != len(posterior_files):
        raise ConfigError(f"{len(model_dirs)} --model directories but {len(posterior_files)} "
                          "--posterior files; give one posterior per model, in the same order "
                          "(--model D0 --posterior P0 --model D1 --posterior P1 ...)")
    members, first_wave = [], None
    for model_dir, posterior_file in zip(model_dirs, posterior_files, strict=True):
        model, scaler, wave = load_trained(model_dir)
        if first_wave is not None and not np.array_equal(wave, first_wave):
            raise ConfigError(f"ensemble member '{model_dir}' was trained on another wavelength "
                              f"grid than '{model_dirs[0]}'; train all members on the same data")
        first_wave = wave
        members.append((model, Posterior.load(posterior_file, model), scaler))
    return members, first_wave


def load_scatter(path: str | None, posteriors: list, scaler) -> ScatterModel | None:
    """The ensemble's scatter model of ``path``, checked against the members' posteriors and
    label scaler; None without a path (a warning for an ensemble: see the module docstring)."""
    if path is None:
        if len(posteriors) > 1:
            log.warning("no --scatter: the mixture's scatter is the mean of the members' own, "
                        "each fitted to its member's residuals, so the members' spread is "
                        "counted twice; run the ensemble_scatter step and pass its %s",
                        SCATTER_FILE)
        return None
    if len(posteriors) == 1:
        raise ConfigError(f"--scatter '{path}' is an ensemble's scatter model but only one "
                          "--model was given; drop --scatter (a single model's scatter is in "
                          "its posterior) or give every member")
    return read_ensemble_scatter(path, posteriors, scaler.scale)


def load_reference(path: str | None, model_dir: str, model,
                   n_pixels: int) -> tuple[ShiftReference | None, str]:
    """The emulator file and its path: ``path``, else the one beside the model, else
    (None, '') with a warning. ModelFileError when it was fitted for another grid or network."""
    if path is None:
        path = Path(model_dir) / EMULATOR_FILE
        if not path.is_file():
            log.warning("no emulator file (%s): the shift columns are NaN and FLAG bits 5-6 "
                        "are never set; run the emulator step or pass --emulator", path)
            return None, ""
    reference = ShiftReference.load(path)
    reference.check(path, n_pixels, last_hidden_units(model))
    return reference, str(path)


def build_parser():
    parser = base_parser("Predict labels with a full 3x3 error budget (model, scatter, noise).")
    parser.add_argument("--model", required=True, action="append",
                        help="trained model directory; repeated: the members of an ensemble")
    parser.add_argument("--posterior", required=True, action="append",
                        help="Laplace posterior (.npz); repeated: one per --model, same order")
    parser.add_argument("--scatter", help=f"the ensemble's scatter model ({SCATTER_FILE} of "
                        "the ensemble_scatter step); only with several --model")
    parser.add_argument("--emulator", help=f"emulator file of the shift flags (default: "
                        f"MODEL/{EMULATOR_FILE} of the first --model when it exists)")
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
    ((model, posterior, scaler), *members), wave = load_members(args.model, args.posterior)
    scatter = load_scatter(args.scatter, [posterior, *(p for _, p, _ in members)], scaler)
    reference, reference_path = load_reference(args.emulator, args.model[0], model, wave.size)
    device = runtime.device_name()
    for path, name in zip(args.inputs, names, strict=True):
        fmt = detect_format(path) if args.format == "auto" else args.format
        n_flagged = 0
        with export.StreamingTableWriter(Path(args.out) / name) as out:
            for spectra, resampled in input_chunks(path, fmt, wave, config,
                                                   chunk_stars(config["predict"]),
                                                   desc="predict"):
                table = predict_catalog(model, posterior, scaler, spectra, resampled, config,
                                        reference, members=tuple(members), scatter=scatter)
                out.write(table)  # each chunk's rows go to disk: memory does not grow
                n_flagged += int(np.count_nonzero(table["FLAG"]))
                # unbound before input_chunks reads the next chunk, or two are alive at once
                del spectra, table
            header = provenance(config, device=device, model=" ".join(map(str, args.model)),
                                posterior=" ".join(map(str, args.posterior)), input=str(path),
                                emulator=reference_path,
                                **({"scatter": args.scatter} if args.scatter else {}),
                                nstars=out.n_rows, nflagged=n_flagged)
            paths = out.finish(header)
        log.info("%s: %d stars (%d flagged) -> %s", path, out.n_rows, n_flagged,
                 ", ".join(map(str, paths)))


if __name__ == "__main__":
    raise SystemExit(main(build_parser, run))
