"""Label-free shift detection: its reference (``emulator.npz``) and each star's statistics.

Three kinds of statistics, each compared with a threshold set on validation stars (no labels
needed):

* ``CHI2_EMULATOR``: chi^2 per pixel of the spectrum against the label -> flux emulator
  (:mod:`pipeline.evaluation.emulator`) at the emulator's best-fit labels
  (:meth:`LabelEmulator.best_fit`, ``fit_iterations`` Levenberg-Marquardt steps from the
  predicted labels, within ``fit_margin`` training standard deviations of the training box),
  and ``CHI2_EMULATOR_REL``, that value divided by the validation median at the star's SNR
  (:class:`SnrTrend`, the SNR measured from the spectrum). Flag when REL exceeds its
  validation ``chi2_quantile``. The best-fit labels are reported too (``TEFF_EMULATOR``,
  ``LOGG_EMULATOR``, ``FE_H_EMULATOR``). Fitting removes the network's own label errors from
  the statistic, which at the predicted labels set a wide validation tail.
* Residual statistics (:data:`RESIDUAL_STATISTICS`): the residuals against the emulator at
  the same best-fit labels, summed in other ways (:mod:`pipeline.evaluation.emulator`).
  ``CHI2_BROADBAND``, the mean window chi^2 over windows of ``broadband_width`` pixels: a
  continuum a few per cent off or tilted, which the chi^2 per pixel dilutes among all pixels,
  stands out here. ``CHI2_PEAK``, the largest window of ``peak_width`` pixels: a few
  emission lines or other narrow features. ``CHI2_DOPPLER`` and ``CHI2_LSF``, the residuals
  projected onto the first and second derivative of the emulated spectrum: lines shifted
  (an unremoved radial velocity) or broadened (another line-spread function).
  ``CHI2_LINES``, the residuals projected onto ``m ln m`` with the part the emulator's label
  gradients explain removed: every line stronger or weaker together (an opacity scale, an
  abundance pattern) beyond what a change of the labels reproduces, less the emulator's own
  misfit along that template at the star's labels and in units of the noise plus the misfit's
  scatter about it (a local line through the training stars nearest them,
  ``strength_misfit``). Each divided by its own validation median at the star's SNR
  (``_REL``); flag when that exceeds its validation ``chi2_quantile``. ``LINES_LIMIT``: the
  smallest common fractional change of the optical depths at which that flag fires in
  expectation (:func:`lines_limit`), large where weak lines leave little of the template or
  the emulator's misfit is large.
* ``FEATURE_DISTANCE``: Mahalanobis distance of the last-hidden-layer features from the
  training features (:mod:`pipeline.evaluation.feature_distance`). Flag when it exceeds its
  validation ``feature_quantile``.

The file (NumPy ``.npz``, no pickles) holds the emulator arrays (``label_mean``,
``label_scale``, ``order``, ``centres``, ``coef``, ``scatter``, ``usable``, ``label_min``,
``label_max``; the line-strength misfit as ``strength_misfit_labels``, the training stars'
standardized best-fit labels, ``strength_misfit_amplitude`` and ``strength_misfit_variance``,
their amplitudes a and noise variances v, and ``strength_misfit_neighbours``), the fit
settings the threshold was set with (``fit_iterations``, ``fit_margin``), the SNR trend
(``snr_log``, ``snr_median``), ``chi2_threshold``, for each residual statistic (prefix
``broadband``, ``peak``, ``doppler``, ``lsf``, ``lines``) its ``<prefix>_width``, trend
(``<prefix>_snr_log``, ``<prefix>_snr_median``) and ``<prefix>_threshold``, the feature
reference (``feature_mean``, ``feature_scale``, ``feature_cholesky``, ``feature_shrinkage``),
``feature_threshold``, ``range_margin`` (3,) and ``info`` (JSON: validation medians and
flagged fractions, provenance). A file without the fit settings (from a version that set the
threshold at the predicted labels), without the residual statistics or without the misfit's
amplitudes and noise variances (from a version that took the misfit for noise about zero)
is refused.

The label-range flag (bit 0) also takes its margin from here when the file is present: per
label, the ``range_quantile`` quantile of how far the validation predictions overshoot the
training range (0 where they stay inside), at least ``predict.ood_sigma`` training standard
deviations (``pipeline.evaluation.flags``): a network whose errors scatter edge stars beyond
the grid does not flag them, one that extrapolates further than that does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline import LABELS
from pipeline.artifacts.catalog import SHIFT_COLUMNS
from pipeline.artifacts.npz_file import read_npz, unreadable, write_npz
from pipeline.evaluation.emulator import (
    STRENGTH_VARIANCE,
    LabelEmulator,
    SnrTrend,
    StrengthMisfit,
)
from pipeline.evaluation.feature_distance import FeatureReference, last_hidden_features
from pipeline.exceptions import ModelFileError
from pipeline.random_streams import subset
from pipeline.spectra.validation import spectrum_snr

EMULATOR_FILE = "emulator.npz"
_EMULATOR_KEYS = ("label_mean", "label_scale", "order", "centres", "coef", "scatter", "usable",
                  "label_min", "label_max")
_MISFIT_KEYS = {"strength_misfit_labels": "z", "strength_misfit_amplitude": "amplitude",
                "strength_misfit_variance": "variance",
                "strength_misfit_neighbours": "neighbours"}
"""File key -> :class:`StrengthMisfit` field."""
EMULATOR_LABEL_COLUMNS = tuple(f"{label}_EMULATOR" for label in LABELS)
"""Catalog columns of the emulator's best-fit labels (physical units)."""
RESIDUAL_STATISTICS = {"CHI2_BROADBAND": ("broadband", "mean"), "CHI2_PEAK": ("peak", "max"),
                       "CHI2_DOPPLER": ("doppler", "gradient"),
                       "CHI2_LSF": ("lsf", "curvature"), "CHI2_LINES": ("lines", "strength")}
"""Catalog column -> (file prefix, and ``emulator.<prefix>_width`` where there is one;
reduction of the residuals: :func:`pipeline.evaluation.emulator.pixel_chi2`)."""


@dataclass
class ResidualStatistic:
    """A statistic of the emulator residuals at the best fit (windows of ``width`` pixels and
    ``reduce`` over them, or a template: ``pixel_chi2``), its validation median against SNR
    and its threshold on the ratio to that median."""

    width: int
    reduce: str
    trend: SnrTrend
    threshold: float


@dataclass
class ShiftReference:
    emulator: LabelEmulator
    snr_trend: SnrTrend
    chi2_threshold: float
    features: FeatureReference
    feature_threshold: float
    range_margin: np.ndarray
    fit_iterations: int
    fit_margin: float
    residuals: dict[str, ResidualStatistic]
    info: dict = field(default_factory=dict)

    def best_fit_only(self) -> ShiftReference:
        """This reference without its residual statistics: :func:`shift_statistics` then fits
        the emulator's labels (what a scatter model with the emulator offset needs) and its
        chi^2, without the broadband, peak, Doppler, line-spread and line-strength sums."""
        return replace(self, residuals={})

    @property
    def thresholds(self) -> dict[str, float]:
        """Threshold of each flagged statistic, by catalog column (``flags.shift_flags``)."""
        return {"CHI2_EMULATOR_REL": self.chi2_threshold,
                "FEATURE_DISTANCE": self.feature_threshold,
                **{f"{name}_REL": w.threshold for name, w in self.residuals.items()}}

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file, then rename)."""
        arrays = {k: getattr(self.emulator, k) for k in _EMULATOR_KEYS}
        arrays.update({k: getattr(self.emulator.strength_misfit, f)
                       for k, f in _MISFIT_KEYS.items()}, emulator_space=self.emulator.space)
        arrays.update(snr_log=self.snr_trend.log_snr, snr_median=self.snr_trend.median,
                      chi2_threshold=self.chi2_threshold,
                      feature_mean=self.features.mean, feature_scale=self.features.scale,
                      feature_cholesky=self.features.cholesky,
                      feature_shrinkage=self.features.shrinkage,
                      feature_threshold=self.feature_threshold, range_margin=self.range_margin,
                      fit_iterations=self.fit_iterations, fit_margin=self.fit_margin,
                      info=json.dumps(self.info, default=str))
        for name, (prefix, _) in RESIDUAL_STATISTICS.items():
            w = self.residuals[name]
            arrays.update({f"{prefix}_width": w.width, f"{prefix}_snr_log": w.trend.log_snr,
                           f"{prefix}_snr_median": w.trend.median,
                           f"{prefix}_threshold": w.threshold})
        write_npz(path, arrays)

    def check(self, path, n_pixels: int, n_features: int) -> None:
        """ModelFileError unless fitted for a grid of ``n_pixels`` and ``n_features`` units."""
        have = (self.emulator.coef.shape[-1], len(self.features.mean))
        if have != (n_pixels, n_features):
            raise ModelFileError(f"emulator file '{path}' was fitted for {have[0]} pixels and "
                                 f"{have[1]} last-hidden units, the model has {n_pixels} and "
                                 f"{n_features}; rerun the emulator step for this model")

    @classmethod
    def load(cls, path: str | Path) -> ShiftReference:
        path = Path(path)
        a = read_npz(path, (), "emulator", "emulator",
                     "run the emulator step (snakemake results/model/emulator.npz) first")
        try:
            if "fit_iterations" not in a:
                raise ModelFileError(f"emulator file '{path}' holds a threshold of the chi^2 at "
                                     "the predicted labels (an older version); rerun the "
                                     "emulator step to set it at the best-fit labels")
            if (any(f"{prefix}_threshold" not in a for prefix, _ in RESIDUAL_STATISTICS.values())
                    or any(k not in a for k in _MISFIT_KEYS)):
                raise ModelFileError(f"emulator file '{path}' lacks some of the broadband, peak, "
                                     "Doppler, line-spread and line-strength statistics or "
                                     "the line-strength misfit's amplitudes (an older "
                                     "version); rerun the emulator step")
            residuals = {name: ResidualStatistic(int(a[f"{prefix}_width"]), reduce,
                                                 SnrTrend(a[f"{prefix}_snr_log"],
                                                          a[f"{prefix}_snr_median"]),
                                                 float(a[f"{prefix}_threshold"]))
                         for name, (prefix, reduce) in RESIDUAL_STATISTICS.items()}
            misfit = StrengthMisfit(**{f: a[k] for k, f in _MISFIT_KEYS.items()})
            misfit.neighbours = int(misfit.neighbours)
            emulator = LabelEmulator(**{k: a[k] for k in _EMULATOR_KEYS},
                                     strength_misfit=misfit,  # files before the log-depth one:
                                     space=str(a["emulator_space"]) if "emulator_space" in a
                                     else "flux")
            emulator.order = int(emulator.order)
            return cls(emulator, SnrTrend(a["snr_log"], a["snr_median"]),
                       float(a["chi2_threshold"]),
                       FeatureReference(a["feature_mean"], a["feature_scale"],
                                        a["feature_cholesky"], float(a["feature_shrinkage"])),
                       float(a["feature_threshold"]), a["range_margin"],
                       int(a["fit_iterations"]), float(a["fit_margin"]), residuals,
                       json.loads(str(a["info"])))
        except (KeyError, ValueError) as exc:
            raise unreadable(path, "emulator", "emulator", exc) from None


def shift_statistics(reference: ShiftReference | None, model, flux, flux_err, good,
                     prediction, batch_size: int = 256, features=None, snr=None,
                     threads: int = 1) -> dict:
    """Per-star (N,) statistics named by ``SHIFT_COLUMNS`` and the best-fit
    labels ``EMULATOR_LABEL_COLUMNS`` (NaN without a reference) for spectra with
    ``prediction`` (N, 3) physical labels; ``good`` (N, P) bool.

    ``features``: the stars' last hidden features (N, d) when the caller already has them
    (``error_budget(..., feature_layers=[last_dense_layer(model)])``), else computed here;
    ``snr`` (N,) likewise (``spectrum_snr`` on the good pixels); ``threads`` for the
    emulator fit (:meth:`~pipeline.evaluation.emulator.LabelEmulator.fit_statistics`)."""
    n = len(flux)
    if reference is None:
        return {k: np.full(n, np.nan) for k in (*SHIFT_COLUMNS, *EMULATOR_LABEL_COLUMNS)}
    lines = reference.residuals.get("CHI2_LINES")
    reductions = ([(1, "mean")] + [(w.width, w.reduce) for w in reference.residuals.values()]
                  + ([(1, STRENGTH_VARIANCE)] if lines else []))
    best, (chi2, *values) = reference.emulator.fit_statistics(
        flux, flux_err, good, prediction, reductions, reference.fit_iterations,
        reference.fit_margin, threads=threads)
    if snr is None:
        snr = spectrum_snr(flux, flux_err, good)
    residuals = {}
    if lines:
        residuals["LINES_LIMIT"] = lines_limit(values.pop(), lines.threshold * lines.trend(snr))
    for (name, w), value in zip(reference.residuals.items(), values, strict=True):
        residuals[name], residuals[f"{name}_REL"] = value, value / w.trend(snr)
    if features is None:
        features = last_hidden_features(model, flux, batch_size)
    return {"CHI2_EMULATOR": chi2, "CHI2_EMULATOR_REL": chi2 / reference.snr_trend(snr),
            **residuals,
            "FEATURE_DISTANCE": reference.features.distance(features),
            **dict(zip(EMULATOR_LABEL_COLUMNS, best.T, strict=True))}


def lines_limit(variance: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """(N,) the smallest fractional change c of every optical depth alike (m -> m**(1 + c),
    either sign) that the line-strength statistic flags in expectation: c^2 / (v + tau^2)
    reaching ``threshold`` (the flag threshold on CHI2_LINES_REL times the star's validation
    median, so in units of CHI2_LINES), with ``variance`` v + tau^2
    (:meth:`~pipeline.evaluation.emulator.Residuals.strength_variance`). To first order the
    change adds c to the amplitude a, so a star at the limit sits at the threshold on
    average and is flagged about half the time."""
    return np.sqrt(threshold * variance)


def range_overshoot(prediction: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(N, L) distance of each predicted label beyond [lo, hi] (0 inside)."""
    return np.maximum(np.maximum(lo - prediction, prediction - hi), 0.0)


MISFIT_STARS = 4000


def training_strength_misfit(emulator: LabelEmulator, train, train_good: np.ndarray, cfg: dict,
                             seed: int = 0, threads: int = 1) -> StrengthMisfit:
    """The emulator's misfit along the line-strength template
    (:class:`~pipeline.evaluation.emulator.StrengthMisfit`), from up to ``MISFIT_STARS``
    training stars at their best-fit labels started from their true labels. Training stars,
    not validation ones: the validation stars set the thresholds, and a threshold set on the
    stars a statistic's normalization was fitted to is exceeded less often by them than by new
    stars (on an earlier default run the line-strength bit flagged 0.33% of the validation
    stars and 0.87% of the test stars that way, 0.53% with the misfit from training stars).
    The emulator was fitted to these stars too, so the misfit comes out somewhat smaller than
    on new stars; the validation stars' threshold absorbs that alike for every new star."""
    n = len(train_good)
    rows = subset(seed, "strength_misfit", n, MISFIT_STARS)
    flux, flux_err = (np.asarray(a[rows], np.float64) for a in (train.flux, train.flux_err))
    best, _ = emulator.best_fit(flux, flux_err, train_good[rows], train.label_array()[rows],
                                cfg["fit_iterations"], cfg["fit_margin"], threads=threads)
    amplitude, variance = emulator.strength_amplitudes(flux, flux_err, train_good[rows], best)
    return StrengthMisfit.fit(emulator.standardize(best), amplitude, variance)


def configured_emulator(labels, flux, flux_err, good, cfg: dict, seed: int = 0) -> LabelEmulator:
    """:meth:`LabelEmulator.fit` with the settings of ``cfg``, the ``emulator`` config section
    (order, ridge, regions, weighting, space)."""
    return LabelEmulator.fit(labels, flux, flux_err, good, order=cfg["order"], ridge=cfg["ridge"],
                             regions=cfg["regions"], seed=seed, weighting=cfg["weighting"],
                             space=cfg["space"])


def fit_reference(model, train, valid, train_good, valid_good, valid_prediction,
                  cfg: dict, seed: int = 0, threads: int = 1) -> ShiftReference:
    """The reference: emulator and feature cloud from ``train`` (Spectra with labels),
    SNR trend and thresholds from the ``valid`` spectra at the emulator's best-fit labels
    started from their predicted labels (as the predict step will compute them).

    ``cfg`` is the ``emulator`` config section (order, ridge, regions, fit_iterations,
    fit_margin, broadband_width, peak_width, snr_bins, chi2_quantile, feature_quantile,
    range_quantile, batch_size); the template statistics have no width (stored as 1).
    ``threads`` for the emulator fits.
    """
    emulator = configured_emulator(train.label_array(), train.flux, train.flux_err, train_good,
                                   cfg, seed)
    reductions = [(int(cfg.get(f"{prefix}_width", 1)), reduce)
                  for prefix, reduce in RESIDUAL_STATISTICS.values()]
    emulator.strength_misfit = training_strength_misfit(emulator, train, train_good, cfg, seed,
                                                        threads)
    # with the misfit set, the line-strength statistic comes in units of noise and misfit
    _, (chi2, *values) = emulator.fit_statistics(
        valid.flux, valid.flux_err, valid_good, valid_prediction, [(1, "mean"), *reductions],
        cfg["fit_iterations"], cfg["fit_margin"], threads=threads)
    snr = spectrum_snr(valid.flux, valid.flux_err, valid_good)
    trend = SnrTrend.fit(snr, chi2, cfg["snr_bins"])
    residuals, rel_of = {}, {}
    for name, (width, reduce), value in zip(RESIDUAL_STATISTICS, reductions, values,
                                            strict=True):
        w_trend = SnrTrend.fit(snr, value, cfg["snr_bins"])
        rel_of[name] = value / w_trend(snr)
        residuals[name] = ResidualStatistic(width, reduce, w_trend,
                                            float(np.nanquantile(rel_of[name],
                                                                 cfg["chi2_quantile"])))
    features = FeatureReference.fit(last_hidden_features(model, train.flux,
                                                         cfg["batch_size"]))
    rel = chi2 / trend(snr)
    dist = features.distance(last_hidden_features(model, valid.flux, cfg["batch_size"]))
    chi2_threshold = float(np.nanquantile(rel, cfg["chi2_quantile"]))
    feature_threshold = float(np.nanquantile(dist, cfg["feature_quantile"]))
    labels = train.label_array()
    overshoot = range_overshoot(valid_prediction, labels.min(axis=0), labels.max(axis=0))
    range_margin = np.nanquantile(overshoot, cfg["range_quantile"], axis=0)
    info = {"n_train": len(train.flux), "n_valid": len(valid.flux),
            "regions": len(emulator.centres), "weighting": cfg["weighting"],
            "space": emulator.space,
            "feature_dim": len(features.mean),
            "valid_chi2_median": float(np.nanmedian(chi2)),
            "valid_feature_distance_median": float(np.nanmedian(dist)),
            "valid_flagged_chi2": float(np.mean(rel > chi2_threshold)),
            **{f"valid_flagged_{prefix}": float(np.mean(rel_of[name] > residuals[name].threshold))
               for name, (prefix, _) in RESIDUAL_STATISTICS.items()},
            "valid_flagged_feature": float(np.mean(dist > feature_threshold)),
            "valid_flagged_any": float(np.mean(
                (rel > chi2_threshold) | (dist > feature_threshold)
                | np.any([rel_of[name] > stat.threshold for name, stat in residuals.items()],
                         axis=0))),
            "valid_flagged_range": float(np.mean(np.any(overshoot > range_margin, axis=1))),
            "range_margin": range_margin.tolist()}
    return ShiftReference(emulator, trend, chi2_threshold, features, feature_threshold,
                          range_margin, int(cfg["fit_iterations"]), float(cfg["fit_margin"]),
                          residuals, info)
