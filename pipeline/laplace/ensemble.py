"""An ensemble of independently seeded networks, each with its Laplace posterior: the mixture.

Member m = 1..M gives star n a Gaussian predictive N(mu_m, C_m) (its prediction and its error
budget, ``pipeline.laplace.error_budget``). The ensemble's predictive is the equally weighted
mixture p(y) = (1/M) sum_m N(y; mu_m, C_m), whose first two moments are (law of total variance)

    mu = (1/M) sum_m mu_m
    C  = (1/M) sum_m C_m  +  (1/M) sum_m (mu_m - mu)(mu_m - mu)^T
         `-- within ---'     `-------- between: the ensemble spread ------'

(the between term with 1/M, not 1/(M-1): it is the covariance of the mixture, not an estimate
of a population of networks). The catalog reports these moments as a Gaussian: the mean, and
the total covariance split into the parts of the single-model budget,

    model   = mean of the members' Laplace covariances + between   (all epistemic)
    scatter = mean of the members' scatter covariances
    noise   = mean of the members' flux-noise covariances

so that model + scatter + noise = C, with the between part also on its own (``ensemble``, the
L_ERR_ENSEMBLE columns). With one member everything is that member's budget, unchanged.

The ensemble's own scatter. Each member's scatter model (pipeline.laplace.scatter) was fitted
to that member's validation residuals r_m = mu_m - y given its own Laplace and flux-noise
variances; it therefore absorbs the member's deviation mu_m - mu from the mixture mean, which
the between term counts a second time. ``fit_mixture_scatter`` fits ONE scatter model instead,
with the same covariate convention, ridge and cap, on the residuals of the mixture mean
r = mu - y of the validation stars, given the mixture's model covariance (within Laplace +
between) and its flux-noise covariance (the members' mean) as the scatter's covariates and as
the variance it adds to, and the mixture mean mu as the predicted-label covariates.
``ensemble_budget(..., scatter=S)`` then replaces the members' mean scatter by S evaluated at
each star's mixture model and noise variances and mixture mean:

    scatter = S(diag(model) / scale^2, diag(noise) / scale^2, (mu - mean) / scale)

With S, a star of the validation set whose mixture residual is fully explained by
model + noise gets scatter ~ 0, whatever the members' own scatters were.
"""

from __future__ import annotations

import numpy as np

from pipeline.exceptions import DataError
from pipeline.laplace.error_budget import physical_scatter
from pipeline.laplace.scatter import ScatterModel, fit_configured

PARTS = ("model", "scatter", "noise")


def mixture_moments(means: np.ndarray, covariances: np.ndarray) -> tuple[np.ndarray, ...]:
    """Mean, within- and between-member covariance of an equally weighted Gaussian mixture.

    Parameters
    ----------
    means : (M, N, K) member means of N stars.
    covariances : (M, N, K, K) member covariances.

    Returns
    -------
    mean (N, K), within (N, K, K) = mean of the covariances, between (N, K, K) = covariance of
    the member means (1/M); the mixture covariance is within + between.
    """
    means = np.asarray(means, np.float64)
    covariances = np.asarray(covariances, np.float64)
    if means.ndim != 3 or covariances.shape != means.shape + means.shape[-1:]:
        raise DataError(f"member means {means.shape} and covariances {covariances.shape} must "
                        "be (M, N, K) and (M, N, K, K)")
    mean = means.mean(axis=0)
    deviation = means - mean
    between = np.einsum("mni,mnj->nij", deviation, deviation) / means.shape[0]
    return mean, covariances.mean(axis=0), between


def ensemble_budget(budgets: list[dict], scatter: ScatterModel | None = None,
                    scaler=None, emulator_labels: np.ndarray | None = None) -> dict:
    """The mixture's error budget from the members' ``error_budget`` results (module docstring).

    One member and no ``scatter``: its budget, returned as it is. Otherwise ``prediction``,
    ``model``, ``scatter``, ``noise``, ``total`` as for one model, plus ``ensemble`` (the
    between-member covariance) and ``model_laplace`` (the mean of the members' Laplace
    covariances, the quantity whose training percentile the MODEL_OOD flag compares with).
    ``scatter``: the ensemble's scatter model (``fit_mixture_scatter``), evaluated with the
    ``scaler`` (``LabelScaler``) it was fitted with, instead of the members' mean scatter;
    ``emulator_labels`` (N, K, physical) when that model takes the emulator offset.
    """
    if not budgets:
        raise DataError("an ensemble needs at least one member")
    if len(budgets) == 1 and scatter is None:
        return budgets[0]
    if scatter is not None and scaler is None:
        raise ValueError("an ensemble scatter model needs the label scaler it was fitted with")
    predictions = np.stack([b["prediction"] for b in budgets])
    mean, _, between = mixture_moments(predictions, np.stack([b["total"] for b in budgets]))
    within = {part: np.mean([np.broadcast_to(b[part], b["total"].shape) for b in budgets],
                            axis=0) for part in PARTS}
    model = within["model"] + between
    part = (within["scatter"] if scatter is None
            else physical_scatter(scatter, scaler, model, within["noise"], mean,
                                  emulator_labels))
    return {"prediction": mean, "model": model, "scatter": part,
            "noise": within["noise"], "total": model + part + within["noise"],
            "ensemble": between, "model_laplace": within["model"]}


def fit_mixture_scatter(budget: dict, true_labels: np.ndarray, scaler, cfg: dict,
                        emulator_labels: np.ndarray | None = None) -> ScatterModel:
    """The ensemble's scatter model fitted on validation stars (module docstring).

    Parameters
    ----------
    budget : the mixture's ``ensemble_budget`` of the validation stars (physical units; its
        own ``scatter`` part is not used).
    true_labels : (N, 3) their true labels, physical units.
    scaler : ``LabelScaler`` of the members (standardized units of the fit).
    cfg : the ``laplace`` config section (``scatter``, ``scatter_ridge``,
        ``scatter_cap_quantile``, ``scatter_labels``, ``scatter_label_degree``), as for one
        model's ``calibrate_scatter``; with ``scatter_emulator``, ``emulator_labels`` (N, 3,
        physical) are the emulator's best-fit labels of the stars.
    """
    scale = np.asarray(scaler.scale, np.float64)
    to_standard = 1.0 / np.outer(scale, scale)
    prediction = scaler.transform(budget["prediction"])
    offset = (None if emulator_labels is None
              else prediction - scaler.transform(np.asarray(emulator_labels, np.float64)))
    return fit_configured(prediction - scaler.transform(true_labels),
                          budget["model"] * to_standard, budget["noise"] * to_standard,
                          prediction, cfg, offset)
