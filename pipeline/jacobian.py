"""Step ``jacobian``: input Jacobians d label / d flux of one shard of stars, streamed to FITS.

    python -m pipeline.jacobian [--config-json J] --model DIR --format fits|apstar \
        --shard i --shards n --out results/jacobians/<name>/shard-<i>.fits INPUT

Stars are split into ``n`` contiguous shards with ``np.array_split`` semantics (the first
N mod n shards hold one star more); shard ``i`` holds rows ``array_split(arange(N), n)[i]``.
The shard file holds

    PRIMARY   provenance, NSTARS, NPIX, SHARD, NSHARDS
    JACOBIAN  float32 image (n, 3, P): d label_k / d flux_p in physical label units per unit
              normalized flux; LABEL1..3 and LUNIT1..3 name the label order and units
    STAR_ID   BinTable: STAR_ID, ROW (row of the star in the input)
    WAVE      float64 (P,), BUNIT = 'Angstrom'

The JACOBIAN image is computed and written batch by batch (astropy StreamingHDU) into a
temporary file renamed at the end, so peak memory holds one batch of Jacobians whatever the
number of stars, and a killed job leaves no complete-looking shard.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from astropy.io import fits

from pipeline import LABEL_UNITS, LABELS
from pipeline.cli import base_parser, main
from pipeline.exceptions import ConfigError, OutputError
from pipeline.io import atomic_path, provenance
from pipeline.streaming import batches, progress

log = logging.getLogger(__name__)


def shard_rows(n_stars: int, shards: int, shard: int) -> np.ndarray:
    """Rows of shard ``shard`` of ``shards`` contiguous shards (``np.array_split`` semantics)."""
    if shards < 1:
        raise ConfigError(f"--shards must be at least 1, got {shards}")
    if not 0 <= shard < shards:
        raise ConfigError(f"--shard {shard} is out of range: valid shards are 0..{shards - 1}")
    return np.array_split(np.arange(n_stars), shards)[shard]


def jacobian_header(n_stars: int, n_pixels: int) -> fits.Header:
    """Header of the streamed JACOBIAN image extension (n, 3, P) float32."""
    header = fits.Header()
    header["XTENSION"] = ("IMAGE", "image extension")
    header["BITPIX"] = -32
    header["NAXIS"] = 3
    header["NAXIS1"] = (n_pixels, "pixel P (see WAVE)")
    header["NAXIS2"] = (len(LABELS), "label k (LABEL1..3)")
    header["NAXIS3"] = (n_stars, "star (see STAR_ID)")
    header["PCOUNT"] = 0
    header["GCOUNT"] = 1
    header["EXTNAME"] = "JACOBIAN"
    for k, label in enumerate(LABELS, start=1):
        header[f"LABEL{k}"] = (label, f"label of index {k - 1} along NAXIS2")
        header[f"LUNIT{k}"] = (LABEL_UNITS[label], f"unit of d {label} / d flux")
    header["COMMENT"] = "d label / d flux in physical label units per unit normalized flux"
    return header


def write_jacobian_shard(path: str | Path, jacobians: Iterator[np.ndarray], n_stars: int,
                         star_id: np.ndarray, rows: np.ndarray, wave: np.ndarray,
                         header: dict) -> None:
    """Stream batches (B, 3, P) of ``jacobians`` (n_stars rows in all) into a shard FITS."""
    wave = np.asarray(wave, np.float64)
    with atomic_path(path) as tmp:
        primary = fits.PrimaryHDU()
        for key, value in header.items():
            primary.header[key] = value
        primary.header["NSTARS"] = (n_stars, "stars in this shard")
        primary.header["NPIX"] = (wave.size, "pixels")
        primary.writeto(tmp, overwrite=True)
        # a str path: astropy's StreamingHDU reduces a Path to its bare name (cwd-relative)
        stream = fits.StreamingHDU(str(Path(tmp).resolve()), jacobian_header(n_stars, wave.size))
        written = 0
        try:
            for jac in jacobians:
                jac = np.ascontiguousarray(jac, dtype=np.float32)
                if jac.shape[1:] != (len(LABELS), wave.size):
                    raise OutputError(f"'{path}': Jacobian batch has shape {jac.shape}, "
                                      f"expected (B, {len(LABELS)}, {wave.size})")
                if jac.shape[0]:  # a full (or empty) stream refuses even an empty write
                    stream.write(jac)
                written += jac.shape[0]
        finally:
            stream.close()
        if written != n_stars:
            raise OutputError(f"'{path}': wrote {written} Jacobians for {n_stars} stars")
        ids = fits.BinTableHDU.from_columns([
            fits.Column("STAR_ID", format=f"{max(1, max(map(len, star_id), default=1))}A",
                        array=np.asarray(star_id, str)),
            fits.Column("ROW", format="K", array=np.asarray(rows, np.int64)),
        ], name="STAR_ID")
        wave_hdu = fits.ImageHDU(wave, name="WAVE")
        wave_hdu.header["BUNIT"] = "Angstrom"
        wave_hdu.header["COMMENT"] = "vacuum wavelength"
        with fits.open(tmp, mode="append") as hdul:
            hdul.append(ids)
            hdul.append(wave_hdu)


def jacobian_batches(model, scaler, chunks: Iterator[np.ndarray], batch_size: int,
                     jacobian_fn: Callable | None = None) -> Iterator[np.ndarray]:
    """Yield input Jacobians (B, 3, P) float32 in physical units, one batch at a time.

    ``chunks`` yields flux arrays (n, P) (e.g. successive row slices of a file), so neither the
    flux nor the Jacobians of more than one chunk are in memory at once.
    """
    if jacobian_fn is None:
        from pipeline.derivatives import input_jacobian as jacobian_fn
    for flux in chunks:
        for s in batches(flux.shape[0], batch_size):
            yield np.asarray(jacobian_fn(model, np.asarray(flux[s]), batch_size=batch_size,
                                         scaler=scaler), np.float32)
        # drop this chunk before the next one is read, or two chunks are alive at once and
        # the peak grows with the number of chunks read
        del flux


def shard_flux(path, fmt: str, wave: np.ndarray, config: dict, rows: np.ndarray,
               chunk_size: int) -> Iterator[np.ndarray]:
    """Flux of the shard's ``rows`` on the model grid, ``chunk_size`` stars at a time.

    A canonical FITS is read through memory maps one row slice at a time, so peak memory does
    not grow with the number of stars; apStar inputs (one file per star) are read whole.
    """
    from pipeline.predict import load_input

    if fmt != "fits":
        yield load_input(path, fmt, wave, config)[0].flux[rows]
        return
    starts = range(0, len(rows), chunk_size)
    for start in progress(starts, total=len(starts), desc="jacobian"):
        stop = min(start + chunk_size, len(rows))
        rows_slice = slice(rows[start], rows[stop - 1] + 1)
        yield load_input(path, fmt, wave, config, rows=rows_slice)[0].flux


def build_parser():
    parser = base_parser("Input Jacobians d label / d flux of one shard of stars.")
    parser.add_argument("--model", required=True, help="trained model directory")
    parser.add_argument("--format", choices=("fits", "apstar"), default="fits")
    parser.add_argument("--shard", type=int, default=0, help="shard index i (0-based)")
    parser.add_argument("--shards", type=int, default=1, help="number of shards n")
    parser.add_argument("--out", required=True, help="shard FITS to write")
    parser.add_argument("input", help="canonical FITS, apStar file or directory")
    return parser


def shard_star_ids(path, fmt: str, wave: np.ndarray, config: dict) -> np.ndarray:
    """STAR_IDs of every star of the input (no flux read for a canonical FITS)."""
    if fmt == "fits":
        from pipeline.io import read_labels

        return np.asarray(read_labels(path)["STAR_ID"]).astype(str)
    from pipeline.predict import load_input

    return load_input(path, fmt, wave, config)[0].star_id


def run(args, config: dict) -> None:
    from pipeline.predict import device_name, load_model

    shard_rows(1, args.shards, args.shard)  # fail on a bad shard index before any work
    model, scaler, wave = load_model(args.model)
    star_id = shard_star_ids(args.input, args.format, wave, config)
    rows = shard_rows(star_id.size, args.shards, args.shard)
    cfg = config["jacobian"]
    header = provenance(config, device=device_name(), model=str(args.model),
                        input=str(args.input), shard=args.shard, nshards=args.shards)
    flux = shard_flux(args.input, args.format, wave, config, rows, cfg["chunk_size"])
    write_jacobian_shard(
        args.out, jacobian_batches(model, scaler, flux, cfg["batch_size"]),
        len(rows), star_id[rows], rows, wave, header)
    log.info("%s: shard %d/%d, %d stars x %d pixels -> %s", args.input, args.shard,
             args.shards, len(rows), wave.size, args.out)


if __name__ == "__main__":
    raise SystemExit(main(build_parser, run))
