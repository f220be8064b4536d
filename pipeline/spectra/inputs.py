"""Any input of the predict and jacobian steps, read onto the model's wavelength grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.exceptions import ConfigError, DataError
from pipeline.spectra.apogee import read_apstar_files
from pipeline.spectra.dataset import Spectra
from pipeline.spectra.fits import read_spectra
from pipeline.spectra.validation import match_grid

FORMATS = ("fits", "apstar")


def load_input(path: str | Path, fmt: str, wave: np.ndarray, config: dict,
               rows: slice | None = None) -> tuple[Spectra, bool]:
    """Spectra of ``path`` on the model grid ``wave`` and whether they were interpolated.

    ``fmt`` 'fits' reads a canonical dataset FITS and maps it with
    ``match_grid`` (GridMismatchError when the grid does not cover the model's); 'apstar'
    reads one apStar file or a directory of them (``pipeline.spectra.apogee.read_apstar_files``).
    ``rows`` reads only that slice of a canonical FITS (memory-mapped), for streaming.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format '{fmt}' is not valid; valid choices: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"input '{path}' does not exist")
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
