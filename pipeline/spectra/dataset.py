"""The Spectra model: N spectra on one wavelength grid of P pixels, with their labels.

    flux      float32 (N, P)  continuum-normalized flux
                              or a row reader (``pipeline.spectra.fits.FluxRows``): read
                              on demand from a memory-mapped file, bad pixels replaced
    flux_err  float32 (N, P)  1-sigma (None where a consumer dropped it to save memory)
    wave      float64 (P,)    vacuum wavelength in Angstrom
    labels    astropy Table   STAR_ID, TEFF [K], LOGG [log10 cgs], FE_H [dex], extras carried
    mask      int32 (N, P)    optional, nonzero = bad pixel
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from pipeline import LABELS

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
            flux=self.flux.take(index) if is_row_reader(self.flux) else self.flux[index],
            flux_err=None if self.flux_err is None else self.flux_err[index], wave=self.wave,
            labels=self.labels[index],
            mask=None if self.mask is None else self.mask[index], meta=dict(self.meta),
        )


def label_columns(labels: Table) -> list[str]:
    """The label columns in ``pipeline.LABELS`` order that ``labels`` has."""
    return [name for name in LABELS if name in labels.colnames]


def is_row_reader(flux) -> bool:
    """Whether ``flux`` is read on demand (``pipeline.spectra.fits.FluxRows``), not an array."""
    return not isinstance(flux, np.ndarray) and hasattr(flux, "take") and hasattr(
        flux, "file_rows")


def as_rows(flux, dtype=np.float32):
    """``flux`` as an (N, P) ``dtype`` array, or a row reader unchanged (it reads rows on
    slicing, so consumers that only slice rows stream it; an array would load everything)."""
    return flux if is_row_reader(flux) else np.asarray(flux, dtype)
