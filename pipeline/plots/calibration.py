"""Calibration of the predicted error bars on held-out stars: ``calibration``.

With z = (predicted - true) / sigma_total, a calibrated Gaussian error bar gives z ~ N(0, 1).
The central interval of nominal level p is |z| <= Phi^-1((1 + p) / 2); its empirical coverage
is the fraction of stars inside it. The coverage curve lies on the diagonal when the errors are
calibrated, above it when they are too large and below it when too small. The grey band is the
95% binomial range of the empirical coverage of N calibrated stars, p +- 1.96 sqrt(p(1-p)/N).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from pipeline import LABELS
from pipeline.plots.inputs import FigureInputs, label_arrays
from pipeline.plots.style import LABEL_COLOR, LABEL_NAME, OKABE_ITO, new_figure

BINOMIAL_Z95 = 1.959964  # two-sided 95% quantile of N(0, 1)


def z_scores(table) -> np.ndarray:
    """(predicted - true) / total error, float64 (N, 3); NaN where any input is missing."""
    pred, err, true = (label_arrays(table, s) for s in ("", "_ERR", "_TRUE"))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (pred - true) / err
    z[~(err > 0)] = np.nan
    return z


def nominal_levels(n_levels: int) -> np.ndarray:
    """``n_levels`` evenly spaced nominal coverages strictly inside (0, 1)."""
    return np.linspace(0.0, 1.0, n_levels + 2)[1:-1]


def empirical_coverage(z: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Fraction of finite ``z`` (N,) inside each central interval of ``levels`` (L,) -> (L,)."""
    z = np.abs(z[np.isfinite(z)])
    if z.size == 0:
        return np.full(levels.shape, np.nan)
    half_width = norm.ppf(0.5 * (1.0 + levels))
    return (z[:, None] <= half_width[None, :]).mean(axis=0)


def plot_calibration(results: FigureInputs, cfg: dict):
    """Coverage curves of the three labels, then one z-score histogram per label."""
    columns = tuple(f"{lab}{s}" for lab in LABELS for s in ("", "_ERR", "_TRUE"))
    z = z_scores(results.catalog_table(columns))
    levels = nominal_levels(cfg["coverage_levels"])
    fig, axes = new_figure(cfg, 1, 4, 0.3 * cfg["width"])
    ax = axes[0, 0]
    n_min = int(np.isfinite(z).sum(axis=0).min())
    if n_min > 0:
        band = BINOMIAL_Z95 * np.sqrt(levels * (1.0 - levels) / n_min)
        ax.fill_between(levels, levels - band, levels + band, color="0.85", lw=0,
                        label="95% range")
    ax.plot([0, 1], [0, 1], color=OKABE_ITO["black"], lw=0.7)
    for j, lab in enumerate(LABELS):
        ax.plot(levels, empirical_coverage(z[:, j], levels), color=LABEL_COLOR[lab],
                label=LABEL_NAME[lab])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("nominal coverage")
    ax.set_ylabel("empirical coverage")
    ax.legend(loc="upper left", fontsize="x-small")
    _z_histograms(axes[0, 1:], z, cfg)
    return fig


def _z_histograms(axes, z: np.ndarray, cfg: dict) -> None:
    """Density histograms of z per label over [-r, r] with the N(0, 1) density overlaid.

    Stars outside the range are counted in the annotation, not silently dropped.
    """
    span = cfg["zscore_range"]
    edges = np.linspace(-span, span, cfg["zscore_bins"] + 1)
    grid = np.linspace(-span, span, 400)
    for j, (ax, lab) in enumerate(zip(axes, LABELS, strict=True)):
        zj = z[np.isfinite(z[:, j]), j]
        ax.hist(zj, bins=edges, density=True, color=LABEL_COLOR[lab], alpha=0.6,
                histtype="stepfilled")
        ax.plot(grid, norm.pdf(grid), color=OKABE_ITO["black"], lw=0.9, label="N(0, 1)")
        outside = int((np.abs(zj) > span).sum())
        stats = (f"mean {zj.mean():.2f}\nstd {zj.std():.2f}" if zj.size else "no stars")
        if outside:
            stats += f"\n{outside} beyond $\\pm${span:g}"
        ax.text(0.03, 0.97, stats, transform=ax.transAxes, va="top", fontsize="x-small")
        ax.set_xlim(-span, span)
        ax.set_xlabel(f"z ({LABEL_NAME[lab]})")
        if j == 0:
            ax.set_ylabel("density")
            ax.legend(loc="upper right", fontsize="x-small")
