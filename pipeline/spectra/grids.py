"""Named wavelength grids: the apStar log-linear grid and its detector-chip subsets.

An apStar spectrum lives on ``lambda_i = 10**(4.179 + 6e-6 i)`` Angstrom (vacuum),
``i = 0 .. 8574``. The three detectors (blue, green, red) fill only part of it; a training
grid keeps the pixels of three chip ranges ``[start, stop)`` and drops the gaps. The named
grids (config key ``data.grid``):

==================  =========================================  ======  ====================
name                chips (apStar pixels)                      pixels  used by
==================  =========================================  ======  ====================
apogee-7213         [322, 3242) [3648, 6048) [6412, 8305)      7213    this project's default
apogee-dr12-7214    [322, 3242) [3648, 6048) [6412, 8306)      7214    DR11/DR12 (astroNN,
                                                                       The Payne, StarNet)
apogee-dr17-7514    [246, 3274) [3585, 6080) [6344, 8335)      7514    DR13-DR17 (astroNN)
apstar-8575         the whole apStar grid, gaps kept as bad     8575    full-grid training
==================  =========================================  ======  ====================

The DR12 and DR13+ edges are those of astroNN's ``chips_pix_info`` (``astroNN.apogee.chips``);
``apogee-7213`` is the DR12 grid without its last red pixel, the grid of the seed network.
The DR13+ chips are the widest ranges any release fills, so the continuum of an apStar file is
fitted on them (:data:`DETECTOR_CHIPS`) whatever the training grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.exceptions import ConfigError

APSTAR_CRVAL1 = 4.179
APSTAR_CDELT1 = 6.0e-6
APSTAR_NWAVE = 8575
APSTAR_CHIPS = ((322, 3242), (3648, 6048), (6412, 8305))
"""apStar pixel ranges [start, stop) of the blue, green and red chips of the default grid."""
DETECTOR_CHIPS = ((246, 3274), (3585, 6080), (6344, 8335))
"""The widest chip ranges (DR13-DR17): where a combined apStar spectrum has data."""


@dataclass(frozen=True)
class Grid:
    """A named training grid: apStar pixel ranges ``chips``; ``full`` keeps the gaps too."""

    name: str
    chips: tuple[tuple[int, int], ...]
    full: bool = False

    @property
    def index(self) -> np.ndarray:
        """apStar pixel indices of the grid, int (P,)."""
        if self.full:
            return np.arange(APSTAR_NWAVE)
        return np.concatenate([np.arange(a, b) for a, b in self.chips])

    @property
    def n_pixels(self) -> int:
        return int(self.index.size)

    def wave(self) -> np.ndarray:
        """Vacuum wavelengths of the grid, float64 (P,) in Angstrom."""
        return apstar_wave()[self.index]


GRIDS = {
    "apogee-7213": Grid("apogee-7213", APSTAR_CHIPS),
    "apogee-dr12-7214": Grid("apogee-dr12-7214", ((322, 3242), (3648, 6048), (6412, 8306))),
    "apogee-dr17-7514": Grid("apogee-dr17-7514", DETECTOR_CHIPS),
    "apstar-8575": Grid("apstar-8575", DETECTOR_CHIPS, full=True),
}
DEFAULT_GRID = "apogee-7213"


def apstar_wave() -> np.ndarray:
    """The full apStar log-linear vacuum grid, float64 (8575,) in Angstrom."""
    return 10.0 ** (APSTAR_CRVAL1 + APSTAR_CDELT1 * np.arange(APSTAR_NWAVE))


def apogee_grid() -> np.ndarray:
    """The default training grid ``apogee-7213``, float64 (7213,)."""
    return GRIDS[DEFAULT_GRID].wave()


def named_grid(name: str) -> Grid:
    """The :class:`Grid` called ``name``; ConfigError naming ``data.grid`` otherwise."""
    if name not in GRIDS:
        raise ConfigError(f"config key 'data.grid': unknown grid '{name}' (valid choices: "
                          f"{', '.join(GRIDS)})")
    return GRIDS[name]


def grid_wave(config: dict) -> np.ndarray:
    """The wavelength grid named by ``config['data']['grid']``, float64 (P,)."""
    return named_grid(config["data"]["grid"]).wave()
