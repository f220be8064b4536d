"""How the network really responds to flux noise: a calibrated factor on the delta-method term.

The flux-noise term of the error budget is the first-order propagation
``C = D diag(e^2) D^T`` (``error_budget.noise_covariance``), exact for a model linear in the
flux. A ReLU network is only piecewise linear: noise of a low-SNR spectrum moves the input
across many kinks of the units, and the labels then move less than the local Jacobian D says
(the network averages over its linear pieces), so the delta method overstates the noise term,
most where it dominates: noise-dominated error bars come out too large (docs/laplace.md has the
measured ratios of the default model).

The response is measured without labels on validation spectra x with errors e: for each
amplitude a (config ``laplace.noise_response.amplitudes``) and ``draws`` noise realizations
eps ~ N(0, I) the network predicts x + a e eps, and per star the sample variance v_nk of label
k over the draws is compared with the delta method at that amplitude, a^2 C_nkk. The ratio is
a function of the noise level relative to the spectrum, i.e. of the effective SNR snr_n / a
(a = 2 and 4 reach SNR 7-15 from validation stars at 30-60): with the pairs (star, amplitude)
in equal-count bins of log effective SNR,

    r_k(bin) = mean_bin v_nk / (a^2 C_nkk)

the mean of the per-star ratios (each unbiased; a ratio of sums would be dominated by the few
stars with the largest noise variance in a bin). A star of SNR s
then gets the noise covariance ``F C F`` with F = diag(sqrt(r_k(s))), r interpolated linearly
in log SNR between bin medians and constant beyond (:class:`NoiseResponse`). For a network
linear in the flux r = 1 up to the Monte-Carlo error; the correlation structure of C is kept.
Bad pixels (error 0) get no noise, as in the delta method.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.exceptions import DataError
from pipeline.spectra.validation import spectrum_snr
from pipeline.streaming import batches

FIELDS = ("log_snr", "ratio")


@dataclass
class NoiseResponse:
    """Ratio (B, K) of the Monte-Carlo to the delta-method noise variance of each label at the
    bin medians ``log_snr`` (B,) of log effective SNR."""

    log_snr: np.ndarray
    ratio: np.ndarray

    def __call__(self, snr: np.ndarray) -> np.ndarray:
        """(N, K) ratio at each star's SNR (N,); 1 where the SNR is not finite."""
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.log(np.asarray(snr, np.float64))
        out = np.column_stack([np.interp(x, self.log_snr, r) for r in self.ratio.T])
        return np.where(np.isfinite(x)[:, None], out, 1.0)

    def scale(self, noise_cov: np.ndarray, snr: np.ndarray) -> np.ndarray:
        """``F C F`` (N, K, K), F = diag(sqrt(ratio(snr))), of delta-method covariances C."""
        f = np.sqrt(self(snr))
        return noise_cov * f[:, :, None] * f[:, None, :]

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in FIELDS}

    @classmethod
    def from_dict(cls, doc: dict) -> NoiseResponse:
        return cls(*(np.asarray(doc[k], np.float64) for k in FIELDS))


def star_snr(flux: np.ndarray, flux_err: np.ndarray) -> np.ndarray:
    """(N,) median flux / flux_err over the pixels that carry noise (flux_err > 0)."""
    return spectrum_snr(flux, flux_err, np.asarray(flux_err) > 0)


def monte_carlo_variance(predict, flux: np.ndarray, flux_err: np.ndarray, amplitude: float,
                         draws: int, rng: np.random.Generator) -> np.ndarray:
    """(N, K) sample variance (ddof 1) of ``predict`` (B, P) -> (B, K) over ``draws`` spectra
    ``flux + amplitude flux_err eps``, all draws of all stars in one call."""
    flux = np.asarray(flux, np.float32)
    noise = rng.standard_normal((draws,) + flux.shape, dtype=np.float32)
    noisy = flux[None] + np.float32(amplitude) * np.asarray(flux_err, np.float32)[None] * noise
    out = np.asarray(predict(noisy.reshape(-1, flux.shape[1])), np.float64)
    return out.reshape(draws, len(flux), -1).var(axis=0, ddof=1)


def fit_noise_response(predict, flux: np.ndarray, flux_err: np.ndarray, noise_cov: np.ndarray,
                       amplitudes=(1.0, 2.0, 4.0), draws: int = 16, n_bins: int = 8,
                       seed: int = 0, batch_size: int = 64) -> NoiseResponse:
    """The response (module docstring) of ``predict`` (B, P) -> (B, K) labels, measured on
    spectra ``flux``/``flux_err`` (N, P; error 0 on bad pixels) whose delta-method noise
    covariances (same units as ``predict``) are ``noise_cov`` (N, K, K). Streams
    ``batch_size`` stars (``draws`` x ``batch_size`` spectra per call)."""
    if draws < 2:
        raise DataError(f"noise response: draws = {draws}; the sample variance needs at least 2")
    linear = np.diagonal(np.asarray(noise_cov, np.float64), axis1=1, axis2=2)
    snr = star_snr(flux, flux_err)
    rng = np.random.default_rng(seed)
    log_snr, mc, lin = [], [], []
    for a in amplitudes:
        for s in batches(len(flux), batch_size):
            mc.append(monte_carlo_variance(predict, flux[s], flux_err[s], a, draws, rng))
        lin.append(a**2 * linear)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_snr.append(np.log(snr / a))
    log_snr, mc, lin = np.concatenate(log_snr), np.concatenate(mc), np.concatenate(lin)
    ok = np.isfinite(log_snr) & np.all(lin > 0, axis=1)
    if ok.sum() < n_bins:
        raise DataError(f"noise response: only {ok.sum()} (star, amplitude) pairs have a "
                        "finite SNR and flux noise; check the validation flux errors")
    order = np.flatnonzero(ok)[np.argsort(log_snr[ok])]
    bins = np.array_split(order, n_bins)
    return NoiseResponse(np.array([np.median(log_snr[b]) for b in bins]),
                         np.array([np.mean(mc[b] / lin[b], axis=0) for b in bins]))
