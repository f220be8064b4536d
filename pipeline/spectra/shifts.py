"""Distribution shifts of the synthetic generator: spectra a model trained on it never saw.

Two kinds of transform, and a suite (:data:`SHIFTS`) built from them:

* **generator parameters** (exact physics, :mod:`pipeline.spectra.synthetic`): line strengths
  ``tau -> s tau`` (``flux -> flux**s``, since ``flux = exp(-tau)``), labels outside the
  training box, SNR below it, a radial velocity (the rest-frame model evaluated at
  ``lambda / (1 + v/c)``, no interpolation), another seed of the random line forest;
* **transforms of the flux on the log-lambda grid**, for any spectra (reusable on real data):
  :func:`doppler_shift` (linear interpolation in ``ln lambda``), :func:`broaden_lsf` (Gaussian
  convolution in pixels), :func:`scale_continuum` (a factor times a linear tilt in
  ``ln lambda``), :func:`add_spikes` (cosmic rays left unmasked), :func:`add_emission_lines`.

Transforms of the physical spectrum act on the noiseless model; the generator's noise is then
carried over exactly (:func:`renoise`): its noise is ``pattern sqrt(model) / SNR * z``, so
multiplying a star's noise and errors by ``sqrt(model' / model)`` gives the same draw ``z``
at the new model. Transforms of the observation (continuum normalization, cosmic rays) act on
the noisy flux. Grid gaps (the three APOGEE chips) are respected: nothing is interpolated or
convolved across a gap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from scipy.ndimage import gaussian_filter1d

from pipeline.exceptions import ConfigError
from pipeline.spectra import linelist, synthetic
from pipeline.spectra.dataset import Spectra

C_KMS = synthetic.C_KMS


# ------------------------------------------------------------------------- grid helpers
def _ln_step(wave: np.ndarray) -> float:
    """The (median) step of ``ln lambda`` between neighbouring pixels."""
    return float(np.median(np.diff(np.log(wave))))


def segments(wave) -> list[slice]:
    """Contiguous pieces of the grid: split where the ``ln lambda`` step exceeds 1.5x the
    median (the detector gaps), as :func:`pipeline.spectra.synthetic.error_pattern` does."""
    wave = synthetic._check_wave(wave)
    step = np.diff(np.log(wave))
    edges = np.concatenate([[0], np.flatnonzero(step > 1.5 * np.median(step)) + 1, [wave.size]])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def velocity_to_pixels(velocity_kms: float, wave) -> float:
    """Pixels of a log-linear grid spanned by a Doppler factor ``1 + v/c``:
    ``ln(1 + v/c) / d ln(lambda)``."""
    return float(np.log1p(velocity_kms / C_KMS) / _ln_step(np.asarray(wave, np.float64)))


# -------------------------------------------------------------- transforms of the flux
def doppler_shift(flux, wave, velocity_kms: float) -> np.ndarray:
    """The spectra seen from a source receding at ``velocity_kms`` (redshift for v > 0).

    ``f_obs(lambda) = f_rest(lambda / (1 + v/c))``: each pixel takes the rest flux at
    ``ln lambda - ln(1 + v/c)``, linearly interpolated in ``ln lambda`` within its chip; a
    position beyond a chip edge takes the edge value. One weight vector for all stars.

    Args:
        flux: (N, P) or (P,) normalized flux on ``wave``.
        wave: (P,) strictly increasing grid (Angstrom).
    """
    flux = np.asarray(flux)
    wave = synthetic._check_wave(wave)
    out = np.empty_like(flux)
    shift = np.log1p(velocity_kms / C_KMS)
    for seg in segments(wave):
        x = np.log(wave[seg])
        target = np.clip(x - shift, x[0], x[-1])
        right = np.clip(np.searchsorted(x, target, side="right"), 1, x.size - 1)
        weight = (target - x[right - 1]) / (x[right] - x[right - 1])
        piece = flux[..., seg]
        out[..., seg] = piece[..., right - 1] * (1.0 - weight) + piece[..., right] * weight
    return out


def broaden_lsf(flux, wave, sigma_kms: float) -> np.ndarray:
    """Convolve with a Gaussian line-spread function of ``sigma_kms`` (km/s), per chip.

    On a log-linear grid a constant velocity width is a constant width in pixels,
    ``sigma_kms / (c d ln lambda)``. The kernel has unit sum, so the equivalent width
    ``sum(1 - flux)`` of a line away from the chip edges is conserved; the edges are
    extended with their end value (``mode='nearest'``).
    """
    flux = np.asarray(flux)
    wave = synthetic._check_wave(wave)
    if sigma_kms < 0:
        raise ConfigError(f"broaden_lsf: sigma_kms must be >= 0, got {sigma_kms}")
    sigma_pix = sigma_kms / (C_KMS * _ln_step(wave))
    out = np.array(flux, copy=True)
    if sigma_pix == 0:
        return out
    for seg in segments(wave):
        out[..., seg] = gaussian_filter1d(flux[..., seg], sigma_pix, axis=-1, mode="nearest",
                                          truncate=5.0)
    return out


def continuum_factor(wave, scale: float = 1.0, tilt: float = 0.0) -> np.ndarray:
    """``scale * (1 + tilt * x)`` with ``x`` = ``ln lambda`` mapped linearly onto [-1, 1]
    over the grid: a normalization error of ``scale`` at the centre and ``scale (1 +- tilt)``
    at the blue and red ends. Shape (P,)."""
    lnw = np.log(synthetic._check_wave(wave))
    x = 2.0 * (lnw - lnw[0]) / (lnw[-1] - lnw[0]) - 1.0
    return scale * (1.0 + tilt * x)


def scale_continuum(spectra: Spectra, scale: float = 1.0, tilt: float = 0.0) -> Spectra:
    """A continuum misnormalized by :func:`continuum_factor`: flux and flux errors are both
    divided by the wrong continuum, so both are multiplied by the factor."""
    factor = continuum_factor(spectra.wave, scale, tilt).astype(spectra.flux.dtype)
    return replace(spectra, flux=spectra.flux * factor, flux_err=spectra.flux_err * factor)


def add_spikes(spectra: Spectra, count: int, rng: np.random.Generator,
               amplitude: tuple[float, float] = (0.5, 2.0)) -> Spectra:
    """Cosmic rays that escaped masking: ``count`` distinct pixels per star (drawn uniformly)
    get ``+U(amplitude)`` in flux while their errors stay as they were (unflagged)."""
    n, p = spectra.flux.shape
    if not 0 <= count <= p:
        raise ConfigError(f"add_spikes: count must be in [0, {p}], got {count}")
    cols = np.argpartition(rng.random((n, p)), count, axis=1)[:, :count] if count else \
        np.empty((n, 0), int)
    flux = spectra.flux.copy()
    flux[np.arange(n)[:, None], cols] += rng.uniform(*amplitude, cols.shape).astype(flux.dtype)
    return replace(spectra, flux=flux)


def add_emission_lines(flux, wave, centres, amplitude: float, sigma_kms: float) -> np.ndarray:
    """Add Gaussian emission lines ``amplitude exp(-dv**2 / (2 sigma**2))`` above the given
    flux at vacuum wavelengths ``centres`` (Angstrom), ``dv = c ln(lambda / centre)``. A
    line's equivalent width in pixels is ``amplitude sigma_pix sqrt(2 pi)``."""
    wave = synthetic._check_wave(wave)
    dv = C_KMS * np.log(wave[None, :] / np.asarray(centres, np.float64)[:, None])
    profile = amplitude * np.exp(-0.5 * (dv / sigma_kms) ** 2).sum(axis=0)
    return np.asarray(flux) + profile.astype(np.asarray(flux).dtype)


# ----------------------------------------------------------- the generator's noise, kept
def renoise(spectra: Spectra, model: np.ndarray, new_model: np.ndarray) -> Spectra:
    """``spectra`` (generated from the noiseless ``model``) with ``new_model`` in its place and
    the same noise draw: noise and errors times ``sqrt(new_model / model)`` (the generator's
    errors are ``pattern sqrt(model) / SNR``). Bad pixels keep error 0, and so do pixels of
    saturated lines whose model underflowed to 0 (the generator gave them error 0: nothing
    to scale)."""
    if np.any(new_model < 0):
        raise ConfigError("renoise: the transformed model flux must be >= 0 everywhere")
    model = np.asarray(model, np.float64)
    ratio = np.sqrt(np.divide(new_model, model, out=np.ones_like(model), where=model > 0))
    ratio = ratio.astype(np.float32)
    flux = new_model + (spectra.flux - model) * ratio
    return replace(spectra, flux=flux.astype(np.float32), flux_err=spectra.flux_err * ratio)


@contextlib.contextmanager
def forest_seed(seed: int):
    """Generate with another random Fe I / OH / CN line forest (``linelist.FOREST_SEED``).

    The line list is part of the generator's definition and fixed by design; a different
    forest is exactly "a star the model has not seen". The module constant is swapped and the
    caches of the line list and the profile basis are cleared on entry and exit, so nothing
    of the other forest outlives the block."""
    old = linelist.FOREST_SEED
    try:
        linelist.FOREST_SEED = seed
        linelist.line_list.cache_clear()
        synthetic._BASIS_CACHE.clear()
        yield
    finally:
        linelist.FOREST_SEED = old
        linelist.line_list.cache_clear()
        synthetic._BASIS_CACHE.clear()


# ------------------------------------------------------------------------------ suite
@dataclass(frozen=True)
class Shift:
    """One shift of the suite: ``make(n, seed, cfg, wave) -> Spectra`` with true labels, and
    for a shift of the spectrum itself (not of its noise or artefacts) ``noiseless(model,
    labels, wave)``, the shifted noiseless spectrum (what an oracle fit compares with)."""

    name: str
    description: str
    make: Callable[[int, int, dict | None, np.ndarray], Spectra]
    noiseless: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None


def _base(n, seed, cfg, wave, labels=None, snr=None, name="shift"):
    """In-distribution stars (labels, SNR from the config) and their noiseless model."""
    rng = np.random.default_rng([seed, 0])
    data = synthetic.synthetic_config(cfg)
    labels = synthetic.sample_labels(n, rng, data) if labels is None else labels
    snr = synthetic.sample_snr(n, rng, data) if snr is None else snr
    spectra = synthetic.generate(n, [seed, 1], data, wave, f"SHIFT-{name.upper()}", labels, snr)
    return spectra, synthetic.synthesize(labels, wave)


def _on_model(transform, name):
    """A shift applied to the noiseless model, the generator's noise carried over."""
    def make(n, seed, cfg, wave):
        spectra, model = _base(n, seed, cfg, wave, name=name)
        return renoise(spectra, model, transform(model, spectra.label_array(), wave))
    return make


def _on_observed(transform, name):
    def make(n, seed, cfg, wave):
        spectra, _ = _base(n, seed, cfg, wave, name=name)
        return transform(spectra, np.random.default_rng([seed, 2]))
    return make


def _hot(n, seed, cfg, wave, width=800.0):
    """Teff uniform over ``width`` K above the training maximum; dwarf log g, disc [Fe/H]."""
    syn = synthetic.synthetic_config(cfg)["synthetic"]
    rng = np.random.default_rng([seed, 3])
    t_hi = syn["teff_range"][1]
    labels = np.column_stack([rng.uniform(t_hi, t_hi + width, n), rng.uniform(3.9, 4.3, n),
                              rng.normal(-0.15, 0.3, n).clip(*syn["feh_range"])])
    return _base(n, seed, cfg, wave, labels=labels, name="hot")[0]


def _low_snr(n, seed, cfg, wave, snr=12.0):
    return _base(n, seed, cfg, wave, snr=np.full(n, snr), name="lowsnr")[0]


def _other_forest(n, seed, cfg, wave, forest=linelist.FOREST_SEED + 1):
    with forest_seed(forest):
        return _base(n, seed, cfg, wave, name="forest")[0]


RV_KMS = 5.0
LSF_SIGMA_KMS = 6.0
BRACKETT_EMISSION = (linelist.BRACKETT[11], linelist.BRACKETT[12], linelist.BRACKETT[13])


LINES_SCALE = 1.25
"""Every line's optical depth times this in the suite's line-strength shift."""


def _stronger_lines(model, labels, wave):
    return model ** np.float32(LINES_SCALE)


def _radial_velocity(model, labels, wave):
    return synthetic.synthesize(labels, wave / (1.0 + RV_KMS / C_KMS), model.dtype)


def _broader_lsf(model, labels, wave):
    return broaden_lsf(model, wave, LSF_SIGMA_KMS)


SHIFTS: dict[str, Shift] = {s.name: s for s in (
    Shift(f"lines_x{LINES_SCALE:g}",
          f"line opacity x{LINES_SCALE:g} (flux -> flux**{LINES_SCALE:g})",
          _on_model(_stronger_lines, "lines"), _stronger_lines),
    Shift("continuum_x0.97", "continuum misnormalized by x0.97",
          _on_observed(lambda s, rng: scale_continuum(s, 0.97), "cont"),
          lambda m, lab, w: m * continuum_factor(w, 0.97)),
    Shift("continuum_tilt", "continuum tilted by +-3% from blue to red end",
          _on_observed(lambda s, rng: scale_continuum(s, 1.0, 0.03), "tilt"),
          lambda m, lab, w: m * continuum_factor(w, 1.0, 0.03)),
    Shift("snr_12", "SNR 12 (below the training range)", _low_snr),
    Shift("teff_hot", "Teff 800 K above the training maximum", _hot),
    Shift("rv_5kms", f"radial velocity {RV_KMS:g} km/s not removed",
          _on_model(_radial_velocity, "rv"), _radial_velocity),
    Shift("lsf_broad", f"line-spread function broadened by a {LSF_SIGMA_KMS:g} km/s Gaussian",
          _on_model(_broader_lsf, "lsf"), _broader_lsf),
    Shift("spikes", "20 unmasked cosmic-ray spikes per star",
          _on_observed(lambda s, rng: add_spikes(s, 20, rng), "spikes")),
    Shift("emission", "Brackett 11-13 in emission (amplitude 0.3, sigma 15 km/s)",
          _on_model(lambda m, lab, w: add_emission_lines(m, w, BRACKETT_EMISSION, 0.3, 15.0),
                    "emission")),
    Shift("forest_seed", "another random Fe I / OH / CN line forest", _other_forest),
)}


def reference_spectra(n: int, seed: int, cfg: dict | None = None, wave=None) -> Spectra:
    """``n`` in-distribution spectra drawn like the shifted ones (same seeds, no shift): the
    reference row of the suite."""
    return _base(n, seed, cfg, synthetic._check_wave(wave), name="ref")[0]


def shifted_spectra(name: str, n: int, seed: int, cfg: dict | None = None,
                    wave=None) -> Spectra:
    """``n`` spectra of shift ``name`` (:data:`SHIFTS`) with their true labels and SNR."""
    if name not in SHIFTS:
        raise ConfigError(f"unknown shift '{name}'; choose one of {', '.join(SHIFTS)}")
    return SHIFTS[name].make(n, seed, cfg, synthetic._check_wave(wave))
