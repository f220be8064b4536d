"""Validation of canonical dataset FITS contents (DESIGN section 3).

Each check raises :class:`DataError` naming the file, HDU, column or row and what would fix it.
Bad pixels are replaced (flux 1, error ``bad_pixel_err``) and counted, never used silently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline import LABELS
from pipeline.exceptions import DataError

log = logging.getLogger(__name__)


def check_hdus(path: Path, hdul, required) -> None:
    names = [hdu.name for hdu in hdul]
    for name in required:
        if name not in names:
            raise DataError(
                f"'{path}': HDU '{name}' is missing (found {names}); a canonical dataset FITS "
                f"needs {list(required)} (see docs/data.md)"
            )


def validate_spectra(path, spectra, *, bad_pixel_err, require_labels, nan_labels):
    """Check shapes, grid, labels; flag bad pixels. Returns the cleaned Spectra."""
    n, p = spectra.flux.shape if spectra.flux.ndim == 2 else (None, None)
    if spectra.flux.ndim != 2:
        raise DataError(f"'{path}': HDU 'FLUX' must be a 2-D image (N, P), got shape "
                        f"{spectra.flux.shape}")
    if spectra.flux_err.shape != spectra.flux.shape:
        raise DataError(f"'{path}': HDU 'FLUX_ERR' has shape {spectra.flux_err.shape} but "
                        f"'FLUX' has {spectra.flux.shape}; they must match")
    if spectra.wave.shape != (p,):
        raise DataError(f"'{path}': HDU 'WAVE' has shape {spectra.wave.shape}, expected ({p},)"
                        " to match the pixels of 'FLUX'")
    if len(spectra.labels) != n:
        raise DataError(f"'{path}': HDU 'LABELS' has {len(spectra.labels)} rows but 'FLUX' "
                        f"has {n} spectra; they must match row by row")
    if "STAR_ID" not in spectra.labels.colnames:
        raise DataError(f"'{path}': HDU 'LABELS' lacks column 'STAR_ID'")
    if not np.all(np.isfinite(spectra.wave)) or np.any(np.diff(spectra.wave) <= 0):
        raise DataError(f"'{path}': HDU 'WAVE' must be finite and strictly increasing")
    spectra = flag_bad_pixels(path, spectra, bad_pixel_err)
    if require_labels:
        spectra = check_labels(path, spectra, nan_labels)
    return spectra


def flag_bad_pixels(path, spectra, bad_pixel_err):
    bad = ~np.isfinite(spectra.flux_err) | (spectra.flux_err <= 0) | ~np.isfinite(spectra.flux)
    if spectra.mask is not None:
        bad |= spectra.mask != 0
    spectra.flux[bad] = 1.0
    spectra.flux_err[bad] = bad_pixel_err
    spectra.meta["N_BADPIX"] = int(bad.sum())
    return spectra


def check_labels(path, spectra, nan_labels):
    for name in LABELS:
        if name not in spectra.labels.colnames:
            raise DataError(f"'{path}': HDU 'LABELS' lacks column '{name}', needed for training")
    y = spectra.label_array()
    bad = ~np.all(np.isfinite(y), axis=1)
    if bad.any():
        if nan_labels == "fail":
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"'{path}': HDU 'LABELS' row {row} has a NaN label; remove the row "
                            "or set data.nan_labels: drop")
        log.warning("%s: dropping %d stars with NaN labels", path, bad.sum())
        spectra = spectra.subset(~bad)
    return spectra
