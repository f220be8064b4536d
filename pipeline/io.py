"""Canonical dataset FITS (DESIGN section 3): read, validate, write; atomic writes; provenance.

A file holds N spectra on one wavelength grid of P pixels:

    FLUX      float32 (N, P)  continuum-normalized flux
    FLUX_ERR  float32 (N, P)  1-sigma; non-finite or <= 0 marks a bad pixel
    WAVE      float64 (P,)    vacuum wavelength, BUNIT = 'Angstrom'
    LABELS    BinTable        STAR_ID, TEFF [K], LOGG [log10 cgs], FE_H [dex], extras carried
    MASK      int32 (N, P)    optional, nonzero = bad pixel

Bad pixels are never used silently: on reading, their flux is set to the continuum value 1 and
their error to ``bad_pixel_err`` (config ``data.bad_pixel_err``), and they are counted in
``Spectra.meta['N_BADPIX']``. P always comes from the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

import pipeline
from pipeline import LABELS
from pipeline.exceptions import DataError, OutputError

log = logging.getLogger(__name__)

REQUIRED_HDUS = ("FLUX", "FLUX_ERR", "WAVE", "LABELS")
DEFAULT_BAD_PIXEL_ERR = 1.0e3  # schema defaults of data.bad_pixel_err and
DEFAULT_MAX_BAD_FRACTION = 0.5  # data.max_bad_pixel_fraction, for library callers


@dataclass
class Spectra:
    """N spectra on one wavelength grid, with their labels (any of which may be absent).

    ``flux_err`` is None only where a consumer that never uses it dropped it to save memory
    (the train step: N x P x 4 bytes).
    """

    flux: np.ndarray
    flux_err: np.ndarray | None
    wave: np.ndarray
    labels: Table
    mask: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_stars(self) -> int:
        return self.flux.shape[0]

    @property
    def n_pixels(self) -> int:
        return self.flux.shape[1]

    @property
    def star_id(self) -> np.ndarray:
        return np.asarray(self.labels["STAR_ID"]).astype(str)

    @property
    def has_labels(self) -> bool:
        return all(name in self.labels.colnames for name in LABELS)

    def label_array(self) -> np.ndarray:
        """Labels as float64 (N, 3) in the order of ``pipeline.LABELS``; NaN where absent."""
        out = np.full((self.n_stars, len(LABELS)), np.nan)
        for j, name in enumerate(LABELS):
            if name in self.labels.colnames:
                out[:, j] = np.asarray(self.labels[name], dtype=np.float64)
        return out

    def subset(self, index) -> Spectra:
        """A new Spectra holding rows ``index`` (integer array or boolean mask)."""
        index = np.asarray(index)
        return Spectra(
            flux=self.flux[index],
            flux_err=None if self.flux_err is None else self.flux_err[index], wave=self.wave,
            labels=self.labels[index],
            mask=None if self.mask is None else self.mask[index], meta=dict(self.meta),
        )


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A killed or failing writer leaves no file that looks complete: the temporary file is
    removed on error and never has the final name.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        umask = os.umask(0)  # mkstemp makes 0600; outputs get the usual 0666 & ~umask
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except OSError as exc:
        raise OutputError(
            f"cannot write to '{path.parent}': {exc.strerror}; choose a writable output "
            "directory or free disk space"
        ) from None
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except OutputError:  # already says which file failed (nested atomic_path, a writer's own)
        raise
    except OSError as exc:
        raise OutputError(
            f"writing '{path}' failed: {exc.strerror or exc}; check free disk space and "
            "permissions"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- provenance
def git_commit() -> str:
    """The git commit of the checkout the package runs from, or 'unknown'."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(pipeline.__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(config: dict | None = None, *, device: str | None = None,
               timestamp: bool = True, **extra) -> dict[str, str]:
    """Provenance cards for every output: package version, config hash, git commit, seed,
    TensorFlow version (only if already imported: reading it must not import TF), device.

    Keys are at most 8 characters so they are valid FITS keywords. Set ``timestamp=False``
    for byte-identical reruns of outputs that are compared in tests.
    """
    import sys

    from pipeline.config import config_hash

    cards = {
        "PKGVERS": pipeline.__version__,
        "GITCOMM": git_commit(),
        "PYVERS": platform.python_version(),
    }
    if config is not None:
        cards["CFGHASH"] = config_hash(config)
        cards["SEED"] = str(config.get("seed", ""))
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        cards["TFVERS"] = tf.__version__
    if device is not None:
        cards["DEVICE"] = device
    if timestamp:
        cards["DATE"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    cards.update({k.upper()[:8]: str(v) for k, v in extra.items()})
    return cards


# --------------------------------------------------------------------------------- reading
def _open_fits(path: Path) -> fits.HDUList:
    """Open ``path`` with its images memory-mapped; check that no data block is cut short.

    Memory maps let a reader convert each image once, straight from the file's pages into its
    final array (a slice of rows costs only those rows); a truncated file is caught here, with
    its name, by comparing the file size with what the headers declare.
    """
    if not path.is_file():
        raise DataError(f"'{path}': file does not exist")
    try:
        hdul = fits.open(path, memmap=True, lazy_load_hdus=False)
        hdul.verify("exception")
        end = max(hdu.fileinfo()["datLoc"] + hdu.size for hdu in hdul)  # size: data bytes
        if path.stat().st_size < end:
            raise OSError(f"file is {path.stat().st_size} bytes, headers declare {end}")
        for hdu in hdul:
            _ = hdu.data  # memory maps and table parsing only: no image is copied here
    except Exception as exc:  # astropy raises OSError, ValueError, VerifyError...
        raise DataError(
            f"'{path}': not a readable FITS file ({type(exc).__name__}: {exc}); "
            "re-create or re-download it"
        ) from None
    return hdul


def read_options(config: dict) -> dict:
    """Keyword arguments of :func:`read_spectra` from a config (full, or its ``data`` section)."""
    data = config.get("data", config)
    return {"bad_pixel_err": data["bad_pixel_err"], "nan_labels": data["nan_labels"],
            "max_bad_pixel_fraction": data["max_bad_pixel_fraction"]}


def _image(hdul, path: Path, name: str, dtype, rows=None) -> np.ndarray:
    data = hdul[name].data
    if data is None or np.size(data) == 0:
        raise DataError(f"'{path}': HDU '{name}' is empty (the file holds no spectra); "
                        "write at least one spectrum")
    if rows is not None and data.ndim == 2:
        data = data[rows]
    try:
        # One conversion, big-endian file pages -> native ``dtype``: the only copy in memory.
        return np.array(data, dtype=dtype)
    except (TypeError, ValueError):
        raise DataError(f"'{path}': HDU '{name}' is not numeric ({data.dtype}); write it "
                        f"as {np.dtype(dtype).name}") from None


def read_labels(path: str | Path) -> Table:
    """The LABELS table of a canonical dataset FITS, without reading any flux."""
    from pipeline import validation

    path = Path(path)
    with _open_fits(path) as hdul:
        validation.check_hdus(path, hdul, REQUIRED_HDUS)
        labels = Table(hdul["LABELS"].data)
    validation.check_star_ids(path, labels)
    return labels


def read_spectra(path: str | Path, *, bad_pixel_err: float = DEFAULT_BAD_PIXEL_ERR,
                 require_labels: bool = False, nan_labels: str = "drop",
                 max_bad_pixel_fraction: float = DEFAULT_MAX_BAD_FRACTION,
                 rows: slice | None = None) -> Spectra:
    """Read and validate a canonical dataset FITS (see module docstring).

    Args:
        path: the file.
        bad_pixel_err: error given to bad pixels (flux set to 1).
        require_labels: fail if TEFF, LOGG or FE_H is missing (training data).
        nan_labels: with ``require_labels``, 'drop' rows with a NaN label (logged count) or
            'fail' naming the first such row.
        max_bad_pixel_fraction: a spectrum with a larger bad-pixel fraction is an error
            (config ``data.max_bad_pixel_fraction``); so is one entirely bad or all zeros.
        rows: read only this slice of spectra, so that streaming over a large file in chunks
            keeps memory flat. STAR_IDs are checked file-wide.

    Memory: the images are memory-mapped and each converted once into its final array, and
    bad pixels are flagged in row chunks, so the peak is FLUX + FLUX_ERR (+ MASK) of the rows
    read plus O(chunk x P) temporaries: 2.9 GB for 50000 x 7213 spectra.

    Raises:
        DataError: naming the file, HDU, column or row and what would fix it
            (see :mod:`pipeline.validation` for the list of checks).
    """
    from pipeline import validation

    path = Path(path)
    with _open_fits(path) as hdul:
        validation.check_hdus(path, hdul, REQUIRED_HDUS)
        if rows is not None:
            validation.check_image_rows(path, hdul, ("FLUX", "FLUX_ERR", "MASK"))
        flux = _image(hdul, path, "FLUX", np.float32, rows)
        flux_err = _image(hdul, path, "FLUX_ERR", np.float32, rows)
        wave = _image(hdul, path, "WAVE", np.float64)
        if hdul["LABELS"].data is None:
            raise DataError(f"'{path}': HDU 'LABELS' is empty; it needs one row per spectrum "
                            "with at least a STAR_ID column")
        labels = Table(hdul["LABELS"].data)
        if rows is not None:
            validation.check_star_ids(path, labels)
            labels = labels[rows]
        mask = _image(hdul, path, "MASK", np.int32, rows) if "MASK" in hdul else None
        header = dict(hdul[0].header)
    spectra = Spectra(flux, flux_err, wave, labels, mask,
                      meta={k: v for k, v in header.items() if k not in ("COMMENT", "HISTORY")})
    return validation.validate_spectra(
        path, spectra, bad_pixel_err=bad_pixel_err, require_labels=require_labels,
        nan_labels=nan_labels, max_bad_pixel_fraction=max_bad_pixel_fraction,
    )


# --------------------------------------------------------------------------------- writing
def _primary(header: dict | None, n_stars: int, n_pixels: int) -> fits.PrimaryHDU:
    primary = fits.PrimaryHDU()
    for key, value in (header or {}).items():
        primary.header[key] = value
    primary.header["NSTARS"] = (n_stars, "number of spectra")
    primary.header["NPIX"] = (n_pixels, "number of pixels")
    return primary


def write_spectra(path: str | Path, spectra: Spectra, header: dict | None = None) -> None:
    """Write ``spectra`` as canonical FITS, atomically, with ``header`` cards in the primary.

    For more spectra than fit in memory use :class:`SpectraWriter`.
    """
    primary = _primary(header, spectra.n_stars, spectra.n_pixels)
    flux = fits.ImageHDU(np.asarray(spectra.flux, np.float32), name="FLUX")
    flux.header["BUNIT"] = ("", "continuum-normalized flux")
    flux_err = fits.ImageHDU(np.asarray(spectra.flux_err, np.float32), name="FLUX_ERR")
    flux_err.header["BUNIT"] = ("", "1-sigma error of normalized flux")
    wave = fits.ImageHDU(np.asarray(spectra.wave, np.float64), name="WAVE")
    wave.header["BUNIT"] = "Angstrom"
    wave.header["COMMENT"] = "vacuum wavelength"
    labels = fits.table_to_hdu(label_table_with_units(spectra.labels))
    labels.name = "LABELS"
    hdus = [primary, flux, flux_err, wave, labels]
    if spectra.mask is not None:
        hdus.append(fits.ImageHDU(np.asarray(spectra.mask, np.int32), name="MASK"))
    with atomic_path(path) as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)


class SpectraWriter:
    """Write a canonical FITS chunk by chunk with flat memory, atomically.

    The file layout is fixed up front from the number of stars, the grid and the labels: the
    primary header, then FLUX, FLUX_ERR (and MASK) whose data blocks are filled through
    big-endian memory maps, then WAVE and LABELS. The file gets its final name only when every
    row was written and the writer closed without error. Header cards listed in ``reserve``
    (default ``NBADPIX``) may be set after the rows with :meth:`set_card`.

    Example::

        with SpectraWriter(path, wave, labels, header) as out:
            for start, chunk in chunks:
                out.write(start, chunk.flux, chunk.flux_err)
            out.set_card("NBADPIX", n_bad)
    """

    def __init__(self, path, wave, labels: Table, header: dict | None = None,
                 with_mask: bool = False, reserve=("NBADPIX",)):
        self.path, self.wave, self.labels = Path(path), np.asarray(wave, np.float64), labels
        self.n_stars, self.n_pixels = len(labels), self.wave.size
        self.primary = _primary(header, self.n_stars, self.n_pixels)
        for key in reserve:
            self.primary.header[key] = 0
        self.images = [("FLUX", ">f4"), ("FLUX_ERR", ">f4")] + ([("MASK", ">i4")] * with_mask)
        self.rows_written = np.zeros(self.n_stars, bool)

    def _layout(self, fh) -> dict:
        """Write headers and reserve the image data blocks; return their byte offsets."""
        fh.write(self.primary.header.tostring().encode("ascii"))
        offsets = {}
        for name, dtype in self.images:
            hdu = fits.ImageHDU(np.zeros((1, self.n_pixels), np.dtype(dtype).newbyteorder("=")),
                                name=name)
            hdu.header["NAXIS2"] = self.n_stars
            fh.write(hdu.header.tostring().encode("ascii"))
            offsets[name] = fh.tell()
            nbytes = self.n_stars * self.n_pixels * 4
            fh.seek(offsets[name] + nbytes + (-nbytes) % 2880)
        fh.truncate()
        tail = fits.ImageHDU(self.wave, name="WAVE")
        tail.header["BUNIT"] = "Angstrom"
        tail.header["COMMENT"] = "vacuum wavelength"
        table = fits.table_to_hdu(label_table_with_units(self.labels))
        table.name = "LABELS"
        buffer = io.BytesIO()
        fits.HDUList([fits.PrimaryHDU(), tail, table]).writeto(buffer)
        fh.write(buffer.getvalue()[len(fits.PrimaryHDU().header.tostring()):])
        return offsets

    def __enter__(self) -> SpectraWriter:
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        with open(self._tmp, "r+b") as fh:
            offsets = self._layout(fh)
        self.maps = {name: np.memmap(self._tmp, dtype=dtype, mode="r+", offset=offsets[name],
                                     shape=(self.n_stars, self.n_pixels))
                     for name, dtype in self.images}
        return self

    def write(self, start: int, flux, flux_err, mask=None) -> None:
        """Write rows ``start : start + len(flux)`` (arrays (n, P))."""
        stop = start + len(flux)
        self.maps["FLUX"][start:stop] = flux
        self.maps["FLUX_ERR"][start:stop] = flux_err
        if "MASK" in self.maps:
            self.maps["MASK"][start:stop] = 0 if mask is None else mask
        self.rows_written[start:stop] = True

    def set_card(self, key: str, value) -> None:
        """Set a card reserved at construction (its header block keeps its size)."""
        if key not in self.primary.header:
            raise KeyError(f"card {key} was not reserved")
        self.primary.header[key] = value

    def __exit__(self, exc_type, exc, tb):
        for array in self.maps.values():
            array.flush()
        self.maps.clear()
        if exc_type is None and not self.rows_written.all():
            missing = int(np.flatnonzero(~self.rows_written)[0])
            error = RuntimeError(f"'{self.path}': row {missing} was never written")
            self._atomic.__exit__(RuntimeError, error, None)  # removes the temporary file
            raise error
        if exc_type is None:
            with open(self._tmp, "r+b") as fh:
                fh.write(self.primary.header.tostring().encode("ascii"))
        return self._atomic.__exit__(exc_type, exc, tb)


def label_table_with_units(labels: Table) -> Table:
    """Copy of ``labels`` with astropy units on TEFF (K) and LOGG; FE_H gets a description.

    'dex' is not a FITS unit, so [Fe/H] carries its unit in the column description.
    """
    import astropy.units as u

    table = Table(labels, copy=True)
    for name in table.colnames:
        base = name[:-4] if name.endswith("_ERR") else name
        if base == "TEFF":
            table[name].unit = u.K
        elif base == "LOGG":
            table[name].description = "log10 of surface gravity in cm s-2"
        elif base == "FE_H":
            table[name].description = "[Fe/H] in dex"
    return table


def label_columns(labels: Table) -> list[str]:
    """The label columns in ``pipeline.LABELS`` order that ``labels`` has."""
    return [name for name in LABELS if name in labels.colnames]
