"""Example spectra across the label space and where each label acts: ``spectra_examples``.

Top panel: the flux f(lambda) of the example stars of config ``figures.example_stars``, offset
vertically. Lower panels: the flux change for a step in each label, (d f / d label) x step
(steps from ``figures.label_steps``), i.e. where in the spectrum each label leaves its mark.

With the synthetic data source the flux and its exact derivative come from the generator
(``pipeline.spectra.synthetic.synthesize`` and ``label_jacobian``). For any other source the figure
uses the training spectra: around each example star, the ``example_neighbours`` nearest
training stars (distance in labels divided by their standard deviation) are fitted with a
local linear model f_n = a + B (y_n - y_example) by least squares over all pixels at once;
a (P,) estimates the flux and B (P, 3) the derivative at the example labels.
"""

from __future__ import annotations

import numpy as np

from pipeline import LABELS
from pipeline.exceptions import ConfigError, DataError
from pipeline.plots.inputs import FigureInputs
from pipeline.plots.lines import known_lines
from pipeline.plots.style import (
    CYCLE,
    LABEL_NAME,
    LABEL_UNIT,
    WAVE_AXIS,
    break_gaps,
    new_figure,
)
from pipeline.spectra import synthetic
from pipeline.spectra.fits import read_spectra

SPECTRUM_OFFSET = 0.6  # vertical spacing between example spectra, in normalized flux
LABEL_WIDTH = 0.008  # a rotated line name is about this fraction of the panel width wide


def example_labels(cfg: dict) -> tuple[list[str], np.ndarray]:
    """Names and labels float64 (E, 3) of the example stars."""
    stars = cfg["example_stars"]
    return ([s["name"] for s in stars],
            np.array([[s["teff"], s["logg"], s["fe_h"]] for s in stars], dtype=np.float64))


def synthetic_examples(labels: np.ndarray):
    """Flux (E, P) and d flux / d label (E, P, 3) from the generator on its own grid."""
    wave = synthetic.apogee_grid()
    return wave, synthetic.synthesize(labels, wave), synthetic.label_jacobian(labels, wave)


def local_linear_examples(path, labels: np.ndarray, n_neighbours: int, bad_pixel_err: float):
    """Flux (E, P) and d flux / d label (E, P, 3) from a local linear fit to training stars.

    For example star e with labels y_e, take the K nearest training stars in the metric
    sum_k ((y_nk - y_ek) / s_k)^2 (s_k the label standard deviations) and solve
    min ||X beta - F||^2 with X = [1, Y - y_e] (K, 4), F (K, P): beta[0] is the flux at y_e and
    beta[1:].T the derivative. Bad pixels (flux set to 1 by read_spectra) bias the fit
    towards the continuum slightly; they are few.
    """
    spectra = read_spectra(path, bad_pixel_err=bad_pixel_err, require_labels=True)
    train = spectra.label_array()
    if spectra.n_stars < len(LABELS) + 1:
        raise DataError(f"'{path}': {spectra.n_stars} stars, need at least 4 for the local fit")
    k = min(n_neighbours, spectra.n_stars)
    scale = np.where(train.std(axis=0) > 0, train.std(axis=0), 1.0)
    flux, jac = [], []
    for y_e in labels:  # one least-squares solve per example star (a handful)
        dist = (((train - y_e) / scale) ** 2).sum(axis=1)
        near = np.argsort(dist)[:k]
        design = np.column_stack([np.ones(k), train[near] - y_e])
        beta, *_ = np.linalg.lstsq(design, spectra.flux[near].astype(np.float64), rcond=None)
        flux.append(beta[0])
        jac.append(beta[1:].T)
    return spectra.wave, np.array(flux), np.array(jac)


def plot_spectra_examples(results: FigureInputs, cfg: dict):
    """Example spectra (top) and their flux change per label step (one panel per label)."""
    names, labels = example_labels(cfg)
    if cfg["source"] == "synthetic":
        wave, flux, jac = synthetic_examples(labels)
        method = "synthetic generator"
    else:
        wave, flux, jac = local_linear_examples(
            results.train, labels, cfg["example_neighbours"], cfg["bad_pixel_err"])
        method = f"local linear fit to {cfg['example_neighbours']} nearest training stars"
    steps = np.asarray(cfg["label_steps"], np.float64)
    wave, flux, jac = _window(wave, flux, jac, cfg["spectra_window"])
    fig, axes = new_figure(cfg, 4, 1, 1.05 * cfg["width"], sharex=True,
                           gridspec_kw={"height_ratios": [2, 1, 1, 1]})
    top = axes[0, 0]
    for e, (name, colour) in enumerate(zip(names, CYCLE, strict=False)):
        w, f = break_gaps(wave, flux[e] - SPECTRUM_OFFSET * e)
        top.plot(w, f, color=colour, lw=0.5,
                 label=f"{name}: {labels[e, 0]:.0f} K, {labels[e, 1]:.2f}, {labels[e, 2]:+.1f}")
        for j, ax in enumerate(axes[1:, 0]):
            w, d = break_gaps(wave, jac[e, :, j] * steps[j])
            ax.plot(w, d, color=colour, lw=0.5)
    _mark_lines(top, wave)
    top.set_ylabel("normalized flux + offset")
    fig.legend(handles=top.get_legend_handles_labels()[0], loc="outside upper center",
               ncols=2, title=f"{method}; labels: Teff, log g, [Fe/H]", title_fontsize="small")
    for j, (ax, lab) in enumerate(zip(axes[1:, 0], LABELS, strict=True)):
        ax.axhline(0.0, color="0.3", lw=0.4)
        ax.set_ylabel(rf"$\Delta f$ per {steps[j]:g} {LABEL_UNIT[lab]}" + "\n"
                      + f"in {LABEL_NAME[lab]}")
    axes[-1, 0].set_xlabel(WAVE_AXIS)
    return fig


def _window(wave, flux, jac, window):
    """The pixels inside ``window`` = (low, high) Angstrom, or all pixels if it is None."""
    if window is None:
        return wave, flux, jac
    inside = (wave >= min(window)) & (wave <= max(window))
    if not inside.any():
        raise ConfigError(f"config key 'figures.spectra_window' = {window} holds no pixel of the "
                        f"grid ({wave.min():.0f}-{wave.max():.0f} A); choose a range inside it")
    return wave[inside], flux[:, inside], jac[:, inside]


def _mark_lines(ax, wave: np.ndarray) -> None:
    """Name the known lines inside the plotted range along the top of the spectra panel."""
    lines, names = known_lines()
    inside = (lines >= wave.min()) & (lines <= wave.max())
    lines, names = lines[inside], np.array(names)[inside]
    if lines.size == 0:
        return
    # lines closer than the width of a text label share one tick: 'Br15/Ti I'
    start = np.r_[True, np.diff(lines) > LABEL_WIDTH * (wave.max() - wave.min())]
    groups = np.cumsum(start) - 1
    names = ["/".join(dict.fromkeys(names[groups == g])) for g in range(groups[-1] + 1)]
    for w, name in zip(lines[start], names, strict=True):
        ax.axvline(w, ymin=0.9, ymax=1.0, color="0.3", lw=0.6)
        ax.text(w, 0.89, name, transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                va="top", fontsize="xx-small", color="0.3")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.35 * (high - low))  # room for the names above the spectra
