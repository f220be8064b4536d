"""Laplace approximation of the last layers: curvature, evidence, posterior, scatter model
and per-star error budget.

    from pipeline.laplace import fit_laplace, Posterior
"""

from pipeline.laplace.posterior import Posterior, fit_laplace

__all__ = ["Posterior", "fit_laplace"]
