"""Jacobian shard files: their one writer and their readers.

A shard FITS holds the input Jacobians of a contiguous block of stars of one input:

    PRIMARY   provenance, NSTARS, NPIX, SHARD, NSHARDS
    JACOBIAN  float32 image (n, 3, P): d label_k / d flux_p in physical label units per unit
              normalized flux; LABEL1..3 and LUNIT1..3 name the label order and units
    STAR_ID   BinTable: STAR_ID, ROW (row of the star in the input)
    WAVE      float64 (P,), BUNIT = 'Angstrom'

Stars are split into ``n`` contiguous shards with ``np.array_split`` semantics (the first
N mod n shards hold one star more); shard ``i`` holds rows ``array_split(arange(N), n)[i]``.
The JACOBIAN image is written batch by batch (astropy StreamingHDU) into a temporary file
renamed at the end, so peak memory holds one batch of Jacobians whatever the number of stars,
and a killed job leaves no complete-looking shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from astropy.io import fits

from pipeline import LABEL_UNITS, LABELS
from pipeline.artifacts.atomic import atomic_path
from pipeline.exceptions import ConfigError, DataError, OutputError


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


@contextlib.contextmanager
def open_shards(paths):
    """Open shard FITS files memory-mapped; check they share one wavelength grid."""
    with contextlib.ExitStack() as stack:
        shards, wave = [], None
        for path in map(Path, paths):
            if not path.is_file():
                raise DataError(f"Jacobian shard '{path}' does not exist; run the jacobian step")
            hdul = stack.enter_context(fits.open(path, memmap=True))
            if "JACOBIAN" not in hdul or "WAVE" not in hdul:
                raise DataError(f"'{path}' is not a Jacobian shard: it needs HDUs JACOBIAN and "
                                "WAVE (written by python -m pipeline.steps.jacobian)")
            w = np.asarray(hdul["WAVE"].data, np.float64)
            if wave is None:
                wave, first = w, path
            elif w.shape != wave.shape or not np.array_equal(w, wave):
                raise DataError(f"'{path}': HDU 'WAVE' differs from that of '{first}'; all "
                                "shards of one summary must share the model grid")
            if hdul["JACOBIAN"].header["NAXIS3"] > 0:
                shards.append(hdul["JACOBIAN"].data)
        if wave is None:
            raise DataError("no Jacobian shards given (--jacobians)")
        yield shards, wave


def read_jacobian_rows(path: Path, select) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From one shard, the rows that ``select(star_ids) -> integer rows`` picks.

    The image is memory-mapped so only the selected rows are read from disk.

    Returns:
        star ids of the selected rows (k,), WAVE float64 (P,), JACOBIAN float32 (k, 3, P),
        rows in file order.
    """
    try:
        with fits.open(path, memmap=True) as hdul:
            for name in ("JACOBIAN", "WAVE", "STAR_ID"):
                if name not in hdul:
                    raise DataError(f"'{path}': missing HDU '{name}'; rerun the jacobian step")
            star_id = np.asarray(hdul["STAR_ID"].data["STAR_ID"]).astype(str)
            wave = np.array(hdul["WAVE"].data, dtype=np.float64)
            image = hdul["JACOBIAN"].data
            if image is None or image.ndim != 3 or image.shape[1] != len(LABELS):
                shape = None if image is None else image.shape
                raise DataError(f"'{path}': JACOBIAN has shape {shape}, expected (n, 3, P)")
            rows = np.sort(np.asarray(select(star_id), dtype=np.int64))
            jac = np.array(image[rows], dtype=np.float32)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"'{path}': not a readable Jacobian shard ({exc}); rerun the jacobian step"
        ) from None
    return star_id[rows], wave, jac


def shard_star_ids(path: Path) -> np.ndarray:
    """The STAR_ID column of one Jacobian shard (the image itself is not read)."""
    try:
        with fits.open(path, memmap=True) as hdul:
            return np.asarray(hdul["STAR_ID"].data["STAR_ID"]).astype(str)
    except Exception as exc:
        raise DataError(f"'{path}': no readable STAR_ID table ({exc}); rerun the jacobian "
                        "step") from None
