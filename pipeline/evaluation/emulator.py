"""A label -> flux emulator (piecewise Cannon-style) and the chi^2 of a spectrum against it.

Model, per label-space region k and pixel p (N stars, T polynomial terms)::

    z = (y - mean) / scale                     labels standardized on the training split
    f_np = phi(z_n) . c_kp + e_np,   e_np ~ N(0, sigma_np^2 + s_kp^2)

``phi(z)`` holds every monomial of the three standardized labels up to ``order`` (order 2:
1, z_i, z_i z_j, T = 10). One quadratic over the whole label space (3500-7000 K, dwarfs and
giants, [Fe/H] -2.5..0.5) misfits by more than the noise where molecules or hydrogen lines
switch on, and its chi^2 then has a heavy tail in distribution; so the training stars are
split into ``regions`` by k-means in z (``scipy.cluster.vq.kmeans2``) and each region gets its
own polynomial, a star the region of the nearest centre. In region k the coefficients minimize

    sum_n w_np (f_np - phi_n . c_kp)^2 / n_kp + ridge |c_kp|^2,   n_kp = sum_n w_np

(``w_np`` = 1 on good pixels of the region's stars, 0 elsewhere): ``c_kp = A_kp^{-1} b_kp``
with ``A_kp = Phi^T W_kp Phi / n_kp + ridge I``, ``b_kp = Phi^T W_kp f_p / n_kp``. All P
normal matrices of a region come from one matrix product ``W_k^T (Phi_i Phi_j)`` and one
batched ``numpy.linalg.solve``. The intrinsic scatter is the moment estimate

    s_kp^2 = max(0, sum_n w_np (r_np^2 - sigma_np^2) / (n_kp - T)) + floor^2

which absorbs astrophysical scatter and the emulator's misfit; the floor (``FLOOR`` = 1e-3 in
normalized flux) keeps saturated line cores, whose flux and flux error are both near 0, from
dominating. A star's statistic is the chi^2 per good pixel at labels y (its predicted labels)::

    chi2 = sum_p g_p (f_p - phi(z) . c_kp)^2 / (sigma_p^2 + s_kp^2) / sum_p g_p

about 1 for a spectrum the emulator describes; a spectrum no labels reproduce (other line
strengths, another continuum) gives more. Pixels of a region with fewer than ``2 T`` good
training stars are left out (``usable``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations_with_replacement

import numpy as np

from pipeline.exceptions import DataError

FLOOR = 1e-3
"""Floor of the intrinsic scatter s_kp (normalized flux)."""


def monomials(n_labels: int, order: int) -> list[tuple[int, ...]]:
    """Label-index tuples of the terms of :func:`design`: (), (0,), ..., (0, 0), (0, 1), ..."""
    return [c for k in range(order + 1)
            for c in combinations_with_replacement(range(n_labels), k)]


def design(z: np.ndarray, order: int) -> np.ndarray:
    """phi(z) (N, T) float64: every monomial of the columns of ``z`` (N, K) up to ``order``."""
    z = np.asarray(z, np.float64)
    return np.column_stack([np.prod(z[:, list(c)], axis=1) if c else np.ones(len(z))
                            for c in monomials(z.shape[1], order)])


def spectrum_snr(flux: np.ndarray, flux_err: np.ndarray, good: np.ndarray,
                 batch_size: int = 1024) -> np.ndarray:
    """(N,) median over good pixels of flux / flux_err (NaN for a star with none).

    Measured from the spectrum itself, so that stars without an SNR column (real inputs) are
    compared with validation stars on the same footing. Streams ``batch_size`` stars.
    """
    out = np.full(len(flux), np.nan)
    for s in range(0, len(flux), batch_size):
        sl = slice(s, s + batch_size)
        g = np.asarray(good[sl], bool)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(g, np.asarray(flux[sl], np.float64) / flux_err[sl], np.nan)
        out[sl] = row_nanmedian(ratio, g.sum(axis=1))
    return out


def row_nanmedian(values: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Median of the non-NaN entries of each row of ``values`` (B, P), ``count`` (B,) of them
    per row (NaN where 0): ``numpy.nanmedian(values, axis=1)`` without its per-row Python loop
    (it falls back to one for rows longer than 600). One sort puts the NaNs last; the median
    is the mean of the elements (c - 1) // 2 and c // 2 of the c sorted values."""
    ordered = np.sort(values, axis=1)
    rows = np.arange(len(values))
    lo, hi = np.maximum(count - 1, 0) // 2, np.maximum(count, 1) // 2
    with np.errstate(invalid="ignore"):
        median = (ordered[rows, lo] + ordered[rows, hi]) / 2
    return np.where(count > 0, median, np.nan)


def ridge_solve(phi: np.ndarray, w: np.ndarray, target: np.ndarray,
                ridge: float) -> np.ndarray:
    """(T, P) per-pixel weighted ridge solutions of ``target`` (N, P) on ``phi`` (N, T).

    Pixel p: argmin_c sum_n w_np (target_np - phi_n . c)^2 / n_p + ridge |c|^2; the P normal
    matrices come from one product ``w^T (phi_i phi_j)`` and one batched solve.
    """
    n_terms = phi.shape[1]
    norm = np.maximum(w.sum(axis=0), 1.0)
    gram = (phi[:, :, None] * phi[:, None, :]).reshape(len(phi), -1)  # (N, T*T)
    a = (w.T @ gram).reshape(-1, n_terms, n_terms) / norm[:, None, None]
    a += ridge * np.eye(n_terms)
    b = ((w * target).T @ phi) / norm[:, None]  # (P, T)
    return np.linalg.solve(a, b[:, :, None])[:, :, 0].T


def _regions(z: np.ndarray, n_regions: int, min_stars: int, seed: int) -> np.ndarray:
    """(K, 3) k-means centres of ``z``; regions with fewer than ``min_stars`` stars dropped."""
    from scipy.cluster.vq import kmeans2

    n_regions = int(max(1, min(n_regions, len(z) // min_stars)))
    centres, _ = kmeans2(z, n_regions, seed=np.random.default_rng(seed), minit="++")
    for _ in range(n_regions):  # drop the smallest region until every one is big enough
        counts = np.bincount(nearest(z, centres), minlength=len(centres))
        if counts.min() >= min_stars or len(centres) == 1:
            break
        centres = np.delete(centres, np.argmin(counts), axis=0)
    return centres


def nearest(z: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(N,) index of the centre nearest each row of ``z`` (N, K)."""
    return np.argmin(((z[:, None, :] - centres[None]) ** 2).sum(axis=-1), axis=1)


@dataclass
class LabelEmulator:
    """Fitted emulator: label standardization, region centres (K, L) in standardized labels,
    coefficients (K, T, P), scatter s_kp (K, P), usable pixels (K, P)."""

    label_mean: np.ndarray
    label_scale: np.ndarray
    order: int
    centres: np.ndarray
    coef: np.ndarray
    scatter: np.ndarray
    usable: np.ndarray

    @classmethod
    def fit(cls, labels: np.ndarray, flux: np.ndarray, flux_err: np.ndarray,
            good: np.ndarray, order: int = 2, ridge: float = 1e-6, regions: int = 1,
            seed: int = 0) -> LabelEmulator:
        """Fit to training stars: labels (N, L), flux/flux_err/good (N, P)."""
        labels = np.asarray(labels, np.float64)
        if not np.all(np.isfinite(labels)):
            raise DataError("emulator: the training labels must be finite (rows "
                            f"{np.flatnonzero(~np.isfinite(labels).all(axis=1))[:5].tolist()}"
                            " are not); drop those stars or set data.nan_labels: drop")
        mean, scale = labels.mean(axis=0), labels.std(axis=0)
        if np.any(scale <= 0):
            raise DataError("emulator: a training label has zero variance; the emulator "
                            "needs training stars that span every label")
        z = (labels - mean) / scale
        n_terms = len(monomials(z.shape[1], order))
        if len(z) < 4 * n_terms:
            raise DataError(f"emulator: {len(z)} training stars cannot fit {n_terms} terms "
                            f"per pixel; use at least {4 * n_terms} or a lower emulator.order")
        centres = _regions(z, regions, 4 * n_terms, seed)
        region = nearest(z, centres)
        phi = design(z, order)
        good = np.asarray(good, bool)
        coef, scatter, usable = [], [], []
        for k in range(len(centres)):  # a few regions; every pixel of one is one solve
            rows = region == k
            w = good[rows].astype(np.float64)
            f = np.where(good[rows], np.asarray(flux[rows], np.float64), 0.0)
            c = ridge_solve(phi[rows], w, f, ridge)
            resid = np.where(good[rows], f - phi[rows] @ c, 0.0)
            err2 = np.where(good[rows], np.asarray(flux_err[rows], np.float64) ** 2, 0.0)
            n_p = w.sum(axis=0)
            excess = (resid**2 - err2).sum(axis=0) / np.maximum(n_p - n_terms, 1.0)
            coef.append(c)
            scatter.append(np.sqrt(np.maximum(excess, 0.0) + FLOOR**2))
            usable.append(n_p >= 2 * n_terms)
        return cls(mean, scale, int(order), centres, np.stack(coef), np.stack(scatter),
                   np.stack(usable))

    def standardize(self, labels: np.ndarray) -> np.ndarray:
        return (np.asarray(labels, np.float64) - self.label_mean) / self.label_scale

    def region(self, labels: np.ndarray) -> np.ndarray:
        """(N,) region of each star (nearest centre; region 0 for non-finite labels)."""
        z = np.nan_to_num(self.standardize(labels), nan=0.0, posinf=0.0, neginf=0.0)
        return nearest(z, self.centres)

    def flux(self, labels: np.ndarray) -> np.ndarray:
        """Emulated spectra (N, P) float64 at ``labels`` (N, L) in physical units."""
        phi, region = design(self.standardize(labels), self.order), self.region(labels)
        return np.einsum("nt,ntp->np", phi, self.coef[region])

    def chi2(self, flux: np.ndarray, flux_err: np.ndarray, good: np.ndarray,
             labels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N,) chi^2 per good pixel of each spectrum against the emulator at ``labels``.

        NaN where a star has no good usable pixel or its labels are not finite. The stars of
        a batch are grouped by region: each group is one matrix product with its region's
        coefficients and its scatter and usable pixels broadcast, instead of gathering a
        (T, P) coefficient block per star.
        """
        out = np.empty(len(flux))
        for s in range(0, len(flux), batch_size):
            lab = np.asarray(labels[s:s + batch_size])
            region = self.region(lab)
            phi = design(self.standardize(lab), self.order)
            for k in np.unique(region):  # a few regions
                local = np.flatnonzero(region == k)
                rows = local + s
                g = np.asarray(good[rows], bool) & self.usable[k]
                var = np.asarray(flux_err[rows], np.float64) ** 2 + self.scatter[k] ** 2
                with np.errstate(invalid="ignore", divide="ignore"):
                    r2 = (np.asarray(flux[rows], np.float64) - phi[local] @ self.coef[k]) ** 2
                    out[rows] = np.where(g, r2 / var, 0.0).sum(axis=1) / g.sum(axis=1)
        return out


@dataclass
class SnrTrend:
    """Median of a statistic against log SNR: equal-count bins, linear between their
    medians, constant beyond the outermost ones."""

    log_snr: np.ndarray
    median: np.ndarray

    @classmethod
    def fit(cls, snr: np.ndarray, value: np.ndarray, n_bins: int,
            min_per_bin: int = 50) -> SnrTrend:
        ok = np.isfinite(snr) & (snr > 0) & np.isfinite(value)
        if not ok.any():
            raise DataError("emulator: no validation star has a finite SNR and chi^2; check "
                            "the validation spectra's flux errors")
        x, v = np.log(snr[ok]), value[ok]
        n_bins = int(np.clip(ok.sum() // min_per_bin, 1, n_bins))
        order = np.argsort(x)
        bins = np.array_split(order, n_bins)
        return cls(np.array([np.median(x[b]) for b in bins]),
                   np.array([np.median(v[b]) for b in bins]))

    def __call__(self, snr: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.interp(np.log(snr), self.log_snr, self.median)
