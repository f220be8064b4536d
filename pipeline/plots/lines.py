"""Known H-band features for annotating figures, named from :mod:`pipeline.spectra.linelist`.

Positions in vacuum Angstrom: Brackett lines Br11-Br20, 12CO second-overtone bandheads, and the
named Mg, Si, Al, K, Ca and Ti lines.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from pipeline.spectra.linelist import BRACKETT, CO_BANDHEADS, NAMED_LINES

SPECIES = {"mg": "Mg I", "si": "Si I", "al": "Al I", "k": "K I", "ca": "Ca I", "ti": "Ti I"}


@lru_cache(maxsize=1)
def known_lines() -> tuple[np.ndarray, tuple[str, ...]]:
    """Wavelengths (L,) sorted, and their names ('Br15', 'CO 3-0', 'Mg I', ...)."""
    entries = [(w, f"Br{n}") for n, w in BRACKETT.items()]
    entries += [(w, f"CO {up}-{low}") for (up, low), w in CO_BANDHEADS.items()]
    entries += [(w, SPECIES.get(group, group)) for group, lines in NAMED_LINES.items()
                for w, _ in lines]
    entries.sort()
    return np.array([w for w, _ in entries]), tuple(name for _, name in entries)


def name_features(wave: np.ndarray, tolerance: float) -> list[str]:
    """Name of the known line nearest each wavelength in ``wave`` if within ``tolerance`` A,
    else the wavelength itself rounded to 1 A."""
    lines, names = known_lines()
    wave = np.asarray(wave, np.float64)
    nearest = np.argmin(np.abs(wave[:, None] - lines[None, :]), axis=1)
    close = np.abs(lines[nearest] - wave) <= tolerance
    return [names[i] if ok else f"{w:.0f}" for w, i, ok in zip(wave, nearest, close, strict=True)]


def strongest_features(wave: np.ndarray, signal: np.ndarray, n: int,
                       separation: float) -> np.ndarray:
    """Pixel indices of the ``n`` largest |signal| values at least ``separation`` A apart.

    Greedy non-maximum suppression: take the largest remaining |signal|, discard every pixel
    within ``separation`` of it, repeat (n iterations, each vectorized over pixels).
    """
    strength = np.abs(np.asarray(signal, np.float64))
    strength[~np.isfinite(strength)] = -np.inf
    chosen: list[int] = []
    for _ in range(n):
        best = int(np.argmax(strength))
        if not np.isfinite(strength[best]):
            break
        chosen.append(best)
        strength[np.abs(wave - wave[best]) < separation] = -np.inf
    return np.array(chosen, dtype=np.int64)
