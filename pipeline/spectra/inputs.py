"""Any input of the predict and jacobian steps, recognized by content and read onto the
model's wavelength grid.

Formats (``--format`` overrides the detection):

* ``fits``: a canonical dataset FITS, recognized by its HDUs FLUX, FLUX_ERR, WAVE, LABELS;
* ``apstar``: an SDSS APOGEE apStar file, recognized by a log-linear grid in the primary
  header (CRVAL1, CDELT1) and flux, error and bitmask images in HDUs 1-3 whose rows have
  the header's NWAVE (or NAXIS1) pixels; or a directory of ``apStar*.fits`` files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from pipeline.exceptions import ConfigError, DataError
from pipeline.spectra.apogee import read_apstar_files
from pipeline.spectra.dataset import Spectra
from pipeline.spectra.fits import read_labels, read_options, read_spectra
from pipeline.spectra.validation import match_grid
from pipeline.streaming import progress

FORMATS = ("fits", "apstar")
CANONICAL_HDUS = ("FLUX", "FLUX_ERR", "WAVE", "LABELS")


def detect_format(path: str | Path) -> str:
    """'fits' or 'apstar' from the content of ``path``; DataError saying what was found."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input '{path}' does not exist")
    if path.is_dir():
        if any(path.glob("apStar*.fits")) or any(path.glob("apStar*.fits.gz")):
            return "apstar"
        raise DataError(f"input directory '{path}' holds no apStar*.fits files; pass a "
                        "canonical dataset FITS, an apStar file or a directory of them")
    try:  # headers only: a damaged data block is the format reader's to report
        with fits.open(path, memmap=True, lazy_load_hdus=False) as hdul:
            headers = [(hdu.name, hdu.header) for hdu in hdul]
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError on damage
        raise DataError(f"input '{path}' is not a readable FITS file ({exc})") from None
    names = [name for name, _ in headers]
    if any(name in names for name in CANONICAL_HDUS):
        return "fits"  # the canonical reader names any missing HDU precisely
    primary = headers[0][1]
    sizes = [h.get("NAXIS1") for _, h in headers[1:4] if h.get("NAXIS", 0) >= 1]
    n_wave = primary.get("NWAVE", sizes[0] if sizes else None)
    if ("CRVAL1" in primary and "CDELT1" in primary and len(sizes) == 3
            and all(n == n_wave for n in sizes)):
        return "apstar"
    found = ", ".join(
        f"{i}:{name or '(no name)'} "
        f"{tuple(h.get(f'NAXIS{a}') for a in range(h.get('NAXIS', 0), 0, -1))}"
        for i, (name, h) in enumerate(headers))
    raise DataError(f"input '{path}' is neither a canonical dataset FITS (HDUs "
                    f"{', '.join(CANONICAL_HDUS)}) nor an apStar file (CRVAL1/CDELT1 in the "
                    f"primary header, flux, error and bitmask images in HDUs 1-3); found HDUs "
                    f"{found}")


def read_labelled_on_grid(paths, wave: np.ndarray, config: dict) -> list[Spectra]:
    """Labelled canonical dataset FITS files (the train and valid splits a fit reads),
    validated as ``data.*`` says and mapped onto the model grid ``wave``."""
    bad_pixel_err = config["data"]["bad_pixel_err"]
    return [match_grid(read_spectra(p, require_labels=True, **read_options(config)), wave,
                       path=p, bad_pixel_err=bad_pixel_err) for p in paths]


def load_input(path: str | Path, fmt: str | None, wave: np.ndarray, config: dict,
               rows: slice | None = None) -> tuple[Spectra, bool]:
    """Spectra of ``path`` on the model grid ``wave`` and whether they were interpolated.

    ``fmt`` None (or 'auto') detects the format (:func:`detect_format`); 'fits' reads a
    canonical dataset FITS and maps it with ``match_grid`` (GridMismatchError when the grid
    does not cover the model's); 'apstar' reads one apStar file or a directory of them
    (``pipeline.spectra.apogee.read_apstar_files``).
    ``rows`` reads only that slice of a canonical FITS (memory-mapped), for streaming.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"input '{path}' does not exist")
    if fmt in (None, "auto"):
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise ConfigError(f"--format '{fmt}' is not valid; valid choices: auto, "
                          f"{', '.join(FORMATS)}")
    if fmt == "apstar":
        spectra = read_apstar_files([path], wave, config)
        return spectra, bool(spectra.meta.get("RESAMPLD", False))
    bad_pixel_err = config["data"]["bad_pixel_err"]
    spectra = read_spectra(path, bad_pixel_err=bad_pixel_err,
                           max_bad_pixel_fraction=config["data"]["max_bad_pixel_fraction"],
                           rows=rows)
    spectra.meta.pop("RESAMPLD", None)  # a card of the input file says nothing about this run
    spectra = match_grid(spectra, wave, path=path, bad_pixel_err=bad_pixel_err)
    return spectra, bool(spectra.meta.get("RESAMPLD", False))


def input_chunks(path: str | Path, fmt: str, wave: np.ndarray, config: dict, chunk_size: int,
                 rows: np.ndarray | None = None, desc: str = "stars"):
    """(Spectra, resampled) of ``path`` on the model grid, ``chunk_size`` stars at a time.

    ``fmt`` is 'fits' or 'apstar' (resolved, not 'auto'); ``rows`` a contiguous ascending range
    of row indices (default: every star). A canonical FITS is read through memory maps one row
    slice at a time, so peak memory holds one chunk whatever the number of stars; apStar inputs
    (one file per star) are read whole.
    """
    if fmt != "fits":
        spectra, resampled = load_input(path, fmt, wave, config)
        yield (spectra if rows is None else spectra.subset(rows)), resampled
        return
    if rows is None:
        rows = np.arange(len(read_labels(path)))
    starts = range(0, len(rows), chunk_size)
    for start in progress(starts, total=len(starts), desc=desc):
        stop = min(start + chunk_size, len(rows))
        yield load_input(path, fmt, wave, config,
                         rows=slice(int(rows[start]), int(rows[stop - 1]) + 1))
