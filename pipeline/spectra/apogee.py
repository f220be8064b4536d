"""SDSS APOGEE apStar ingest: combined spectra, bitmask, continuum normalization, grid mapping.

An apStar file (DR17) holds HDU 1 flux, HDU 2 error and HDU 3 PIXMASK bitmask, each
(n_rows, 8575), or 1-D when the file has a single row; row 0 is the combined spectrum. The
log-linear vacuum grid is ``10**(CRVAL1 + CDELT1 * i)`` from the primary header (or HDU 1).

Ingest of one star (:func:`read_apstar`):

1. take row 0; a pixel is bad if its APOGEE_PIXMASK has any bit named in
   ``data.apstar.bad_pixel_bits``, its error is not positive or not finite, or its flux is not
   finite; a pixel with a bit of ``data.apstar.persist_bits`` (persistence) keeps its flux
   but its error is multiplied by ``data.apstar.persist_error_factor``;
2. normalize the continuum per detector chip (apStar pixels [246, 3274), [3585, 6080),
   [6344, 8335), the widest ranges of any release, whatever the training grid) by an
   **iteratively sigma-clipped Legendre polynomial** of order
   ``continuum_order`` fitted (unweighted least squares) to the good pixels of the chip:
   after each fit, pixels whose residual is below ``-continuum_clip`` or above
   ``continuum_clip_high`` robust sigmas (1.4826 x median absolute deviation of the kept
   residuals) are excluded, for ``continuum_iterations`` rounds. The asymmetric clip drops
   absorption lines (and cosmic rays / emission on the high side) so the fit settles on the
   continuum; flux and error are divided by it;
3. pixels outside the chips, or whose normalized error reaches ``data.bad_pixel_err`` (APOGEE
   marks some bad pixels only by an error ~1e10 times the flux), are bad; bad pixels get
   flux 1 and error ``data.bad_pixel_err``;
4. map onto the training grid ``wave`` with :func:`pipeline.spectra.validation.match_grid` (an exact
   slice for the named grids of :mod:`pipeline.spectra.grids`, linear interpolation otherwise).

STAR_ID comes from the header APOGEE_ID or OBJID, else from the file name
(``apStar-<release>-<id>.fits``). :func:`ingest` joins the spectra with a label catalog
(CSV or FITS with APOGEE_ID, TEFF, LOGG, FE_H and optional ``*_ERR``; an SDSS allStar table
goes through the quality cuts of :mod:`pipeline.spectra.allstar`) into a training set.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from numpy.polynomial import legendre

from pipeline import LABELS
from pipeline.exceptions import DataError
from pipeline.spectra import allstar
from pipeline.spectra.bitmasks import has_bits, mask_value
from pipeline.spectra.dataset import Spectra
from pipeline.spectra.grids import DETECTOR_CHIPS, apstar_wave
from pipeline.spectra.synthetic import synthetic_config
from pipeline.spectra.validation import check_star_ids, match_grid

log = logging.getLogger(__name__)

CATALOG_ID = "APOGEE_ID"
MISSING = allstar.MISSING


def normalize_continuum(flux, flux_err, bad, order: int, iterations: int, clip_low: float,
                        clip_high: float) -> tuple[np.ndarray, np.ndarray]:
    """Divide one chip (P,) by an iteratively sigma-clipped Legendre continuum.

    Returns the normalized flux and error (P,). Raises DataError (caught by the caller to
    name the file) when fewer than ``order + 2`` good pixels remain.
    """
    x = np.linspace(-1.0, 1.0, flux.size)
    good = ~bad
    keep = good.copy()
    continuum = None
    for _ in range(iterations):
        if keep.sum() < order + 2:
            raise DataError(f"only {int(keep.sum())} continuum pixels left in a chip")
        continuum = legendre.legval(x, legendre.legfit(x[keep], flux[keep], order))
        resid = flux - continuum
        centre = np.median(resid[keep])
        sigma = 1.4826 * np.median(np.abs(resid[keep] - centre))
        keep = good & (resid > -clip_low * sigma) & (resid < clip_high * sigma)
    if not np.all(continuum[good] > 0):
        raise DataError("the continuum fit is not positive")
    return flux / continuum, flux_err / continuum


def inflate_persistence(err, bits, opts: dict) -> np.ndarray:
    """Errors (P,) times ``persist_error_factor`` where PIXMASK has a ``persist_bits`` bit.

    Persistence (charge left by earlier bright exposures, blue chip of APOGEE-N) adds an
    unknown positive offset to the flux, so the pixel is kept but weighted down: a factor
    ``f`` on the error divides its weight ``1 / err**2`` in any chi-square by ``f**2``.
    """
    persist = has_bits(bits, mask_value("APOGEE_PIXMASK", opts["persist_bits"],
                                        "data.apstar.persist_bits"))
    return np.where(persist, err * opts["persist_error_factor"], err)


def _star_id(path: Path, header) -> str:
    for key in ("APOGEE_ID", "OBJID"):
        if str(header.get(key, "")).strip():
            return str(header[key]).strip()
    match = re.match(r"apStar-[^-]+-(.+)\.fits(\.gz)?$", path.name)
    return match.group(1) if match else path.name.split(".")[0]


def _row0(hdul, index: int, path: Path) -> np.ndarray:
    data = hdul[index].data if len(hdul) > index else None
    if data is None:
        raise DataError(f"'{path}': apStar HDU {index} (flux, error, bitmask = 1, 2, 3) is "
                        "missing or empty; is this an apStar file?")
    return np.asarray(data[0] if data.ndim == 2 else data, dtype=np.float64)


def _native_grid(hdul, n_pixels: int, path: Path) -> np.ndarray:
    for header in (hdul[0].header, hdul[1].header):
        if "CRVAL1" in header and "CDELT1" in header:
            return 10.0 ** (header["CRVAL1"] + header["CDELT1"] * np.arange(n_pixels))
    raise DataError(f"'{path}': no CRVAL1/CDELT1 in the primary header or HDU 1; cannot "
                    "build the wavelength grid")


def read_apstar(path, wave, cfg: dict | None = None) -> Spectra:
    """One apStar file as a normalized one-star :class:`Spectra` on the grid ``wave``."""
    data = synthetic_config(cfg)
    opts = data["apstar"]
    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            flux, err = _row0(hdul, 1, path), _row0(hdul, 2, path)
            bits = _row0(hdul, 3, path).astype(np.int64)
            native = _native_grid(hdul, flux.size, path)
            header = hdul[0].header
            star_id, snr = _star_id(path, header), float(header.get("SNR", np.nan))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"'{path}': not a readable apStar FITS file ({type(exc).__name__}: "
                        f"{exc})") from None
    if not (flux.shape == err.shape == bits.shape):
        raise DataError(f"'{path}': apStar HDUs 1-3 have shapes {flux.shape}, {err.shape}, "
                        f"{bits.shape}; they must match")
    bad = (has_bits(bits, mask_value("APOGEE_PIXMASK", opts["bad_pixel_bits"],
                                     "data.apstar.bad_pixel_bits"))
           | ~(err > 0) | ~np.isfinite(flux) | ~np.isfinite(err))
    err = inflate_persistence(err, bits, opts)
    norm_flux, norm_err = np.ones_like(flux), np.full_like(err, data["bad_pixel_err"])
    off_chip = np.ones(flux.size, bool)
    reference = apstar_wave()
    for a, b in DETECTOR_CHIPS:  # chip edges by wavelength, so a shifted grid still works
        chip = (native >= reference[a] * (1 - 1e-9)) & (native <= reference[b - 1] * (1 + 1e-9))
        off_chip &= ~chip
        try:
            f, e = normalize_continuum(flux[chip], err[chip], bad[chip], opts["continuum_order"],
                                       opts["continuum_iterations"], opts["continuum_clip"],
                                       opts["continuum_clip_high"])
        except DataError as exc:
            raise DataError(f"'{path}': chip {reference[a]:.0f}-{reference[b - 1]:.0f} A: "
                            f"{exc}; the spectrum is unusable there") from None
        norm_flux[chip], norm_err[chip] = f, e
    # APOGEE flags some bad pixels only by a huge error (~1e10 x flux): treat them as bad too
    bad |= off_chip | ~np.isfinite(norm_flux) | ~(norm_err < data["bad_pixel_err"])
    norm_flux[bad], norm_err[bad] = 1.0, data["bad_pixel_err"]
    table = Table({"STAR_ID": [star_id], "SNR": [snr]})
    spectra = Spectra(norm_flux[None].astype(np.float32), norm_err[None].astype(np.float32),
                      native, table, meta={"N_BADPIX": int(bad.sum())})
    spectra = match_grid(spectra, wave, path=path, bad_pixel_err=data["bad_pixel_err"])
    spectra.meta["N_BADPIX"] = int((spectra.flux_err >= data["bad_pixel_err"]).sum())
    return spectra


def apstar_paths(paths_or_dirs) -> list[Path]:
    """Files named directly, plus ``apStar*.fits`` in named directories (sorted)."""
    out = []
    for item in [paths_or_dirs] if isinstance(paths_or_dirs, str | Path) else paths_or_dirs:
        item = Path(item)
        if item.is_dir():
            out += sorted(item.glob("apStar*.fits")) + sorted(item.glob("apStar*.fits.gz"))
        elif item.is_file():
            out.append(item)
        else:
            raise DataError(f"apStar input '{item}' does not exist (config data.apstar.paths "
                            "or the predict input)")
    if not out:
        raise DataError(f"no apStar*.fits files found in {list(map(str, paths_or_dirs))}")
    return out


def read_apstar_files(paths_or_dirs, wave, cfg: dict | None = None) -> Spectra:
    """Normalized apStar spectra (N, P) on ``wave``; no labels needed (prediction input).

    ``meta['RESAMPLD']`` is True when the grid needed interpolation, ``meta['N_BADPIX']``
    counts bad pixels on the output grid. Raises DataError on duplicate STAR_IDs.
    """
    wave = np.asarray(wave, np.float64)
    stars = [read_apstar(p, wave, cfg) for p in apstar_paths(paths_or_dirs)]
    labels = Table(rows=[tuple(s.labels[0]) for s in stars], names=stars[0].labels.colnames)
    check_star_ids("apStar inputs", labels)
    flux_err = np.concatenate([s.flux_err for s in stars])
    meta = {"RESAMPLD": any(s.meta.get("RESAMPLD", False) for s in stars),
            "N_BADPIX": int(sum(s.meta["N_BADPIX"] for s in stars))}
    return Spectra(np.concatenate([s.flux for s in stars]), flux_err, wave, labels, meta=meta)


def read_catalog(path, cfg: dict | None = None) -> Table:
    """Label catalog (CSV or FITS) with APOGEE_ID, TEFF, LOGG, FE_H; -9999 becomes NaN.

    An SDSS allStar FITS table (STARFLAG and ASPCAPFLAG columns) first goes through the
    quality cuts of ``data.apstar.allstar`` (:mod:`pipeline.spectra.allstar`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label catalog '{path}' does not exist (config data.apstar.catalog)")
    if allstar.is_allstar(path):
        table, _ = allstar.read_allstar(path, synthetic_config(cfg)["apstar"]["allstar"])
    else:
        table = _read_table(path)
    for name in (CATALOG_ID, *LABELS):
        if name not in table.colnames:
            raise DataError(f"label catalog '{path}' lacks column '{name}' (needs {CATALOG_ID},"
                            f" {', '.join(LABELS)}; optional *_ERR)")
    out = Table({"STAR_ID": np.char.strip(np.asarray(table[CATALOG_ID]).astype(str))})
    for name in [*LABELS, *(f"{n}_ERR" for n in LABELS)]:
        if name in table.colnames:
            values = np.asarray(table[name], dtype=np.float64)
            out[name] = np.where(values <= MISSING + 1, np.nan, values)
    return out


def _read_table(path: Path) -> Table:
    try:
        fmt = "ascii.csv" if path.suffix.lower() == ".csv" else None
        table = Table.read(path, format=fmt) if fmt else Table.read(path)
    except Exception as exc:
        raise DataError(f"label catalog '{path}' is not a readable CSV or FITS table "
                        f"({type(exc).__name__}: {exc})") from None
    table.rename_columns(table.colnames, [c.upper() for c in table.colnames])
    return table


def ingest(paths, catalog, wave, cfg: dict | None = None) -> Spectra:
    """Training set from apStar files and a label catalog, joined on STAR_ID = APOGEE_ID.

    Stars absent from the catalog are dropped (logged count); for an ID listed more than once
    the first catalog row is used. NaN labels are kept for the caller's ``nan_labels`` policy.
    """
    table = read_catalog(catalog, cfg)  # first: a bad catalog or cut fails before the spectra
    spectra = read_apstar_files(paths, wave, cfg)
    ids, first = np.unique(np.asarray(table["STAR_ID"]), return_index=True)
    if len(ids) < len(table):
        log.warning("%s: %d duplicate APOGEE_IDs, first row used", catalog, len(table) - len(ids))
    where = np.searchsorted(ids, spectra.star_id).clip(0, max(len(ids) - 1, 0))
    found = (len(ids) > 0) & (ids[where] == spectra.star_id)
    if not found.any():
        raise DataError(f"none of the {spectra.n_stars} apStar STAR_IDs is in the catalog "
                        f"'{catalog}' column {CATALOG_ID}")
    if not found.all():
        log.warning("%d apStar spectra have no catalog row and are dropped (first: %s)",
                    (~found).sum(), spectra.star_id[~found][0])
    spectra = spectra.subset(found)
    rows = table[first[where[found]]]
    for name in rows.colnames[1:]:
        spectra.labels[name] = rows[name]
    return spectra
