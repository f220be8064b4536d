"""Health of a trained network on validation spectra: dead units and feature conditioning.

* ``active_fraction`` per hidden Dense layer: the fraction of its units whose output is > 0
  for at least one validation spectrum. A ReLU unit that never fires is dead: it passes no
  gradient and adds nothing (on the default run 1764 of 2048 first-layer units were dead).
* ``condition_number`` of the last hidden layer's features Phi (N, d) on the validation
  spectra: s_max / s_min of its singular values (``None`` when s_min is 0, i.e. a dead or
  duplicate unit makes Phi rank-deficient), and ``condition_number_active`` for the units
  that fire. A large value means the output layer and the Laplace head see nearly collinear
  features: least-squares weights become large and cancel.

:func:`unit_diagnostics` computes them; ``pipeline.artifacts.model_dir.write_diagnostics``
stores them as ``diagnostics.json`` in the model directory; :func:`network_health` condenses
them for ``metrics.json``. A healthy network keeps at least half of the units of every hidden
layer active (:data:`HEALTHY_ACTIVE_FRACTION`): below that the training log warns.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.spectra.dataset import as_rows

log = logging.getLogger(__name__)

HEALTHY_ACTIVE_FRACTION = 0.5


def _condition(s: np.ndarray) -> float | None:
    if s.size == 0 or s[0] == 0:
        return None
    return float(s[0] / s[-1]) if s[-1] > 0 else None


def unit_diagnostics(model, flux, batch_size: int = 256) -> dict:
    """Dead-unit fractions and last-hidden-layer conditioning of ``model`` on ``flux``.

    Returns a JSON-ready dict: ``layers`` (one entry per hidden Dense layer: name, units,
    active units, active_fraction) and ``last_hidden`` (name, units, active units, rank,
    condition_number, condition_number_active, n_stars).
    """
    import keras

    dense = [la for la in model.layers if isinstance(la, keras.layers.Dense)]
    hidden = dense[:-1]
    flux = as_rows(flux)  # a row reader streams: only row slices are read
    out = {"n_stars": int(len(flux)), "layers": [], "last_hidden": None}
    if not hidden or len(flux) == 0:
        return out
    probe = keras.Model(model.inputs[0], [la.output for la in hidden])
    ever = [np.zeros(la.units, bool) for la in hidden]
    last = []
    for s in range(0, len(flux), batch_size):
        acts = probe(flux[s:s + batch_size], training=False)
        acts = acts if isinstance(acts, (list, tuple)) else [acts]
        for i, a in enumerate(acts):
            a = np.asarray(a)
            ever[i] |= (a > 0).any(axis=0)
        last.append(np.asarray(acts[-1], np.float64))
    for la, on in zip(hidden, ever, strict=True):
        out["layers"].append({"name": la.name, "units": int(la.units),
                              "active": int(on.sum()), "active_fraction": float(on.mean())})
    phi = np.concatenate(last)
    s = np.linalg.svd(phi, compute_uv=False)
    s_active = np.linalg.svd(phi[:, ever[-1]], compute_uv=False) if ever[-1].any() else s[:0]
    tol = s[0] * max(phi.shape) * np.finfo(np.float64).eps if s.size else 0.0
    out["last_hidden"] = {
        "name": hidden[-1].name, "units": int(hidden[-1].units), "active": int(ever[-1].sum()),
        "rank": int(np.sum(s > tol)), "condition_number": _condition(s),
        "condition_number_active": _condition(s_active)}
    return out


def network_health(diag: dict) -> dict:
    """The diagnostics a results table quotes: active fraction per hidden layer, the smallest,
    whether every layer keeps at least :data:`HEALTHY_ACTIVE_FRACTION` of its units active,
    and the last hidden layer's rank and condition numbers."""
    fractions = {layer["name"]: layer["active_fraction"] for layer in diag["layers"]}
    smallest = min(fractions.values(), default=None)
    return {"n_stars": diag["n_stars"], "active_fraction": fractions,
            "min_active_fraction": smallest,
            "half_units_active": None if smallest is None
            else bool(smallest >= HEALTHY_ACTIVE_FRACTION),
            "last_hidden": diag.get("last_hidden")}


def log_diagnostics(diag: dict) -> None:
    for layer in diag["layers"]:
        log.info("layer %s: %d of %d units active on %d validation spectra (%.1f%%)",
                 layer["name"], layer["active"], layer["units"], diag["n_stars"],
                 100 * layer["active_fraction"])
        if layer["active_fraction"] < HEALTHY_ACTIVE_FRACTION:
            log.warning("layer %s: fewer than %.0f%% of its units ever fire on validation "
                        "spectra; see docs/training.md for the recipe that keeps them alive",
                        layer["name"], 100 * HEALTHY_ACTIVE_FRACTION)
    last = diag.get("last_hidden")
    if last:
        fmt = lambda c: "inf" if c is None else f"{c:.3g}"  # noqa: E731
        log.info("last hidden layer %s: rank %d of %d, condition number %s (active units: %s)",
                 last["name"], last["rank"], last["units"], fmt(last["condition_number"]),
                 fmt(last["condition_number_active"]))
