"""The posterior file (``posterior.npz``): its one writer and its one reader.

Arrays (NumPy ``.npz``, no pickles):

    weight_names, weight_shapes (JSON)    the head weights, in order
    map_values (P_L,)                     their MAP values theta*
    cholesky (P_L, P_L) float64           lower Cholesky factor L of the posterior precision
    prior_precision, prior_groups         prior precision per group, group of every weight
    noise_std (K,)                        per-label noise, standardized units
    log_evidence, curvature, last_layers  scalars
    eigenvalues                           eigenvalues of the curvature (diagnostics)
    evidence_curve_prior_precision,
    evidence_curve_log_evidence           the evidence against the prior precision
    info (JSON)                           fit report, scatter model, provenance

:class:`pipeline.laplace.posterior.Posterior` saves and loads itself through these two
functions; the figures read the same arrays through :func:`read_posterior_arrays`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.artifacts.npz_file import read_npz, unreadable, write_npz

KEYS = ("weight_names", "weight_shapes", "map_values", "cholesky", "last_layers",
        "prior_precision", "prior_groups", "noise_std", "log_evidence", "curvature",
        "eigenvalues", "evidence_curve_prior_precision", "evidence_curve_log_evidence", "info")


def write_posterior_arrays(path: str | Path, arrays: dict) -> None:
    """Write ``arrays`` (exactly :data:`KEYS`) atomically; ``info`` is JSON-encoded here."""
    if sorted(arrays) != sorted(KEYS):
        raise ValueError(f"posterior arrays must have the keys {KEYS}, got {sorted(arrays)}")
    write_npz(path, dict(arrays, info=json.dumps(arrays["info"], default=str)))


def read_posterior_arrays(path: str | Path) -> dict:
    """Every array of a posterior file; ``info`` decoded from JSON.

    Raises:
        ModelFileError: the file is missing, unreadable, or lacks one of :data:`KEYS`.
    """
    data = read_npz(path, KEYS, "posterior", "laplace", "run the laplace step first or pass "
                    "--posterior results/laplace/posterior.npz")
    try:
        data["info"] = json.loads(str(data["info"]))
    except ValueError as exc:
        raise unreadable(Path(path), "posterior", "laplace", exc) from None
    return data
