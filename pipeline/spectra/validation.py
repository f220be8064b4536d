"""Validation of canonical dataset FITS contents (docs/data.md) and grid matching.

Each check raises :class:`DataError` naming the file, HDU, column or row and what would fix it:

* a missing HDU or column; an empty HDU;
* FLUX, FLUX_ERR, WAVE, LABELS (and MASK) sizes that disagree;
* a non-finite or non-increasing WAVE (first offending pixel named);
* duplicate STAR_IDs (first duplicate and its rows named);
* a spectrum that is entirely bad (NaN/inf flux or error <= 0), all zeros, or whose bad-pixel
  fraction exceeds ``max_bad_pixel_fraction`` (config ``data.max_bad_pixel_fraction``);
* NaN labels in training data (dropped with a logged count, or an error: ``data.nan_labels``);
* labels without variance in a training set (:func:`check_label_variance`).

Bad pixels (non-finite flux, non-finite or non-positive error, nonzero MASK) are replaced
(flux 1, error ``bad_pixel_err``) and counted in ``meta['N_BADPIX']``, never used silently.
:func:`match_grid` maps spectra onto a model's wavelength grid or raises GridMismatchError.
:func:`spectrum_snr` measures each spectrum's SNR on its good pixels (the shift statistics'
SNR trends and the noise response of the error budget use it).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline import LABELS
from pipeline.exceptions import DataError, GridMismatchError
from pipeline.spectra.dataset import DEFAULT_BAD_PIXEL_ERR, Spectra

log = logging.getLogger(__name__)


def check_hdus(path: Path, hdul, required) -> None:
    names = [hdu.name for hdu in hdul]
    for name in required:
        if name not in names:
            raise DataError(
                f"'{path}': HDU '{name}' is missing (found {names}); a canonical dataset FITS "
                f"needs {list(required)} (see docs/data.md)"
            )


def validate_spectra(path, spectra, *, bad_pixel_err, require_labels, nan_labels,
                     max_bad_pixel_fraction=0.5):
    """Check shapes, grid, ids, labels; flag bad pixels. Returns the cleaned Spectra."""
    check_shapes(path, spectra)
    check_wave(path, spectra.wave)
    check_star_ids(path, spectra.labels)
    spectra = flag_bad_pixels(path, spectra, bad_pixel_err, max_bad_pixel_fraction)
    if require_labels:
        spectra = check_labels(path, spectra, nan_labels)
    return spectra


def check_image_rows(path, hdul, names) -> None:
    """Before a row slice is read: the 2-D images present must have as many rows as LABELS."""
    n_labels = hdul["LABELS"].header.get("NAXIS2", 0)
    for name in names:
        if name in hdul and hdul[name].header.get("NAXIS") == 2:
            n = hdul[name].header["NAXIS2"]
            if n != n_labels:
                raise DataError(f"'{path}': HDU '{name}' has {n} spectra but 'LABELS' has "
                                f"{n_labels} rows; they must match row by row")


def check_shapes(path, spectra) -> None:
    if spectra.flux.ndim != 2:
        raise DataError(f"'{path}': HDU 'FLUX' must be a 2-D image (N, P), got shape "
                        f"{spectra.flux.shape}")
    n, p = spectra.flux.shape
    if n == 0 or p == 0:
        raise DataError(f"'{path}': HDU 'FLUX' is empty (shape {spectra.flux.shape})")
    if spectra.flux_err.shape != spectra.flux.shape:
        raise DataError(f"'{path}': HDU 'FLUX_ERR' has shape {spectra.flux_err.shape} but "
                        f"'FLUX' has {spectra.flux.shape}; they must match")
    if spectra.wave.shape != (p,):
        raise DataError(f"'{path}': HDU 'WAVE' has shape {spectra.wave.shape}, expected ({p},)"
                        " to match the pixels of 'FLUX'")
    if spectra.mask is not None and spectra.mask.shape != spectra.flux.shape:
        raise DataError(f"'{path}': HDU 'MASK' has shape {spectra.mask.shape} but 'FLUX' has "
                        f"{spectra.flux.shape}; they must match")
    if len(spectra.labels) != n:
        raise DataError(f"'{path}': HDU 'LABELS' has {len(spectra.labels)} rows but 'FLUX' "
                        f"has {n} spectra; they must match row by row")


def check_wave(path, wave) -> None:
    bad = np.flatnonzero(~np.isfinite(wave))
    if bad.size:
        raise DataError(f"'{path}': HDU 'WAVE' pixel {bad[0]} is {wave[bad[0]]}; wavelengths "
                        "must be finite")
    step = np.flatnonzero(np.diff(wave) <= 0)
    if step.size:
        i = step[0]
        raise DataError(f"'{path}': HDU 'WAVE' is not strictly increasing at pixel {i + 1} "
                        f"({wave[i]} -> {wave[i + 1]}); sort the pixels by wavelength")


def check_star_ids(path, labels) -> None:
    if "STAR_ID" not in labels.colnames:
        raise DataError(f"'{path}': HDU 'LABELS' lacks column 'STAR_ID' (one identifier per "
                        "spectrum)")
    ids = np.char.strip(np.asarray(labels["STAR_ID"]).astype(str))
    unique, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if np.any(counts > 1):
        dup = unique[np.argmax(counts > 1)]
        rows = np.flatnonzero(ids == dup)[:5].tolist()
        raise DataError(f"'{path}': HDU 'LABELS' column 'STAR_ID' value '{dup}' occurs "
                        f"{counts.max()} times (rows {rows}); STAR_IDs must be unique")


CHUNK_ROWS = 4096  # rows per pass of the pixel checks: temporaries are O(CHUNK_ROWS x P)


def _row_chunks(n: int):
    return (slice(start, min(start + CHUNK_ROWS, n)) for start in range(0, n, CHUNK_ROWS))


def _bad_pixels(flux, flux_err, mask, finite=None) -> np.ndarray:
    """(n, P) bool: non-finite flux, non-finite or non-positive error, or nonzero mask."""
    bad = ~np.isfinite(flux) if finite is None else ~finite
    bad |= ~(flux_err > 0)  # also NaN
    bad |= np.isinf(flux_err)
    if mask is not None:
        bad |= mask != 0
    return bad


def flag_bad_pixels(path, spectra, bad_pixel_err, max_bad_pixel_fraction=0.5):
    """Replace bad pixels by flux 1, error ``bad_pixel_err``; reject hopeless spectra.

    Two passes over chunks of ``CHUNK_ROWS`` rows, so that no (N, P) temporary exists: the
    first collects per-row counts and raises before anything is changed, the second replaces
    the bad pixels of ``spectra.flux`` and ``spectra.flux_err`` in place.
    """
    flux, flux_err, mask = spectra.flux, spectra.flux_err, spectra.mask
    n, p = flux.shape
    no_finite, all_zero = np.zeros(n, bool), np.zeros(n, bool)
    n_bad_row = np.zeros(n, np.int64)
    for rows in _row_chunks(n):
        finite = np.isfinite(flux[rows])
        no_finite[rows] = ~finite.any(axis=1)
        # a row is "all zeros" when every finite pixel is 0 (as np.where(finite, flux, 0) == 0)
        all_zero[rows] = ~((flux[rows] != 0) & finite).any(axis=1)
        bad = _bad_pixels(flux[rows], flux_err[rows], None if mask is None else mask[rows],
                          finite)
        n_bad_row[rows] = np.count_nonzero(bad, axis=1)
    checks = (
        (no_finite, "is entirely NaN or infinite"),
        (all_zero, "is all zeros"),
        (n_bad_row / p > max_bad_pixel_fraction,
         f"has more than a fraction {max_bad_pixel_fraction} of bad pixels (non-finite flux, "
         "error <= 0 or masked; config data.max_bad_pixel_fraction)"),
    )
    for rows, what in checks:
        if rows.any():
            row = int(np.flatnonzero(rows)[0])
            raise DataError(f"'{path}': HDU 'FLUX' row {row} (STAR_ID "
                            f"'{spectra.star_id[row]}') {what}; remove the spectrum "
                            f"({int(rows.sum())} such rows)")
    n_bad = int(n_bad_row.sum())
    if n_bad:
        log.info("%s: %d bad pixels (%.3g%%) set to flux 1, error %g", path, n_bad,
                 100.0 * n_bad / (n * p), bad_pixel_err)
        for rows in _row_chunks(n):
            if n_bad_row[rows].any():
                bad = _bad_pixels(flux[rows], flux_err[rows],
                                  None if mask is None else mask[rows])
                flux[rows][bad] = 1.0
                flux_err[rows][bad] = bad_pixel_err
    spectra.meta["N_BADPIX"] = n_bad
    return spectra


def bad_pixel_mask(spectra, bad_pixel_err: float) -> np.ndarray:
    """(N, P) bool: pixels flagged bad on reading (error >= bad_pixel_err, or masked).

    Their flux is the fixed replacement 1, not a measurement: they add no flux noise.
    """
    err = spectra.flux_err
    bad = ~np.isfinite(err) | (err <= 0) | (err >= bad_pixel_err)
    if spectra.mask is not None and spectra.mask.shape == err.shape:
        bad |= spectra.mask != 0
    return bad


def check_labels(path, spectra, nan_labels):
    for name in LABELS:
        if name not in spectra.labels.colnames:
            raise DataError(f"'{path}': HDU 'LABELS' lacks column '{name}', needed for training")
    y = spectra.label_array()
    bad = ~np.all(np.isfinite(y), axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        if nan_labels == "fail":
            raise DataError(f"'{path}': HDU 'LABELS' row {row} has a NaN label "
                            f"({int(bad.sum())} such rows); remove the rows or set "
                            "data.nan_labels: drop")
        log.warning("%s: dropping %d stars with NaN labels (first: row %d)", path, bad.sum(), row)
        spectra = spectra.subset(~bad)
        if spectra.n_stars == 0:
            raise DataError(f"'{path}': every star has a NaN label; no training data left")
    return spectra


def check_label_variance(spectra, path="training set") -> None:
    """Raise DataError if a training set has < 2 stars or a label without variance."""
    check_training_labels(spectra.label_array(), path)


def check_training_labels(y: np.ndarray, path="training set") -> None:
    """DataError unless labels ``y`` (N, 3) can be learnt: at least 2 stars, each label
    varying. A label whose (NaN-ignoring) standard deviation is below 1e-12 of its magnitude
    is constant to float64 round-off."""
    y = np.asarray(y, np.float64)
    if y.shape[0] < 2:
        raise DataError(f"'{path}': {y.shape[0]} star(s); training needs at least 2")
    with np.errstate(all="ignore"):
        mean, std = np.nanmean(y, axis=0), np.nanstd(y, axis=0)
    for j, name in enumerate(LABELS):
        if not std[j] > 1e-12 * max(abs(mean[j]), 1.0):
            raise DataError(f"'{path}': HDU 'LABELS' column '{name}' has zero variance: it is "
                            f"constant (every star has {mean[j]:g}); a network cannot learn it: "
                            "use stars that span the label or drop the label")


# -------------------------------------------------------------------------- grid matching
def _describe(wave) -> str:
    return f"{wave.size} pixels, {wave[0]:.3f}-{wave[-1]:.3f} A"


def match_grid(spectra, wave_model, path="spectra", bad_pixel_err=None, rtol=1e-9):
    """``spectra`` on the model grid ``wave_model`` (P_model,).

    * the same grid (size and values to ``rtol``): returned unchanged;
    * every model pixel is a pixel of the input (e.g. a full apStar grid onto the 7213-pixel
      chip grid): sliced exactly;
    * the input range covers the model range: flux, errors and mask linearly interpolated
      in wavelength; a model pixel falling in a gap of the input grid (a step wider than 1.5
      times the median) or next to a bad input pixel (error >= ``bad_pixel_err``) is bad
      (flux 1, error ``bad_pixel_err``, by default that of
      :func:`pipeline.spectra.fits.read_spectra`);
      ``meta['RESAMPLD'] = True``.

    Raises:
        GridMismatchError: the input does not cover the model grid; names both grids.
    """
    wave_in, wave_model = np.asarray(spectra.wave, np.float64), np.asarray(wave_model, float)
    if wave_in.size == wave_model.size and np.allclose(wave_in, wave_model, rtol=rtol, atol=0):
        return spectra
    tol = rtol * wave_model
    if wave_in[0] > wave_model[0] + tol[0] or wave_in[-1] < wave_model[-1] - tol[-1]:
        raise GridMismatchError(
            f"'{path}': its wavelength grid ({_describe(wave_in)}) does not cover the model "
            f"grid ({_describe(wave_model)}); supply spectra spanning the model grid or "
            "retrain the model on this grid")
    hi = np.clip(np.searchsorted(wave_in, wave_model), 1, wave_in.size - 1)
    lo = hi - 1
    exact = np.where(np.abs(wave_in[hi] - wave_model) <= tol, hi,
                     np.where(np.abs(wave_in[lo] - wave_model) <= tol, lo, -1))
    meta = dict(spectra.meta)
    if np.all(exact >= 0):
        mask = None if spectra.mask is None else spectra.mask[:, exact]
        return Spectra(spectra.flux[:, exact], spectra.flux_err[:, exact], wave_model,
                       spectra.labels, mask, meta)
    bad_err = DEFAULT_BAD_PIXEL_ERR if bad_pixel_err is None else bad_pixel_err
    t = ((wave_model - wave_in[lo]) / (wave_in[hi] - wave_in[lo])).clip(0, 1)

    def interp(a):
        return (a[:, lo] * (1 - t) + a[:, hi] * t).astype(a.dtype)

    flux, flux_err = interp(spectra.flux), interp(spectra.flux_err)
    step = np.diff(np.log(wave_in))
    gap = (np.log(wave_in[hi]) - np.log(wave_in[lo])) > 1.5 * np.median(step)
    bad = gap[None, :] | (spectra.flux_err[:, lo] >= bad_err) | (spectra.flux_err[:, hi] >= bad_err)
    mask = None
    if spectra.mask is not None:
        mask = spectra.mask[:, lo] | spectra.mask[:, hi]
        bad |= mask != 0
    flux[bad], flux_err[bad] = 1.0, bad_err
    meta.update(RESAMPLD=True, N_BADPIX=int(bad.sum()))
    log.info("%s: resampled from %s onto %s (%d bad pixels)", path, _describe(wave_in),
             _describe(wave_model), int(bad.sum()))
    return Spectra(flux, flux_err, wave_model, spectra.labels, mask, meta)


def spectrum_snr(flux: np.ndarray, flux_err: np.ndarray, good: np.ndarray,
                 batch_size: int = 256, threads: int = 1) -> np.ndarray:
    """(N,) median over good pixels of flux / flux_err (NaN for a star with none).

    Measured from the spectrum itself, so that stars without an SNR column (real inputs) are
    compared with validation stars on the same footing. Streams ``batch_size`` stars, up to
    ``threads`` batches at once (the sort that finds the medians releases the GIL; every
    thread count gives the same values).
    """
    out = np.full(len(flux), np.nan)

    def batch(sl):
        g = np.asarray(good[sl], bool)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(g, np.asarray(flux[sl], np.float64) / flux_err[sl], np.nan)
        out[sl] = row_nanmedian(ratio, g.sum(axis=1))

    with ThreadPoolExecutor(max(1, int(threads))) as pool:
        list(pool.map(batch, [slice(s, s + batch_size)
                              for s in range(0, len(flux), batch_size)]))
    return out


def row_nanmedian(values: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Median of the non-NaN entries of each row of ``values`` (B, P), ``count`` (B,) of them
    per row (NaN where 0): ``numpy.nanmedian(values, axis=1)`` without its per-row Python loop
    (it falls back to one for rows longer than 600). The median is the mean of the elements
    (c - 1) // 2 and c // 2 of the c values in order, NaNs last; one partition at the positions
    any row needs puts them in place (about half the time of a full sort of 7213 pixels, even
    with a third of them bad: a few dozen positions per batch)."""
    lo, hi = np.maximum(count - 1, 0) // 2, np.maximum(count, 1) // 2
    ordered = np.partition(values, np.unique(np.concatenate([lo, hi])), axis=1)
    rows = np.arange(len(values))
    with np.errstate(invalid="ignore"):
        median = (ordered[rows, lo] + ordered[rows, hi]) / 2
    return np.where(count > 0, median, np.nan)
