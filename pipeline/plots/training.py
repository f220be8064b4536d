"""Training and Laplace-posterior diagnostics: ``training_curves``, ``laplace_diagnostics``."""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import MaxNLocator

from pipeline.plots.inputs import FigureInputs
from pipeline.plots.style import OKABE_ITO, new_figure, plain_log_axis


def plot_training_curves(results: FigureInputs, cfg: dict):
    """Loss and validation loss per epoch on a log axis; the best epoch (min val_loss) marked."""
    history = results.history_table()
    epoch = np.asarray(history["epoch"], np.float64)
    loss = np.asarray(history["loss"], np.float64)
    val_loss = np.asarray(history["val_loss"], np.float64)
    # Keras counts epochs from 0 in its logs; the paper counts from 1.
    if epoch.min() == 0:
        epoch = epoch + 1
    best = int(np.nanargmin(val_loss))

    fig, axes = new_figure(cfg, 1, 1, 0.4 * cfg["width"], width_fraction=0.5)
    ax = axes[0, 0]
    ax.plot(epoch, loss, "-o", color=OKABE_ITO["blue"], label="training")
    ax.plot(epoch, val_loss, "-s", color=OKABE_ITO["orange"], label="validation")
    ax.plot(epoch[best], val_loss[best], "*", ms=12, color=OKABE_ITO["vermillion"], zorder=5,
            label=f"best epoch {epoch[best]:.0f} (val. loss {val_loss[best]:.3g})")
    ax.axvline(epoch[best], color=OKABE_ITO["vermillion"], lw=0.7, ls=":")
    positive = np.concatenate([loss, val_loss])
    if np.all(positive[np.isfinite(positive)] > 0):  # a Gaussian NLL loss can be negative
        plain_log_axis(ax, "y")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (standardized labels)")
    ax.legend(fontsize="x-small")
    return fig


def plot_laplace_diagnostics(results: FigureInputs, cfg: dict):
    """Curvature eigenvalue spectrum and log evidence against the prior precision."""
    post = results.posterior_arrays()
    fig, axes = new_figure(cfg, 1, 2, 0.42 * cfg["width"])
    _eigenvalue_panel(axes[0, 0], post)
    _evidence_panel(axes[0, 1], post)
    return fig


def numerically_positive(eig: np.ndarray) -> np.ndarray:
    """Mask of eigenvalues above the rank tolerance n * eps * max|eig| (as numpy.matrix_rank);
    smaller ones are zero to the precision of the float64 eigendecomposition."""
    if eig.size == 0:
        return np.zeros(0, dtype=bool)
    return eig > eig.size * np.finfo(np.float64).eps * np.abs(eig).max()


def _eigenvalue_panel(ax, post: dict) -> None:
    """Eigenvalues of the curvature sorted descending; numerically zero or negative ones are
    counted in the title, not drawn (a log axis would be all round-off otherwise)."""
    eig = np.sort(np.ravel(post["eigenvalues"]).astype(np.float64))[::-1]
    positive = numerically_positive(eig)
    rank = np.arange(1, eig.size + 1)
    ax.plot(rank[positive], eig[positive], color=OKABE_ITO["blue"], label="curvature eigenvalue")
    prior = np.ravel(post["prior_precision"])
    for value in np.unique(prior):
        ax.axhline(value, color=OKABE_ITO["vermillion"], ls="--", lw=0.8,
                   label="prior precision" if value == prior.min() else None)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("eigenvalue rank")
    ax.set_ylabel("eigenvalue")
    n_zero = int((~positive).sum())
    ax.set_title(f"{eig.size} eigenvalues" + (rf", {n_zero} numerically $\leq$ 0" if n_zero
                                               else ""))
    ax.legend(loc="lower left")


def _evidence_panel(ax, post: dict) -> None:
    """log Z(prior precision) from the evidence grid, the fitted prior precision marked."""
    keys = ("evidence_curve_prior_precision", "evidence_curve_log_evidence")
    grid = np.ravel(post[keys[0]]).astype(np.float64)
    log_z = np.ravel(post[keys[1]]).astype(np.float64)
    order = np.argsort(grid)
    # relative to the best value, on a scale linear within +-1 (where evidence ratios are
    # decided) and logarithmic beyond, so both the optimum and the far tails are visible
    best = np.nanmax(log_z)
    ax.plot(grid[order], log_z[order] - best, color=OKABE_ITO["blue"],
            label=rf"$\max \log Z$ = {best:.6g}")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xscale("log")
    prior = np.ravel(post["prior_precision"])
    for i, value in enumerate(np.unique(prior)):
        label = "fitted" if prior.size == 1 else ("fitted (per layer)" if i == 0 else None)
        ax.axvline(value, color=OKABE_ITO["vermillion"], ls="--", lw=0.8, label=label)
    fitted = float(np.ravel(post["log_evidence"])[0])
    ax.axhline(fitted - best, color=OKABE_ITO["black"], lw=0.6, ls=":",
               label=rf"fitted $\log Z$ = {fitted:.6g}")
    sigma = ", ".join(f"{s:.3g}" for s in np.ravel(post["noise_std"]))
    ax.set_title(rf"fitted noise $\sigma_k$ = ({sigma}) (standardized)")
    ax.set_xlabel("prior precision")
    ax.set_ylabel(r"$\log Z - \max \log Z$")
    ax.legend(loc="lower right")
