"""The H-band line list of the synthetic generator: species groups and their lines.

Lines are grouped by species and excitation class; every line of a group shares the group's
temperature, pressure and abundance response (pipeline.synthetic) and differs only by position
and relative strength ``10**loggf``. Positions are vacuum wavelengths in Angstrom:

* named lines (Brackett series, 12CO second-overtone bandheads, Mg I,
  Si I, Al I, K I, Ca I, Ti I), a few with an approximate neighbour;
* a pseudo-random forest of Fe I, OH and CN lines across 15100-17000 A drawn from a fixed
  internal seed (:data:`FOREST_SEED`), so the list is identical on every machine and run: it
  is part of the model definition, not a tunable.

A 12CO band is a Fortrat parabola: lines pile up at the bandhead and spread to the red,
``lambda_J = lambda_head + b (J - J_head)**2`` with strength following a rotational Boltzmann
envelope. Nothing here depends on the pixel grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

FOREST_SEED = 20240611
"""Fixed seed of the random Fe I / OH / CN forest (model definition, not a tunable)."""

BAND = (15100.0, 17000.0)
"""Wavelength span (A) populated by the random forests: the APOGEE band plus a margin."""

BRACKETT = {11: 16811.1, 12: 16411.7, 13: 16113.7, 14: 15884.9, 15: 15704.9, 16: 15560.7,
            17: 15443.1, 18: 15345.9, 19: 15265.0, 20: 15196.0}
CO_BANDHEADS = {(3, 0): 15582.0, (4, 1): 15780.0, (5, 2): 15982.0, (6, 3): 16189.0,
                (7, 4): 16397.0, (8, 5): 16610.0}


@dataclass(frozen=True)
class Group:
    """One species x excitation class.

    Attributes:
        name: short identifier.
        kind: 'atom' (neutral atom), 'molecule' or 'hydrogen'.
        chi: lower-level excitation potential (eV): Boltzmann factor ``10**(-chi * theta)``.
        ion: ionization potential (eV) of the neutral atom (Saha balance); 0 when unused.
        metal_power: exponent of the abundance, ``10**(metal_power * ([Fe/H] + alpha [a/Fe]))``.
        alpha: 1 for alpha elements (Mg, Si, Ca, Ti, O): enhanced in metal-poor stars.
        dissociation: molecular dissociation energy (eV): slope of the association in theta.
        t_half: temperature (K) at which half of the molecule is dissociated at Pg = 1e5.
        tau_ref: line-centre optical depth of a ``loggf = 0`` line at the reference star.
        ref: reference (Teff, log g) where ``tau_ref`` holds (at [Fe/H] = 0).
        sigma: (narrow, broad) Gaussian core widths in km/s bracketing the broadening range.
        gamma: Lorentzian half width (km/s) of the pressure-damping wing.
        damping: wing area relative to the core area at the reference pressure.
    """

    name: str
    kind: str
    chi: float
    ion: float = 0.0
    metal_power: float = 1.0
    alpha: float = 0.0
    dissociation: float = 0.0
    t_half: float = 0.0
    tau_ref: float = 1.0
    ref: tuple[float, float] = (4800.0, 2.5)
    sigma: tuple[float, float] = (6.0, 22.0)
    gamma: float = 12.0
    damping: float = 0.05


GROUPS: tuple[Group, ...] = (
    Group("fe_low", "atom", chi=2.2, ion=7.90, tau_ref=0.6),
    Group("fe_mid", "atom", chi=4.5, ion=7.90, tau_ref=1.0),
    Group("fe_high", "atom", chi=5.9, ion=7.90, tau_ref=1.5),
    Group("mg", "atom", chi=5.93, ion=7.65, alpha=1.0, tau_ref=3.0, damping=0.25),
    Group("si", "atom", chi=6.5, ion=8.15, alpha=1.0, tau_ref=2.5, damping=0.2),
    Group("al", "atom", chi=4.09, ion=5.99, tau_ref=2.5, damping=0.2),
    Group("k", "atom", chi=2.67, ion=4.34, tau_ref=1.0, damping=0.1),
    Group("ca", "atom", chi=4.53, ion=6.11, alpha=1.0, tau_ref=1.0, damping=0.1),
    Group("ti", "atom", chi=1.9, ion=6.83, alpha=1.0, tau_ref=1.0),
    Group("co_low", "molecule", chi=0.3, metal_power=1.0, dissociation=11.09, t_half=4900.0,
          tau_ref=2.0, damping=0.0),
    Group("co_high", "molecule", chi=1.1, metal_power=1.0, dissociation=11.09, t_half=4900.0,
          tau_ref=1.2, damping=0.0),
    Group("oh", "molecule", chi=0.7, metal_power=1.0, alpha=1.0, dissociation=4.39,
          t_half=4400.0, tau_ref=1.2, damping=0.0),
    Group("cn", "molecule", chi=1.0, metal_power=2.0, dissociation=7.72, t_half=4600.0,
          tau_ref=0.5, damping=0.0),
    Group("brackett", "hydrogen", chi=12.75, metal_power=0.0, tau_ref=3.0, ref=(7000.0, 4.2),
          sigma=(12.0, 28.0), gamma=60.0, damping=1.0),
)
GROUP_INDEX = {g.name: i for i, g in enumerate(GROUPS)}

# named atomic lines: vacuum wavelength (A), loggf (relative strength)
NAMED_LINES = {
    "mg": [(15745.0, 0.0), (15753.3, 0.2), (15770.1, 0.4), (15959.0, -0.4), (16368.2, -0.8)],
    "si": [(15888.4, 0.0), (15964.4, -0.3), (16064.4, -0.2), (16099.2, -0.2), (16385.6, -0.4),
           (16685.3, -0.3), (15965.1, -0.8), (16218.0, -0.5)],
    "al": [(16723.5, 0.0), (16755.1, 0.3), (16767.9, -0.2)],
    "k": [(15168.4, 0.0), (15172.5, -0.3)],
    "ca": [(16155.2, 0.0), (16161.8, -0.2), (16201.5, -0.1)],
    "ti": [(15548.4, 0.0), (15606.3, -0.2), (15720.0, -0.1), (15703.9, -0.4), (16639.7, -0.5)],
}


@dataclass(frozen=True)
class LineList:
    """All lines: ``wave`` (A, vacuum), ``loggf`` and ``group`` index into :data:`GROUPS`."""

    wave: np.ndarray
    loggf: np.ndarray
    group: np.ndarray

    def of(self, name: str) -> np.ndarray:
        """Wavelengths of the lines of group ``name``."""
        return self.wave[self.group == GROUP_INDEX[name]]


def _co_band(head: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fortrat parabola of one 12CO band: 45 lines redward of the head, Boltzmann envelope."""
    j = np.arange(45, dtype=float)
    wave = head + 0.012 * j**2 + 0.02 * rng.random(j.size)
    energy = j * (j + 1) / 300.0  # rotational envelope peaking near J ~ 17
    loggf = np.log10((2 * j + 1) * np.exp(-energy) / 35.0)
    return wave, loggf


def _forest(n: int, rng: np.random.Generator, low: float, high: float):
    """``n`` lines uniform over the band with loggf uniform in [low, high] (mostly weak)."""
    return np.sort(rng.uniform(*BAND, n)), rng.uniform(low, high, n)


@lru_cache(maxsize=1)
def line_list() -> LineList:
    """The full line list (cached; identical on every call and machine)."""
    rng = np.random.default_rng(FOREST_SEED)
    waves, loggfs, groups = [], [], []

    def add(name, wave, loggf):
        wave, loggf = np.atleast_1d(wave), np.atleast_1d(loggf)
        waves.append(wave)
        loggfs.append(loggf)
        groups.append(np.full(wave.size, GROUP_INDEX[name]))

    for name, n, low, high in (("fe_low", 120, -3.0, -0.3), ("fe_mid", 180, -2.5, 0.0),
                               ("fe_high", 160, -2.0, 0.2), ("oh", 260, -1.5, 0.0),
                               ("cn", 380, -2.0, -0.3)):
        add(name, *_forest(n, rng, low, high))
    for name, lines in NAMED_LINES.items():
        add(name, [w for w, _ in lines], [g for _, g in lines])
    for (_upper, lower), head in CO_BANDHEADS.items():
        add("co_low" if lower <= 2 else "co_high", *_co_band(head, rng))
    for upper, wave in BRACKETT.items():
        add("brackett", wave, np.log10((20.0 / upper) ** 3))  # oscillator strength ~ n^-3
    return LineList(np.concatenate(waves), np.concatenate(loggfs), np.concatenate(groups))
