"""Accuracy and error-budget figures on the test catalog.

``pred_vs_true``: predicted against true labels with total 1-sigma error bars, coloured by S/N,
bias (mean residual) and scatter (standard deviation of residuals) annotated.
``residuals_vs_snr``: residuals and predicted total errors against S/N.
``error_budget``: binned medians of the model, scatter and noise parts and of the total error
against S/N, with the empirical scatter of the residuals (1.4826 x median absolute deviation)
for comparison: a calibrated budget has its total on the empirical points.
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import LogNorm, Normalize

from pipeline import LABELS
from pipeline.plots.inputs import FigureInputs, label_arrays
from pipeline.plots.style import (
    LABEL_NAME,
    LABEL_UNIT,
    OKABE_ITO,
    SEQUENTIAL,
    SNR_AXIS,
    axis_label,
    new_figure,
    plain_log_axis,
    plain_log_ticks,
)

MAD_TO_SIGMA = 1.4826  # sigma of a normal distribution per median absolute deviation


def robust_std(values: np.ndarray) -> float:
    """1.4826 x median absolute deviation of the finite ``values`` (NaN if none)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.nan
    return MAD_TO_SIGMA * float(np.median(np.abs(values - np.median(values))))


def snr_binning(snr: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantile bins of S/N: the bin index of every star (N,) and the bin centres (B,).

    Centres are the median S/N of the stars in each bin; equal-count bins keep every median
    equally noisy.
    """
    finite = snr[np.isfinite(snr)]
    edges = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, n_bins + 1)))
    index = np.clip(np.searchsorted(edges, snr, side="right") - 1, 0, max(edges.size - 2, 0))
    index[~np.isfinite(snr)] = -1
    centres = binned(np.median, snr, index, max(edges.size - 1, 1))
    return index, centres


def binned(stat, values: np.ndarray, index: np.ndarray, n_bins: int) -> np.ndarray:
    """``stat`` of the finite ``values`` in each bin (NaN for an empty bin): (n_bins,)."""
    good = np.isfinite(values) & (index >= 0)
    return np.array([stat(values[good & (index == b)]) if np.any(good & (index == b))
                     else np.nan for b in range(n_bins)])


def _subset(n: int, cfg: dict) -> np.ndarray:
    """At most ``max_points`` star indices, a seeded random choice (sorted)."""
    if n <= cfg["max_points"]:
        return np.arange(n)
    return np.sort(np.random.default_rng(cfg["seed"]).choice(n, cfg["max_points"], False))


def _snr_colours(snr: np.ndarray):
    finite = snr[np.isfinite(snr) & (snr > 0)]
    if finite.size == 0:
        return None
    lo, hi = float(finite.min()), float(finite.max())
    return LogNorm(lo, hi) if hi > lo else Normalize(lo - 1, hi + 1)


def plot_pred_vs_true(results: FigureInputs, cfg: dict):
    """3 columns (labels): predicted vs true on top, residual vs true below."""
    columns = tuple(f"{lab}{s}" for lab in LABELS for s in ("", "_ERR", "_TRUE"))
    cat = results.catalog_table(columns)
    pred, err, true = (label_arrays(cat, s) for s in ("", "_ERR", "_TRUE"))
    snr = np.asarray(cat["SNR"], np.float64) if "SNR" in cat.colnames else np.full(len(cat), np.nan)
    norm = _snr_colours(snr)
    show = _subset(len(cat), cfg)
    fig, axes = new_figure(cfg, 2, 3, 0.55 * cfg["width"],
                           gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    for j, lab in enumerate(LABELS):
        top, bottom = axes[0, j], axes[1, j]
        resid = pred[:, j] - true[:, j]
        x, y, e = true[show, j], pred[show, j], err[show, j]
        colour = snr[show] if norm is not None else OKABE_ITO["blue"]
        for ax, yy in ((top, y), (bottom, resid[show])):
            ax.errorbar(x, yy, yerr=e, fmt="none", ecolor="0.65", elinewidth=0.4, alpha=0.5,
                        zorder=1)
            points = ax.scatter(x, yy, c=colour, s=4, cmap=SEQUENTIAL, norm=norm, zorder=2,
                                linewidths=0, rasterized=True)
        finite = np.isfinite(true[:, j]) & np.isfinite(pred[:, j])
        lims = np.array([min(true[finite, j].min(), pred[finite, j].min()),
                         max(true[finite, j].max(), pred[finite, j].max())])
        top.plot(lims, lims, color=OKABE_ITO["black"], lw=0.8, zorder=3)
        bottom.axhline(0.0, color=OKABE_ITO["black"], lw=0.8, zorder=3)
        top.set_xlim(lims)
        top.set_ylim(lims)
        fmt = ".0f" if lab == "TEFF" else ".3f"
        r = resid[finite]
        top.text(0.04, 0.96, f"bias {r.mean():{fmt}} {LABEL_UNIT[lab]}\n"
                 f"scatter {r.std():{fmt}} {LABEL_UNIT[lab]}\nN = {r.size}",
                 transform=top.transAxes, va="top", fontsize="small")
        top.set_ylabel(axis_label(lab, "predicted "))
        bottom.set_ylabel(r"$\Delta$ " + f"[{LABEL_UNIT[lab]}]")
        bottom.set_xlabel(axis_label(lab, "true "))
    if norm is not None:
        bar = fig.colorbar(points, ax=axes[:, -1], label=SNR_AXIS, shrink=0.8)
        if isinstance(norm, LogNorm):
            plain_log_ticks(bar.ax.yaxis, norm.vmin, norm.vmax)
    return fig


def plot_residuals_vs_snr(results: FigureInputs, cfg: dict):
    """Top: residuals with their binned 16-84% range and +-median predicted error.
    Bottom: predicted total error per star with the binned empirical scatter."""
    columns = ("SNR",) + tuple(f"{lab}{s}" for lab in LABELS for s in ("", "_ERR", "_TRUE"))
    cat = results.catalog_table(columns)
    pred, err, true = (label_arrays(cat, s) for s in ("", "_ERR", "_TRUE"))
    snr = np.asarray(cat["SNR"], np.float64)
    index, centres = snr_binning(snr, cfg["snr_bins"])
    n_bins, show = centres.size, _subset(len(cat), cfg)
    fig, axes = new_figure(cfg, 2, 3, 0.55 * cfg["width"], sharex=True)
    for j, lab in enumerate(LABELS):
        resid = pred[:, j] - true[:, j]
        top, bottom = axes[0, j], axes[1, j]
        top.scatter(snr[show], resid[show], s=3, color="0.55", linewidths=0, rasterized=True)
        p16, p84 = (binned(lambda v, q=q: np.percentile(v, q), resid, index, n_bins)
                    for q in (16, 84))
        top.fill_between(centres, p16, p84, color=OKABE_ITO["sky_blue"], alpha=0.5,
                         label="residual 16-84%")
        sigma = binned(np.median, err[:, j], index, n_bins)
        top.plot(centres, sigma, "--", color=OKABE_ITO["vermillion"],
                 label=r"$\pm$ median predicted $\sigma$")
        top.plot(centres, -sigma, "--", color=OKABE_ITO["vermillion"])
        top.axhline(0.0, color=OKABE_ITO["black"], lw=0.6)
        top.set_ylabel(r"$\Delta$" + LABEL_NAME[lab] + f" [{LABEL_UNIT[lab]}]")
        bottom.scatter(snr[show], err[show, j], s=3, color=OKABE_ITO["blue"], alpha=0.6,
                       linewidths=0, rasterized=True, label=r"predicted $\sigma$ (per star)")
        bottom.plot(centres, binned(robust_std, resid, index, n_bins), "o-",
                    color=OKABE_ITO["black"], label="empirical scatter of residuals")
        bottom.set_ylabel(r"$\sigma$ " + LABEL_NAME[lab] + f" [{LABEL_UNIT[lab]}]")
        bottom.set_xlabel(SNR_AXIS)
        plain_log_axis(bottom, "y")
    plain_log_axis(axes[1, 0], "x")  # shared by every panel
    handles = [h for ax in axes[:, 0] for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside upper center", ncols=4, markerscale=2)
    return fig


BUDGET_PARTS = (  # (column suffix, legend, colour, line style)
    ("_ERR", "total", OKABE_ITO["black"], "-"),
    ("_ERR_MODEL", "model (Laplace)", OKABE_ITO["blue"], "--"),
    ("_ERR_SCATTER", "scatter (fitted noise)", OKABE_ITO["orange"], "-."),
    ("_ERR_NOISE", "flux noise", OKABE_ITO["green"], ":"),
)


def plot_error_budget(results: FigureInputs, cfg: dict):
    """Binned medians of each error part against S/N, log-log, one panel per label."""
    columns = ("SNR",) + tuple(f"{lab}{p[0]}" for lab in LABELS for p in BUDGET_PARTS)
    cat = results.catalog_table(columns)
    snr = np.asarray(cat["SNR"], np.float64)
    index, centres = snr_binning(snr, cfg["snr_bins"])
    fig, axes = new_figure(cfg, 1, 3, 0.36 * cfg["width"], sharex=True)
    for j, lab in enumerate(LABELS):
        ax = axes[0, j]
        for suffix, name, colour, style in BUDGET_PARTS:
            values = np.asarray(cat[f"{lab}{suffix}"], np.float64)
            ax.plot(centres, binned(np.median, values, index, centres.size), style,
                    marker="o", ms=3, color=colour, label=name)
        if f"{lab}_TRUE" in cat.colnames:
            resid = np.asarray(cat[lab], np.float64) - np.asarray(cat[f"{lab}_TRUE"], np.float64)
            ax.plot(centres, binned(robust_std, resid, index, centres.size), "D",
                    mfc="none", color=OKABE_ITO["vermillion"], label="empirical scatter")
        ax.set_xlabel(SNR_AXIS)
        ax.set_ylabel(axis_label(lab, r"$\sigma$ "))
        plain_log_axis(ax, "y")
    plain_log_axis(axes[0, 0], "x")  # shared by every panel
    fig.legend(handles=axes[0, 0].get_legend_handles_labels()[0], loc="outside upper center",
               ncols=5)
    return fig
