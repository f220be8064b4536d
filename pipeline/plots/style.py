"""The one figure style of the paper: fonts, colours, axis names, saving.

Colours are the Okabe-Ito palette (distinguishable with every common colour-vision deficiency);
sequential maps are viridis/cividis and the diverging map is ColorBrewer RdBu, all
colourblind-safe. Figures are written atomically in every configured format: all temporary
files are rendered first and only then renamed, so a failure leaves no output at all.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are made in batch jobs: never open a window

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import numpy as np  # noqa: E402

from pipeline import LABELS  # noqa: E402
from pipeline.artifacts.atomic import atomic_path  # noqa: E402

OKABE_ITO = {
    "black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9",
    "green": "#009E73", "yellow": "#F0E442", "blue": "#0072B2",
    "vermillion": "#D55E00", "purple": "#CC79A7",
}
CYCLE = [OKABE_ITO[k] for k in ("blue", "orange", "green", "vermillion", "purple",
                                "sky_blue", "yellow", "black")]
SEQUENTIAL = "viridis"
DIVERGING = "RdBu_r"

LABEL_NAME = {"TEFF": r"$T_\mathrm{eff}$", "LOGG": r"$\log g$", "FE_H": "[Fe/H]"}
LABEL_UNIT = {"TEFF": "K", "LOGG": "dex", "FE_H": "dex"}
LABEL_COLOR = dict(zip(LABELS, (OKABE_ITO["vermillion"], OKABE_ITO["blue"],
                                OKABE_ITO["green"]), strict=True))
# Page layouts: figure width (inches), the width of one-column figures and the one font size
# (pt) of every figure. "journal" is a two-column journal page (AAS, MNRAS, A&A): 7.0 in text
# width, 3.35 in columns, 8 pt text as in the captions, serif like the body text.
PRESETS = {
    "journal": {"width": 7.0, "column_width": 3.35, "font_size": 8.0, "font_family": "serif"},
}

WAVE_AXIS = r"wavelength [$\mathrm{\AA}$]"
SNR_AXIS = "S/N"


def axis_label(label: str, prefix: str = "", suffix: str = "") -> str:
    """Axis text with unit, e.g. ``axis_label('TEFF', 'predicted ')`` -> 'predicted Teff [K]'."""
    return f"{prefix}{LABEL_NAME[label]}{suffix} [{LABEL_UNIT[label]}]"


def apply_preset(cfg: dict, preset: str | None) -> dict:
    """``cfg`` (the ``figures`` config section) with the sizes and font of a page layout."""
    if preset is None:
        return cfg
    return {**cfg, **PRESETS[preset]}


def rc_params(cfg: dict) -> dict:
    """Matplotlib settings of every figure (``cfg`` is the ``figures`` config section)."""
    size = cfg["font_size"]
    serif = cfg.get("font_family") == "serif"
    return {
        "font.family": "serif" if serif else "sans-serif",
        "mathtext.fontset": "dejavuserif" if serif else "dejavusans",  # maths as the text
        "font.size": size, "axes.titlesize": size, "axes.labelsize": size,
        "xtick.labelsize": size - 1, "ytick.labelsize": size - 1,
        "legend.fontsize": size - 1, "legend.frameon": False,
        "axes.prop_cycle": matplotlib.cycler(color=CYCLE),
        "axes.linewidth": 0.7, "lines.linewidth": 1.0, "lines.markersize": 3,
        "xtick.direction": "in", "ytick.direction": "in",
        "xtick.top": True, "ytick.right": True,
        "xtick.minor.visible": True, "ytick.minor.visible": True,
        "image.cmap": SEQUENTIAL, "figure.dpi": cfg["dpi"], "savefig.dpi": cfg["dpi"],
        # a page layout needs the exact width: constrained layout already keeps every label
        # inside the figure, a tight box would crop it to a width of its own
        "savefig.bbox": "standard" if "column_width" in cfg else "tight",
        "savefig.pad_inches": 0.03,
        "pdf.fonttype": 42,  # TrueType in PDFs so journals can edit the text
        "mathtext.default": "regular",
    }


def new_figure(cfg: dict, nrows: int, ncols: int, height: float, width_fraction: float = 1.0,
               **kwargs):
    """``plt.subplots`` at ``width_fraction`` of the configured width; ``height`` in inches.

    A figure of at most half the width is a one-column figure: with a page layout that names
    a ``column_width`` (:data:`PRESETS`) it gets exactly that width.
    """
    width = width_fraction * cfg["width"]
    if "column_width" in cfg and width_fraction <= 0.5:
        width = cfg["column_width"]
    return plt.subplots(nrows, ncols, figsize=(width, height),
                        squeeze=False, layout="constrained", **kwargs)


def plain_log_axis(ax, which: str = "x") -> None:
    """Log scale with plain tick labels (50, 100, 200 rather than 5x10^1) and no minor labels.

    Ticks at 1, 2, 5 per decade when the axis spans under two decades, else at powers of 10.
    """
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    plain_log_ticks(axis, *(ax.get_xlim() if which == "x" else ax.get_ylim()))


def plain_log_ticks(axis, low: float, high: float) -> None:
    """Plain tick labels on an already logarithmic ``axis`` spanning [low, high]."""
    low, high = sorted((abs(low), abs(high)))
    decades = np.log10(high / low) if low > 0 else np.inf
    subs = (1.0, 2.0, 5.0) if decades < 2 else (1.0,)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def note(ax, text: str) -> None:
    """Mark a panel whose input is unavailable, saying which input it needs."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", wrap=True,
            fontsize="small", color=OKABE_ITO["vermillion"])
    ax.set_xticks([])
    ax.set_yticks([])


def chip_gaps(wave: np.ndarray, factor: float = 5.0) -> np.ndarray:
    """Indices i where a detector gap lies between pixel i and i + 1.

    On a log-linear grid the step in log wavelength is constant; a step more than ``factor``
    times the median marks a gap (the three APOGEE chips).
    """
    step = np.diff(np.log(np.asarray(wave, dtype=np.float64)))
    return np.flatnonzero(step > factor * np.median(step))


def break_gaps(wave: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Insert NaN after each chip gap (along the last axis) so lines do not bridge gaps."""
    gaps = chip_gaps(wave) + 1
    out = [np.insert(np.asarray(wave, np.float64), gaps, np.nan)]
    out += [np.insert(np.asarray(a, np.float64), gaps, np.nan, axis=-1) for a in arrays]
    return tuple(out)


def metadata(fmt: str, name: str, prov: dict[str, str]) -> dict[str, str]:
    """Provenance as the metadata each backend accepts (PNG: any key; PDF/SVG: fixed keys)."""
    text = "; ".join(f"{k}={v}" for k, v in prov.items())
    if fmt == "png":
        return {"Title": name, **prov}
    if fmt == "pdf":
        return {"Title": name, "Subject": text, "Creator": "stellar-laplace"}
    return {"Title": name, "Description": text}


def save_figure(fig, paths, name: str, cfg: dict, prov: dict[str, str]) -> list[Path]:
    """Write ``fig`` to every path (format from the suffix), all or none, and close ``fig``."""
    paths = [Path(p) for p in paths]
    try:
        with contextlib.ExitStack() as stack:
            for path in paths:
                tmp = stack.enter_context(atomic_path(path))
                fmt = path.suffix[1:]
                fig.savefig(tmp, format=fmt, dpi=cfg["dpi"], metadata=metadata(fmt, name, prov))
    finally:
        plt.close(fig)
    return paths
