"""Step ``jacobian``: input Jacobians d label / d flux of one shard of stars, streamed to FITS.

    python -m pipeline.steps.jacobian [--config-json J] --model DIR [--format auto|fits|apstar] \
        --shard i --shards n --out results/jacobians/<name>/shard-<i>.fits INPUT

The shard layout and row split are those of :mod:`pipeline.artifacts.jacobian_shards`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np

from pipeline import runtime
from pipeline.artifacts.jacobian_shards import shard_rows, write_jacobian_shard
from pipeline.artifacts.model_dir import load_trained
from pipeline.artifacts.provenance import provenance
from pipeline.cli import base_parser, main
from pipeline.nn.derivatives import input_jacobian
from pipeline.spectra.fits import read_labels
from pipeline.spectra.inputs import FORMATS, detect_format, input_chunks, load_input
from pipeline.streaming import batches

log = logging.getLogger(__name__)


def jacobian_batches(model, scaler, chunks: Iterator[np.ndarray], batch_size: int,
                     jacobian_fn: Callable | None = None) -> Iterator[np.ndarray]:
    """Yield input Jacobians (B, 3, P) float32 in physical units, one batch at a time.

    ``chunks`` yields flux arrays (n, P) (e.g. successive row slices of a file), so neither the
    flux nor the Jacobians of more than one chunk are in memory at once.
    """
    jacobian_fn = jacobian_fn or input_jacobian
    for flux in chunks:
        for s in batches(flux.shape[0], batch_size):
            yield np.asarray(jacobian_fn(model, np.asarray(flux[s]), batch_size=batch_size,
                                         scaler=scaler), np.float32)
        # drop this chunk before the next one is read, or two chunks are alive at once and
        # the peak grows with the number of chunks read
        del flux


def shard_flux(path, fmt: str, wave: np.ndarray, config: dict, rows: np.ndarray,
               chunk_size: int) -> Iterator[np.ndarray]:
    """Flux of the shard's ``rows`` on the model grid, ``chunk_size`` stars at a time
    (:func:`pipeline.spectra.inputs.input_chunks`: memory does not grow with the stars)."""
    for spectra, _ in input_chunks(path, fmt, wave, config, chunk_size, rows, "jacobian"):
        flux = spectra.flux
        # drop the chunk (its flux_err too) before the next one is read: a name still bound
        # here while input_chunks loads the next chunk keeps two chunks alive at the peak
        del spectra
        yield flux
        del flux


def build_parser():
    parser = base_parser("Input Jacobians d label / d flux of one shard of stars.")
    parser.add_argument("--model", required=True, help="trained model directory")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                        help="input format (default: recognized from the input's content)")
    parser.add_argument("--shard", type=int, default=0, help="shard index i (0-based)")
    parser.add_argument("--shards", type=int, default=1, help="number of shards n")
    parser.add_argument("--out", required=True, help="shard FITS to write")
    parser.add_argument("input", help="canonical FITS, apStar file or directory")
    return parser


def shard_star_ids(path, fmt: str, wave: np.ndarray, config: dict) -> np.ndarray:
    """STAR_IDs of every star of the input (no flux read for a canonical FITS)."""
    if fmt == "fits":
        return np.asarray(read_labels(path)["STAR_ID"]).astype(str)
    return load_input(path, fmt, wave, config)[0].star_id


def run(args, config: dict) -> None:
    runtime.configure(config, args.threads)
    shard_rows(1, args.shards, args.shard)  # fail on a bad shard index before any work
    model, scaler, wave = load_trained(args.model)
    fmt = detect_format(args.input) if args.format == "auto" else args.format
    star_id = shard_star_ids(args.input, fmt, wave, config)
    rows = shard_rows(star_id.size, args.shards, args.shard)
    cfg = config["jacobian"]
    header = provenance(config, device=runtime.device_name(), model=str(args.model),
                        input=str(args.input), shard=args.shard, nshards=args.shards)
    flux = shard_flux(args.input, fmt, wave, config, rows, cfg["chunk_size"])
    write_jacobian_shard(
        args.out, jacobian_batches(model, scaler, flux, cfg["batch_size"]),
        len(rows), star_id[rows], rows, wave, header)
    log.info("%s: shard %d/%d, %d stars x %d pixels -> %s", args.input, args.shard,
             args.shards, len(rows), wave.size, args.out)


if __name__ == "__main__":
    raise SystemExit(main(build_parser, run))
