"""Input-Jacobian figures: ``jacobian_mean`` and ``jacobian_map``.

The input Jacobian D = d label / d flux (3, P) per star is in physical label units per unit of
normalized flux (K for Teff, dex for log g and [Fe/H]). ``jacobian_mean`` draws the per-pixel
mean over the stars with its 16-84th percentile band from the summary table and names the
strongest features; ``jacobian_map`` draws D of a Teff-ordered subset of stars pixel by pixel,
reading the shards one at a time and only the selected rows of each.
"""

from __future__ import annotations

import numpy as np

from pipeline import LABELS
from pipeline.artifacts.jacobian_shards import read_jacobian_rows, shard_star_ids
from pipeline.exceptions import DataError
from pipeline.plots.inputs import FigureInputs
from pipeline.plots.lines import name_features, strongest_features
from pipeline.plots.style import (
    DIVERGING,
    LABEL_COLOR,
    LABEL_NAME,
    LABEL_UNIT,
    WAVE_AXIS,
    break_gaps,
    chip_gaps,
    new_figure,
)

LABEL_ROW = 0.8  # extra y range above and below the data for the rows of feature names
LABEL_GAP = 0.018  # least distance between two feature names, as a fraction of the x range


def derivative_label(lab: str) -> str:
    return rf"$\partial$ {LABEL_NAME[lab]} / $\partial f$ [{LABEL_UNIT[lab]}]"


def plot_jacobian_mean(results: FigureInputs, cfg: dict):
    """Mean d label / d flux per pixel (line), 16-84% over stars (band), features named."""
    table = results.jacobian_summary()
    wave = np.asarray(table["WAVE"], np.float64)
    fig, axes = new_figure(cfg, 3, 1, 0.8 * cfg["width"], sharex=True)
    for ax, lab in zip(axes[:, 0], LABELS, strict=True):
        mean, p16, p84 = (np.asarray(table[f"{lab}_{s}"], np.float64)
                          for s in ("MEAN", "P16", "P84"))
        w, m, lo, hi = break_gaps(wave, mean, p16, p84)
        ax.fill_between(w, lo, hi, color=LABEL_COLOR[lab], alpha=0.3, lw=0,
                        label="16-84% of stars")
        ax.plot(w, m, color=LABEL_COLOR[lab], lw=0.6, label="mean")
        ax.axhline(0.0, color="0.3", lw=0.4)
        _mark_features(ax, wave, mean, cfg)
        ax.set_ylabel(derivative_label(lab))
    fig.legend(handles=axes[0, 0].get_legend_handles_labels()[0], loc="outside upper center",
               ncols=2)
    axes[-1, 0].set_xlabel(WAVE_AXIS)
    return fig


def _mark_features(ax, wave: np.ndarray, mean: np.ndarray, cfg: dict) -> None:
    """Circle the strongest |mean| pixels; name them in a row along the top (positive) or
    bottom (negative) edge, spread apart so names never overlap, joined by thin leaders."""
    picks = strongest_features(wave, mean, cfg["jacobian_features"], cfg["feature_separation"])
    if picks.size == 0:
        return
    ax.plot(wave[picks], mean[picks], "o", mfc="none", mec="black", ms=4, mew=0.6)
    low, high = np.nanmin(mean), np.nanmax(mean)
    pad = LABEL_ROW * (high - low)
    ax.set_ylim(low - pad, high + pad)
    gap = LABEL_GAP * (np.nanmax(wave) - np.nanmin(wave))
    for sign, row in ((1, 0.98), (-1, 0.02)):
        side = picks[np.sign(mean[picks]) == sign]
        side = side[np.argsort(wave[side])]
        for w, m, x, name in zip(wave[side], mean[side], spread(wave[side], gap),
                                 name_features(wave[side], cfg["line_tolerance"]), strict=True):
            ax.annotate(name, (w, m), xytext=(x, row), textcoords=("data", "axes fraction"),
                        ha="center", va="top" if sign > 0 else "bottom", rotation=90,
                        fontsize="x-small",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.4",
                                    "shrinkA": 1, "shrinkB": 3})


def spread(x: np.ndarray, gap: float) -> np.ndarray:
    """Positions as close to the sorted ``x`` as possible but at least ``gap`` apart.

    A forward pass pushes each position right of its predecessor by ``gap``; the result is
    then shifted back by the mean displacement so labels stay centred on their features.
    """
    y = np.array(x, dtype=np.float64)
    for i in range(1, y.size):  # a handful of labels
        y[i] = max(y[i], y[i - 1] + gap)
    return y - (y - x).mean() if y.size else y


def select_map_stars(results: FigureInputs, shards: list, n_stars: int):
    """Star ids to draw, evenly spaced in Teff rank, with their Teff, sorted by Teff.

    Teff comes from the dataset split the Jacobians were computed on (the true label); stars
    of the shards that are missing from it are an error naming both files.
    """
    ids = np.concatenate([shard_star_ids(path) for path in shards])
    labels = results.jacobian_labels(("STAR_ID", "TEFF"))
    data_ids = np.asarray(labels["STAR_ID"]).astype(str)
    order = np.argsort(data_ids)
    pos = np.clip(np.searchsorted(data_ids[order], ids), 0, max(order.size - 1, 0))
    found = data_ids[order][pos] == ids if order.size else np.zeros(ids.size, bool)
    if not np.all(found):
        raise DataError(
            f"star '{ids[~found][0]}' of '{shards[0].parent}' is not in "
            f"'{results.jacobian_data}'; re-run the 'jacobian' step"
        )
    teff = np.asarray(labels["TEFF"], np.float64)[order][pos]
    by_teff = np.argsort(teff, kind="stable")
    ranks = np.unique(np.round(np.linspace(0, ids.size - 1, min(n_stars, ids.size)))).astype(int)
    chosen = by_teff[ranks]
    return ids[chosen], teff[chosen]


def load_map(results: FigureInputs, n_stars: int):
    """(wave (P,), Jacobians float32 (k, 3, P) sorted by Teff, Teff (k,))."""
    shards = results.jacobian_shards()
    ids, teff = select_map_stars(results, shards, n_stars)
    blocks, block_ids, wave = [], [], None
    for path in shards:  # one shard in memory at a time, only its selected rows
        sid, w, jac = read_jacobian_rows(path, lambda s: np.flatnonzero(np.isin(s, ids)))
        if wave is not None and (w.shape != wave.shape or not np.allclose(w, wave)):
            raise DataError(f"'{path}': WAVE differs from that of '{shards[0]}'")
        wave = w
        blocks.append(jac)
        block_ids.append(sid)
    jac, got = np.concatenate(blocks), np.concatenate(block_ids)
    alpha = np.argsort(ids)  # ids are in ascending Teff: put the rows read back in that order
    order = np.argsort(alpha[np.searchsorted(ids[alpha], got)])
    return wave, jac[order], teff


def plot_jacobian_map(results: FigureInputs, cfg: dict):
    """One panel per label: stars (rows, ordered by Teff) by wavelength, diverging colours
    symmetric about zero with limits at a high percentile of |D| (robust to a few spikes)."""
    wave, jac, teff = load_map(results, cfg["jacobian_map_stars"])
    rows = np.arange(teff.size)
    fig, axes = new_figure(cfg, 3, 1, 0.9 * cfg["width"], sharex=True)
    for j, (ax, lab) in enumerate(zip(axes[:, 0], LABELS, strict=True)):
        image = jac[:, j, :].astype(np.float64)
        finite = np.abs(image[np.isfinite(image)])
        limit = float(np.percentile(finite, cfg["jacobian_map_percentile"])) if finite.size else 1
        limit = limit if limit > 0 else 1.0
        x, img = _gap_columns(wave, image)
        mesh = ax.pcolormesh(x, np.arange(rows.size + 1) - 0.5, img, cmap=DIVERGING,
                             vmin=-limit, vmax=limit, shading="flat", rasterized=True)
        fig.colorbar(mesh, ax=ax, label=derivative_label(lab), pad=0.01, extend="both")
        ticks = np.unique(np.round(np.linspace(0, rows.size - 1, 5)).astype(int))
        ax.set_yticks(ticks, [f"{teff[t]:.0f}" for t in ticks])
        ax.set_ylabel(r"star $T_\mathrm{eff}$ [K]")
        ax.minorticks_off()
    axes[-1, 0].set_xlabel(WAVE_AXIS)
    return fig


def _gap_columns(wave: np.ndarray, image: np.ndarray):
    """Pixel edges (C + 1,) and the image (k, C) with one NaN column per chip gap.

    Edges lie half way (in log wavelength) between neighbouring pixels and half a step
    beyond the first and last pixel of each chip, so the gap is its own blank cell and no
    pixel is stretched across it.
    """
    log_w = np.log(np.asarray(wave, np.float64))
    step = np.diff(log_w)
    half = 0.5 * np.median(step)
    gaps = chip_gaps(wave)
    inner = log_w[:-1] + 0.5 * step
    inner[gaps] = log_w[gaps] + half  # end of the chip before each gap
    inner = np.insert(inner, gaps + 1, log_w[gaps + 1] - half)  # start of the next chip
    edges = np.exp(np.concatenate([[log_w[0] - half], inner, [log_w[-1] + half]]))
    return edges, np.insert(image, gaps + 1, np.nan, axis=1)
