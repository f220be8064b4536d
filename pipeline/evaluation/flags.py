"""Per-star quality flags of the prediction catalog (bits in pipeline.artifacts.catalog)."""

from __future__ import annotations

import logging

import numpy as np

from pipeline.artifacts.catalog import (
    FLAG_BADPIX,
    FLAG_BROADBAND_OOD,
    FLAG_DOPPLER_OOD,
    FLAG_FEATURE_OOD,
    FLAG_LINES_OOD,
    FLAG_LSF_OOD,
    FLAG_MODEL_OOD,
    FLAG_NONFINITE,
    FLAG_OOD,
    FLAG_PEAK_OOD,
    FLAG_RESAMPLED,
    FLAG_SPECTRUM_OOD,
)

log = logging.getLogger(__name__)


def training_range(scaler) -> tuple[np.ndarray, np.ndarray]:
    """Training label range (lo, hi) (3,) from the scaler; its mean when it stores no range."""
    lo, hi = getattr(scaler, "label_min", None), getattr(scaler, "label_max", None)
    if lo is None or hi is None:
        log.warning("the label scaler stores no training label range: out-of-range flags use "
                    "distance from the training mean instead")
        return np.asarray(scaler.mean, np.float64), np.asarray(scaler.mean, np.float64)
    return np.asarray(lo, np.float64), np.asarray(hi, np.float64)


def model_error_ratio(model_cov: np.ndarray, scaler, posterior) -> np.ndarray:
    """(N,) largest ratio over labels of the model error to its training 99th percentile.

    Zeros when the posterior records no training reference (files from older versions).
    """
    reference = getattr(posterior, "train_model_std_q99", None)
    if reference is None:
        return np.zeros(model_cov.shape[0])
    std = np.sqrt(np.diagonal(model_cov, axis1=1, axis2=2)) / np.asarray(scaler.scale)
    return np.max(std / np.maximum(np.asarray(reference, np.float64), 1e-300), axis=1)


SHIFT_BITS = {"CHI2_EMULATOR_REL": FLAG_SPECTRUM_OOD, "FEATURE_DISTANCE": FLAG_FEATURE_OOD,
              "CHI2_BROADBAND_REL": FLAG_BROADBAND_OOD, "CHI2_PEAK_REL": FLAG_PEAK_OOD,
              "CHI2_DOPPLER_REL": FLAG_DOPPLER_OOD, "CHI2_LSF_REL": FLAG_LSF_OOD,
              "CHI2_LINES_REL": FLAG_LINES_OOD}
"""The FLAG bit of each thresholded shift statistic."""


def shift_flags(shift: dict, thresholds: dict[str, float]) -> np.ndarray:
    """(N,) int32 bits 5-11 from the statistics of ``pipeline.evaluation.shift``: each set
    where its statistic (:data:`SHIFT_BITS`) exceeds its validation threshold, given by
    column name in ``thresholds`` (``ShiftReference.thresholds``; NaN never flags)."""
    flags = np.zeros(len(next(iter(shift.values()))), np.int32)
    with np.errstate(invalid="ignore"):
        for name, threshold in thresholds.items():
            flags |= np.where(np.asarray(shift[name]) > threshold, SHIFT_BITS[name],
                              0).astype(np.int32)
    return flags


def star_flags(prediction: np.ndarray, total: np.ndarray, bad_fraction: np.ndarray,
               resampled: bool, scaler, predict_cfg: dict,
               model_ratio: np.ndarray | None = None, shift: dict | None = None,
               shift_thresholds: dict[str, float] | None = None,
               range_margin: np.ndarray | None = None) -> np.ndarray:
    """FLAG bit field (N,) int32; bits documented in ``pipeline.FLAG_BITS``.

    ``model_ratio`` (N,) is :func:`model_error_ratio`; bit 4 is set where it exceeds
    ``predict.ood_model_factor``. ``shift`` and ``shift_thresholds`` (by statistic) set bits
    5-11 (:func:`shift_flags`). Bit 0's margin beyond the training range is
    ``predict.ood_sigma`` training standard deviations per label, or ``range_margin`` (3,)
    physical units (the validation overshoot quantile of the emulator file) where that is
    larger.
    """
    lo, hi = training_range(scaler)
    # standard deviations, not the scale, which the loss weights divide by sqrt(w)
    margin = predict_cfg["ood_sigma"] * np.asarray(scaler.std, np.float64)
    if range_margin is not None:
        margin = np.maximum(margin, np.asarray(range_margin, np.float64))
    ood = np.any((prediction < lo - margin) | (prediction > hi + margin), axis=1)
    nonfinite = ~(np.all(np.isfinite(prediction), axis=1)
                  & np.all(np.isfinite(total), axis=(1, 2)))
    flags = np.zeros(prediction.shape[0], np.int32)
    flags |= np.where(ood, FLAG_OOD, 0).astype(np.int32)
    flags |= np.where(bad_fraction > predict_cfg["flag_bad_pixel_fraction"],
                      FLAG_BADPIX, 0).astype(np.int32)
    if resampled:
        flags |= FLAG_RESAMPLED
    flags |= np.where(nonfinite, FLAG_NONFINITE, 0).astype(np.int32)
    if model_ratio is not None:
        far = model_ratio > predict_cfg["ood_model_factor"]
        flags |= np.where(far, FLAG_MODEL_OOD, 0).astype(np.int32)
    if shift is not None and shift_thresholds is not None:
        flags |= shift_flags(shift, shift_thresholds)
    return flags
