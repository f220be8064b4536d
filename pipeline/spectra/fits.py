"""Canonical dataset FITS: read (validated), write whole or streamed chunk by chunk.

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

import io
import logging
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from pipeline import LABELS
from pipeline.artifacts.atomic import atomic_path
from pipeline.artifacts.catalog import describe_label_column
from pipeline.exceptions import DataError
from pipeline.spectra import validation
from pipeline.spectra.dataset import DEFAULT_BAD_PIXEL_ERR, DEFAULT_MAX_BAD_FRACTION, Spectra

log = logging.getLogger(__name__)

REQUIRED_HDUS = ("FLUX", "FLUX_ERR", "WAVE", "LABELS")


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
            (see :mod:`pipeline.spectra.validation` for the list of checks).
    """
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


# ------------------------------------------------------------------------- streamed reading
class FluxRows:
    """The FLUX of a canonical FITS as an (N, P) float32 array read on demand, row by row.

    ``rows[key]`` (a slice, an integer or an integer array in any order) reads only those rows
    through the file's memory maps, in ascending file order, converts them to native float32,
    replaces their bad pixels as :func:`read_spectra` does (flux 1 where the flux is not finite,
    the error is not finite or <= 0, or MASK is nonzero) and returns them in the order asked
    for: the values equal ``read_spectra(path).flux[key]`` bit for bit, while memory holds only
    the rows read. ``file_rows`` maps row i of this array to its row in the file (rows dropped
    for NaN labels are skipped); :meth:`take` narrows it without reading anything.
    """

    def __init__(self, path: str | Path, file_rows: np.ndarray | None = None):
        self.path = Path(path)
        self._hdul = _open_fits(self.path)  # stays open: the maps need its file handle
        self._flux, self._err = self._hdul["FLUX"].data, self._hdul["FLUX_ERR"].data
        self._mask = self._hdul["MASK"].data if "MASK" in self._hdul else None
        n_file = self._flux.shape[0]
        self.file_rows = (np.arange(n_file) if file_rows is None
                          else np.asarray(file_rows, np.int64))
        self.dtype, self.ndim = np.dtype(np.float32), 2

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.file_rows), self._flux.shape[1])

    def __len__(self) -> int:
        return len(self.file_rows)

    def take(self, index) -> FluxRows:
        """The rows ``index`` (integer array or boolean mask) as a new reader; nothing is read."""
        out = object.__new__(FluxRows)
        out.__dict__.update(self.__dict__)
        out.file_rows = self.file_rows[np.asarray(index)]
        return out

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        return self.rows(key)[0]

    def rows(self, key) -> tuple[np.ndarray, np.ndarray]:
        """(flux, noise_std) of the rows ``key``: the flux as ``self[key]`` and the flux error
        float32 with 0 on bad pixels (where the flux was replaced by 1, nothing is noise)."""
        wanted = self.file_rows[key]
        order = np.argsort(wanted, kind="stable")
        ranked = wanted[order]  # ascending: sequential reads of the memory-mapped file
        if len(ranked) and ranked[-1] - ranked[0] + 1 == len(ranked):
            ranked = slice(int(ranked[0]), int(ranked[-1]) + 1)  # contiguous: one block read
        flux = np.array(self._flux[ranked], np.float32)
        err = np.asarray(self._err[ranked], np.float32)
        mask = None if self._mask is None else np.asarray(self._mask[ranked])
        bad = validation._bad_pixels(flux, err, mask)
        flux[bad] = 1.0
        err = np.where(bad, np.float32(0), err)
        out, out_err = np.empty_like(flux), np.empty_like(err)
        out[order], out_err[order] = flux, err
        return out, out_err

    def chunks(self, size: int = validation.CHUNK_ROWS):
        """(slice, rows) pairs covering the array in order, ``size`` rows at a time."""
        for start in range(0, len(self), size):
            s = slice(start, min(start + size, len(self)))
            yield s, self[s]

    def close(self) -> None:
        self._hdul.close()


def open_spectra(path: str | Path, *, bad_pixel_err: float = DEFAULT_BAD_PIXEL_ERR,
                 require_labels: bool = False, nan_labels: str = "drop",
                 max_bad_pixel_fraction: float = DEFAULT_MAX_BAD_FRACTION,
                 chunk_size: int = 2048) -> Spectra:
    """Validate a canonical dataset FITS like :func:`read_spectra`, but keep the flux on disk.

    Every check of :func:`read_spectra` runs, the pixel checks over row slices of
    ``chunk_size`` stars of the open file (a failing spectrum is named by its STAR_ID; its row
    number counts from the slice start). The returned Spectra has ``flux`` a
    :class:`FluxRows` (read on demand, bad pixels replaced), no ``flux_err`` or ``mask``
    (training never uses them), and the labels, with rows of NaN labels dropped as
    ``nan_labels`` says. Memory: the labels plus one slice.
    """
    path = Path(path)
    labels = read_labels(path)  # STAR_IDs checked once, file-wide
    n_bad = 0
    with _open_fits(path) as hdul:
        validation.check_image_rows(path, hdul, ("FLUX", "FLUX_ERR", "MASK"))
        wave = _image(hdul, path, "WAVE", np.float64)
        validation.check_wave(path, wave)
        meta = {k: v for k, v in dict(hdul[0].header).items() if k not in ("COMMENT", "HISTORY")}
        for start in range(0, max(len(labels), 1), chunk_size):
            rows = slice(start, start + chunk_size)
            part = Spectra(_image(hdul, path, "FLUX", np.float32, rows),
                           _image(hdul, path, "FLUX_ERR", np.float32, rows), wave, labels[rows],
                           _image(hdul, path, "MASK", np.int32, rows) if "MASK" in hdul else None)
            validation.check_shapes(path, part)
            n_bad += validation.flag_bad_pixels(path, part, bad_pixel_err,
                                                max_bad_pixel_fraction).meta["N_BADPIX"]
            del part  # one slice in memory at a time
    meta["N_BADPIX"] = n_bad
    spectra = Spectra(FluxRows(path), None, wave, labels, None, meta)
    if require_labels:
        spectra = validation.check_labels(path, spectra, nan_labels)
    return spectra


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
    """Copy of ``labels`` with the unit of each label column (and its ``_ERR`` column)."""
    table = Table(labels, copy=True)
    for name in table.colnames:
        error = name.endswith("_ERR")
        base = name[:-4] if error else name
        if base in LABELS:
            describe_label_column(table[name], base, f"1-sigma error of {base}" if error
                                  else base)
    return table


