"""The ensemble scatter file (``results/laplace/ensemble_scatter.npz``): its writer and reader.

The scatter model of an ensemble's mixture (``pipeline.laplace.ensemble.fit_mixture_scatter``),
fitted on the validation stars by the ``ensemble_scatter`` step once every member's laplace job
is done, and read by predict (``--scatter``). Arrays (NumPy ``.npz``, no pickles):

    coef, u_centre, u_scale, u_lo, u_hi,
    cap, correlation                      the ``ScatterModel`` fields (standardized units)
    kind                                  'constant' or 'linear' (config ``laplace.scatter``)
    label_scale (3,)                      the members' label scale (scaler.json) of the fit
    members (M,)                          fingerprint of each member: the first 16 hex digits
                                          of the SHA-256 of its posterior's MAP head weights
    info (JSON)                           number of validation stars, provenance

Predict refuses a file whose fingerprints or label scale are not those of the members it was
given (the file belongs to another ensemble, or a member was retrained since).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.artifacts.members import ENSEMBLE_SCATTER_FILE as FILE_NAME  # noqa: F401 (re-export)
from pipeline.artifacts.npz_file import read_npz, write_npz
from pipeline.exceptions import ModelFileError
from pipeline.laplace.scatter import FIELDS, ScatterModel

KEYS = (*FIELDS, "kind", "label_scale", "members", "info")


def member_fingerprint(posterior) -> str:
    """16 hex digits of the SHA-256 of a posterior's MAP head weights (float64 bytes)."""
    weights = np.ascontiguousarray(posterior.theta_map, dtype=np.float64)
    return hashlib.sha256(weights.tobytes()).hexdigest()[:16]


def write_ensemble_scatter(path: str | Path, scatter: ScatterModel, kind: str, label_scale,
                           posteriors: list, info: dict) -> None:
    """Write the ensemble's scatter model for the members with ``posteriors``, atomically."""
    arrays = {k: getattr(scatter, k) for k in FIELDS}
    arrays.update(kind=np.array(kind), label_scale=np.asarray(label_scale, np.float64),
                  members=np.array([member_fingerprint(p) for p in posteriors]),
                  info=np.array(json.dumps(info, default=str)))
    write_npz(path, arrays)


def read_ensemble_scatter(path: str | Path, posteriors: list, label_scale) -> ScatterModel:
    """The scatter model of ``path``, checked against the members it will be used with.

    Raises:
        ModelFileError: the file is missing, unreadable, lacks one of :data:`KEYS`, or was
        fitted for other members (fingerprints) or another label scaler.
    """
    data = read_npz(path, KEYS, "ensemble scatter", "ensemble_scatter", "run the "
                    "ensemble_scatter step (python -m pipeline.steps.ensemble_scatter)")
    expected = [member_fingerprint(p) for p in posteriors]
    if [str(m) for m in data["members"]] != expected:
        raise ModelFileError(
            f"'{path}' was fitted for members {list(map(str, data['members']))}, not for the "
            f"given posteriors {expected} (fingerprints of their MAP weights, in --posterior "
            "order); rerun the ensemble_scatter step with the same --model/--posterior pairs")
    if not np.allclose(data["label_scale"], label_scale, rtol=1e-12, atol=0):
        raise ModelFileError(f"'{path}' was fitted with label scale {data['label_scale']}, the "
                             f"members' scaler.json has {np.asarray(label_scale)}; rerun the "
                             "ensemble_scatter step")
    return ScatterModel(*(np.asarray(data[k], np.float64) for k in FIELDS))
