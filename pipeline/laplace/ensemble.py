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
"""

from __future__ import annotations

import numpy as np

from pipeline.exceptions import DataError

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


def ensemble_budget(budgets: list[dict]) -> dict:
    """The mixture's error budget from the members' ``error_budget`` results (module docstring).

    One member: its budget, returned as it is. Several: ``prediction``, ``model``, ``scatter``,
    ``noise``, ``total`` as for one model, plus ``ensemble`` (the between-member covariance)
    and ``model_laplace`` (the mean of the members' Laplace covariances, the quantity whose
    training percentile the MODEL_OOD flag compares with).
    """
    if not budgets:
        raise DataError("an ensemble needs at least one member")
    if len(budgets) == 1:
        return budgets[0]
    predictions = np.stack([b["prediction"] for b in budgets])
    mean, _, between = mixture_moments(predictions, np.stack([b["total"] for b in budgets]))
    within = {part: np.mean([np.broadcast_to(b[part], b["total"].shape) for b in budgets],
                            axis=0) for part in PARTS}
    model = within["model"] + between
    return {"prediction": mean, "model": model, "scatter": within["scatter"],
            "noise": within["noise"], "total": model + within["scatter"] + within["noise"],
            "ensemble": between, "model_laplace": within["model"]}
