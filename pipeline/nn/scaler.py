"""The label scaler: standardized labels for training, physical units for every output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import LABELS
from pipeline.artifacts.atomic import atomic_path
from pipeline.exceptions import DataError, ModelFileError
from pipeline.spectra.validation import check_training_labels


@dataclass
class LabelScaler:
    """Per-label standardization ``z = (y - mean) / scale`` of (TEFF, LOGG, FE_H).

    ``mean`` and ``scale`` are float64 (3,): the training-set mean and the standard deviation
    (ddof = 0) over sqrt(``weights``), the per-label weights of the training loss
    (:mod:`pipeline.nn.label_weights`; ones: plain standardization), so that the mean squared
    error of z is the w-weighted MSE of the standardized labels. Physical covariances are
    ``C_y = S C_z S`` with ``S = diag(scale)``, physical Jacobians ``d y / d x = S d z / d x``.
    ``label_min`` and ``label_max`` (3,) record the training label range, against which
    predictions are flagged as extrapolations.
    """

    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    label_min: np.ndarray | None = None
    label_max: np.ndarray | None = None
    weights: np.ndarray | None = None

    def fit(self, y: np.ndarray, weights: np.ndarray | None = None) -> LabelScaler:
        """Fit mean and scale to labels ``y`` (N, 3) with loss ``weights`` (3,) (default
        ones); returns ``self``.

        Raises
        ------
        DataError
            If a label is non-finite or constant (zero variance: nothing to learn).
        """
        y = np.asarray(y, dtype=np.float64)
        if y.ndim != 2 or y.shape[1] != len(LABELS):
            raise DataError(f"labels must have shape (N, {len(LABELS)}), got {y.shape}")
        bad = ~np.isfinite(y)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise DataError(f"label '{LABELS[col]}' of row {row} is not finite; drop the row "
                            "(config data.nan_labels: drop) before training")
        check_training_labels(y)
        self.weights = np.ones(y.shape[1]) if weights is None else np.asarray(weights, np.float64)
        self.mean, self.scale = y.mean(axis=0), y.std(axis=0) / np.sqrt(self.weights)
        self.label_min, self.label_max = y.min(axis=0), y.max(axis=0)
        return self

    @property
    def std(self) -> np.ndarray:
        """(3,) the training standard deviation of each label: ``scale * sqrt(weights)``."""
        _, scale = self._fitted()
        weights = np.ones_like(scale) if self.weights is None else self.weights
        return scale * np.sqrt(weights)

    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None or self.scale is None:
            raise ModelFileError("the label scaler is not fitted; call fit(y) or load(path)")
        return self.mean, self.scale

    def transform(self, y: np.ndarray) -> np.ndarray:
        """Physical labels (..., 3) -> standardized labels (..., 3), float64."""
        mean, scale = self._fitted()
        return (np.asarray(y, dtype=np.float64) - mean) / scale

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        """Standardized labels (..., 3) -> physical labels (..., 3), float64."""
        mean, scale = self._fitted()
        return np.asarray(z, dtype=np.float64) * scale + mean

    def covariance_to_physical(self, cov: np.ndarray) -> np.ndarray:
        """Standardized covariances (..., 3, 3) -> physical: ``cov * outer(scale, scale)``."""
        _, scale = self._fitted()
        return np.asarray(cov, dtype=np.float64) * np.outer(scale, scale)

    def jacobian_to_physical(self, jac: np.ndarray) -> np.ndarray:
        """Jacobians d z / d x (..., 3, P) -> d y / d x: ``scale[:, None] * jac``.

        A float32 input stays float32 (shards of (N, 3, P) are large); others become float64.
        """
        _, scale = self._fitted()
        jac = np.asarray(jac)
        dtype = np.float32 if jac.dtype == np.float32 else np.float64
        return scale[:, None].astype(dtype) * jac.astype(dtype, copy=False)

    def save(self, path: str | Path, provenance: dict | None = None) -> None:
        """Write the scaler as JSON (exact float64 round trip), atomically.

        ``provenance`` (the train step's provenance cards) is stored alongside.
        """
        mean, scale = self._fitted()
        doc = {"labels": list(LABELS), "mean": mean.tolist(), "scale": scale.tolist(),
               "provenance": provenance or {}}
        if self.label_min is not None and self.label_max is not None:
            doc["label_min"] = np.asarray(self.label_min, np.float64).tolist()
            doc["label_max"] = np.asarray(self.label_max, np.float64).tolist()
        if self.weights is not None:
            doc["weights"] = np.asarray(self.weights, np.float64).tolist()
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LabelScaler:
        """Read a scaler written by :meth:`save`.

        Raises
        ------
        ModelFileError
            If the file is missing, not JSON, or its labels, shapes or values are wrong.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"label scaler '{path}' does not exist; rerun the train step")
        try:
            doc = json.loads(path.read_text())
            mean = np.asarray(doc["mean"], dtype=np.float64)
            scale = np.asarray(doc["scale"], dtype=np.float64)
            labels = tuple(doc["labels"])
            bounds = [np.asarray(doc[k], dtype=np.float64) if k in doc else None
                      for k in ("label_min", "label_max", "weights")]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(f"label scaler '{path}' is corrupt ({exc}); rerun the train "
                                 "step") from None
        ok = (labels == LABELS and mean.shape == scale.shape == (len(LABELS),)
              and np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all())
        if not ok:
            raise ModelFileError(f"label scaler '{path}' is corrupt (needs labels {LABELS}, "
                                 "finite mean and positive scale of length 3); rerun the "
                                 "train step")
        if any(b is not None and b.shape != mean.shape for b in bounds):
            raise ModelFileError(f"label scaler '{path}' is corrupt (label_min, label_max and "
                                 "weights must have length 3); rerun the train step")
        return cls(mean=mean, scale=scale, label_min=bounds[0], label_max=bounds[1],
                   weights=bounds[2])
