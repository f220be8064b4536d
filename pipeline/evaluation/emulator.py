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

``c_kp = A_kp^{-1} b_kp`` with ``A_kp = Phi^T W_kp Phi / n_kp + ridge I``,
``b_kp = Phi^T W_kp f_p / n_kp``. All P normal matrices of a region come from one matrix
product ``W_k^T (Phi_i Phi_j)`` and one batched ``numpy.linalg.solve``. The intrinsic scatter
is the moment estimate over the m_kp good pixels g_np of the region's stars

    s_kp^2 = max(0, sum_n g_np (r_np^2 - sigma_np^2) / (m_kp - T)) + floor^2

which absorbs astrophysical scatter and the emulator's misfit; the floor (``FLOOR`` = 1e-3 in
normalized flux) keeps saturated line cores, whose flux and flux error are both near 0, from
dominating. The weights (``weighting``) are ``w_np = g_np`` (``uniform``) or The Cannon's,
``w_np = g_np / (sigma_np^2 + s_kp^2)`` with s_kp from a first, uniform fit
(``inverse_variance``, the pipeline's default). Uniform weights let the noisiest training stars
set the coefficients' noise, E[sigma^2] E[1 / sigma^2] times the variance of the
inverse-variance fit (4.6 for SNR drawn log-uniformly in 30-300), and it counts against every
high-SNR spectrum the emulator is compared with (the gain in the shift flags:
docs/outputs.md, *Shift flags*). The chi^2 per good pixel of a spectrum at labels y (region k
that of y)::

    chi2(y) = sum_p g_p (f_p - phi(z) . c_kp)^2 / (sigma_p^2 + s_kp^2) / sum_p g_p

is about 1 for a spectrum the emulator describes at the right labels. Pixels of a region with
fewer than ``2 T`` good training stars are left out (``usable``).

With ``space`` 'depth' (the pipeline's default) the polynomials emulate the log optical depth::

    s_np = phi(z_n) . c_kp,   m_np = exp(-exp(s_np))

the same least squares in flux (weights, scatter, ridge on every coefficient but the
constant), solved by Gauss-Newton from a weighted fit of ln(-ln f) (:func:`_depth_fit`), and
the best-fit labels by Levenberg-Marquardt steps on explicit label gradients. Where lines are
weak (metal-poor and hot stars) an optical depth is a product of the abundance and
Boltzmann-Saha factors, so its logarithm is nearly a low-order polynomial of the labels while
the flux, and a change of every optical depth by a common factor, are not; the emulator is then
precise enough along m ln m for the line-strength statistic to see smaller changes. No depth
gives a flux above 1: an absorption-only model.

The shift statistic is chi2 at the emulator's *best-fit* labels (:meth:`LabelEmulator.best_fit`):
a few batched Levenberg-Marquardt steps on the three labels from the network's prediction,
within a margin of the training label box. At the network's labels the statistic would also
carry the network's own errors (a 60 K error misfits a high-SNR spectrum by far more than its
noise), which widen the validation tail and hence the threshold; at the best fit only a
spectrum that no labels of the box reproduce (another continuum, another line forest, a star
outside the grid) keeps a large chi^2. Shifts degenerate with the labels (line strengths x s
look like a higher [Fe/H]) are absorbed by the fit and not caught by this statistic.

The broadband statistic is the same chi^2 at the best fit with the residuals first summed over
windows of W adjacent pixels (:func:`pixel_chi2` with ``width`` W): per window the weighted
residual sum in units of its standard deviation, squared, averaged over windows. Independent
noise gives about 1 either way, but a misfit that keeps its sign over many pixels (a continuum
normalized a few per cent off, a tilt) grows W times faster in it than in the chi^2 per
pixel, where the lines' own misfit and the noise of every pixel dilute it. The peak statistic
takes the largest window chi^2 over narrow windows instead of the mean: a few emission lines
fill a handful of windows, which a mean over all pixels or windows hides. The Doppler and
line-spread statistics project the residuals onto the first and second derivatives of the
emulated spectrum (:func:`template_chi2`): lines shifted or broadened by a fraction of a pixel
misfit each line a little, with a sign pattern that these templates sum over all lines. The
line-strength statistic projects them onto m ln m (every optical depth scaled alike) less what
a change of the labels explains (:func:`strength_chi2`), less the emulator's own misfit along
that template at the star's labels (a local line through the amplitudes of the training stars
nearest them) and in units of the noise plus the misfit's scatter about that line
(:class:`StrengthMisfit`, :func:`pipeline.evaluation.shift.training_strength_misfit`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, lru_cache
from itertools import combinations_with_replacement

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.exceptions import DataError

FLOOR = 1e-3
"""Floor of the intrinsic scatter s_kp (normalized flux)."""
WEIGHTINGS = ("uniform", "inverse_variance")
"""Weights w_np of the emulator fit (module docstring)."""
SPACES = ("flux", "depth")
"""What the polynomials emulate (module docstring): the flux, or the log optical depth."""
DEPTH_MIN = 1e-4
"""Optical-depth floor of the log-depth emulator's starting fit of ln(-ln f)."""
DEPTH_STEPS = 6
"""Gauss-Newton steps in flux of the log-depth emulator fit."""
STEP_TOLERANCE = 1e-4
"""Training standard deviations: a star whose proposed Levenberg-Marquardt step of the
log-depth best fit is smaller in every label has converged and takes no further steps."""


def monomials(n_labels: int, order: int) -> list[tuple[int, ...]]:
    """Label-index tuples of the terms of :func:`design`: (), (0,), ..., (0, 0), (0, 1), ..."""
    return [c for k in range(order + 1)
            for c in combinations_with_replacement(range(n_labels), k)]


@lru_cache
def _monomial_index(n_labels: int, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gathers of :func:`design` and :func:`design_gradient` from the columns (1, z_0, ...,
    z_{K-1}): the (T, order) column of each factor of each monomial (the 1 where it has fewer
    factors), the (T, K, order - 1) factors left of it by d / dz_l and the multiplicity
    (T, K) of z_l in it (0: not there)."""
    terms = monomials(n_labels, order)
    factors = np.zeros((len(terms), order), int)
    rest = np.zeros((len(terms), n_labels, max(order - 1, 0)), int)
    multiplicity = np.zeros((len(terms), n_labels))
    for t, c in enumerate(terms):
        factors[t, :len(c)] = np.add(c, 1)
        for label in set(c):
            left = list(c)
            left.remove(label)
            rest[t, label, :len(left)] = np.add(left, 1)
            multiplicity[t, label] = c.count(label)
    return factors, rest, multiplicity


def _with_ones(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    return np.concatenate([np.ones((len(z), 1)), z], axis=1)


def design(z: np.ndarray, order: int) -> np.ndarray:
    """phi(z) (N, T) float64: every monomial of the columns of ``z`` (N, K) up to ``order``,
    each the product of its factors in the order of :func:`monomials` (ones past the last)."""
    factors, _, _ = _monomial_index(z.shape[1], order)
    return np.prod(_with_ones(z)[:, factors], axis=2)


def design_gradient(z: np.ndarray, order: int) -> np.ndarray:
    """d phi_t / d z_l (N, T, L) float64 of :func:`design`: for the monomial prod_{i in c} z_i,
    ``m_l prod_{i in c minus one l} z_i`` with ``m_l`` the multiplicity of ``l`` in ``c``.
    Both by gathers of the columns (1, z): a few array operations for all terms, not a
    Python loop over them (these run at every step of the emulator fit)."""
    _, rest, multiplicity = _monomial_index(z.shape[1], order)
    return multiplicity * np.prod(_with_ones(z)[:, rest], axis=3)


def ridge_solve(phi: np.ndarray, w: np.ndarray, target: np.ndarray,
                ridge: float) -> np.ndarray:
    """(T, P) per-pixel weighted ridge solutions of ``target`` (N, P) on ``phi`` (N, T).

    Pixel p: argmin_c sum_n w_np (target_np - phi_n . c)^2 / n_p + ridge |c|^2; the P normal
    matrices come from one product ``w^T (phi_i phi_j)`` and one batched solve.
    """
    a, b = _normal_equations(phi, w, target)
    norm = np.maximum(w.sum(axis=0), 1.0)
    a = a / norm[:, None, None] + ridge * np.eye(phi.shape[1])
    return np.linalg.solve(a, (b / norm[:, None])[:, :, None])[:, :, 0].T


def _normal_equations(phi: np.ndarray, w: np.ndarray,
                      target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel weighted normal equations of ``target`` (N, P) on ``phi`` (N, T):
    Phi^T W_p Phi (P, T, T) from one product ``w^T (phi_i phi_j)``, and Phi^T W_p t_p (P, T)."""
    n_terms = phi.shape[1]
    gram = (phi[:, :, None] * phi[:, None, :]).reshape(len(phi), -1)  # (N, T*T)
    return (w.T @ gram).reshape(-1, n_terms, n_terms), (w * target).T @ phi


def _region_fit(phi: np.ndarray, good: np.ndarray, w: np.ndarray, flux: np.ndarray,
                err2: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (T, P) of one region's stars, fitted with weights ``w`` (N, P; 0 off the
    ``good`` pixels) by :func:`ridge_solve`, and the intrinsic scatter s^2 (P,) of their
    residuals: the moment estimate over the good pixels with the floor (module docstring)."""
    coef = ridge_solve(phi, w, flux, ridge)
    return coef, intrinsic_scatter2(flux - phi @ coef, err2, good, phi.shape[1])


def depth_flux(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flux m = exp(-exp(s)) of log optical depths s and its derivative dm/ds = -m exp(s)
    (s clipped to [-50, 5]: optical depths of 2e-22 to 148, flux 1 to 0 in float64)."""
    tau = np.exp(np.clip(s, -50.0, 5.0))
    m = np.exp(np.negative(tau))
    tau *= m  # in place: these arrays are a batch of spectra, each pass over them counts
    return m, np.negative(tau, out=tau)


def _slope_ridge_solve(phi: np.ndarray, w: np.ndarray, target: np.ndarray, ridge: float,
                       coef: np.ndarray) -> np.ndarray:
    """(T, P) per-pixel steps d minimizing sum_n w_np (target_np - phi_n . d)^2 / N
    + ridge |(c_p + d)_slopes|^2: a penalty on the coefficients ``coef`` + d of every term but
    the constant (the first), so that a pixel the stars hardly constrain (an optical depth
    near 0 everywhere, where any low enough ln depth fits) keeps a flat ln depth instead of a
    polynomial free to swing to large depths between or beyond the stars."""
    n_terms = phi.shape[1]
    a, b = _normal_equations(phi, w, target)
    penalty = ridge * np.diag(np.r_[0.0, np.ones(n_terms - 1)])
    a = a / len(phi) + penalty + 1e-12 * np.eye(n_terms)  # 1e-12: a pixel without weight
    b = b / len(phi) - (penalty @ coef).T  # (P, T)
    return np.linalg.solve(a, b[:, :, None])[:, :, 0].T


def _depth_fit(phi: np.ndarray, good: np.ndarray, w: np.ndarray, flux: np.ndarray,
               err2: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (T, P) of the log-depth emulator s_p = phi . c_p, m_p = exp(-exp(s_p)),
    minimizing sum_n w_np (f_np - m_p(phi_n))^2 + ridge, and the intrinsic scatter s^2 (P,)
    of the residuals (as :func:`_region_fit`).

    Start: the weighted fit of ln(-ln f) (f clipped to [FLUX_MIN, exp(-DEPTH_MIN)]) with the
    linearized weights w (f ln f)^2 (d ln(-ln f) = df / (f ln f)). Then ``DEPTH_STEPS``
    Gauss-Newton steps in flux: c += argmin_d sum_n w (r_n - m'_n phi_n . d)^2 with
    m' = dm/ds; a pixel whose weighted squared residual a step does not lower tries half of
    it, up to three times, else stays (noise can push f above 1, which no depth reaches)."""
    w = w / np.maximum(w.sum(axis=0) / len(w), 1e-300)  # mean 1 per pixel: flux units
    f = np.clip(flux, FLUX_MIN, np.exp(-DEPTH_MIN))
    depth = -np.log(f)
    coef = _slope_ridge_solve(phi, w * (f * depth) ** 2, np.log(depth), ridge,
                              np.zeros((phi.shape[1], flux.shape[1])))

    def loss(c: np.ndarray, pixels) -> np.ndarray:
        misfit = (w[:, pixels] * (flux[:, pixels] - depth_flux(phi @ c)[0]) ** 2).mean(axis=0)
        return misfit + ridge * (c[1:] ** 2).sum(axis=0)

    current = loss(coef, slice(None))
    for _ in range(DEPTH_STEPS):
        m, dm = depth_flux(phi @ coef)
        with np.errstate(invalid="ignore", divide="ignore"):
            target = np.where(dm < 0, (flux - m) / dm, 0.0)
        step = _slope_ridge_solve(phi, w * dm**2, target, ridge, coef)
        pending = np.arange(coef.shape[1])
        for _ in range(4):  # full step, then halves
            trial = coef[:, pending] + step[:, pending]
            trial_loss = loss(trial, pending)
            better = trial_loss < current[pending]
            coef[:, pending[better]] = trial[:, better]
            current[pending[better]] = trial_loss[better]
            pending = pending[~better]
            step[:, pending] *= 0.5
            if not pending.size:
                break
    return coef, intrinsic_scatter2(flux - depth_flux(phi @ coef)[0], err2, good, phi.shape[1])


def intrinsic_scatter2(resid: np.ndarray, err2: np.ndarray, good: np.ndarray,
                       n_terms: int) -> np.ndarray:
    """s_p^2 (P,): the moment estimate of the module docstring from residuals and error
    variances (N, P) of the ``good`` pixels of a fit with ``n_terms`` parameters per pixel,
    with the floor."""
    resid2 = np.where(good, resid**2 - err2, 0.0)
    dof = np.maximum(good.sum(axis=0) - n_terms, 1.0)
    return np.maximum(resid2.sum(axis=0) / dof, 0.0) + FLOOR**2


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


TEMPLATES = {"gradient": 1, "curvature": 2}
"""Template reductions of :func:`pixel_chi2`: the derivative order of the emulated spectrum."""
STRENGTH = "strength"
"""The line-strength reduction of :func:`pixel_chi2` (:func:`strength_chi2`)."""
STRENGTH_VARIANCE = "strength_variance"
"""The reduction giving v + tau^2, the variance of the line-strength amplitude of a star the
emulator describes (:meth:`Residuals.strength_variance`): how small a change of the line
strengths the statistic can see in that star."""
GRADIENT_REDUCTIONS = (STRENGTH, STRENGTH_VARIANCE)
"""The reductions that need the emulator's label gradient."""
FLUX_MIN = 1e-3
"""Emulated flux is clipped to [FLUX_MIN, 1] in the line-strength template m ln m."""
STRENGTH_NEIGHBOURS = 50
"""Training stars nearest in labels over which the line-strength misfit is regressed
(:class:`StrengthMisfit`)."""
MISFIT_CHUNK = 4096
"""Stars per chunk of :meth:`StrengthMisfit.moments` (its arrays stay below 7 MB each)."""
FIT_BATCH = 256
"""Stars per batch of :meth:`LabelEmulator.fit_statistics`. Each batch reads every present
region's (P, T(T+1)/2) coefficient products (12 MB for the cubic emulator on 7213 pixels), so
the normal matrices are memory-bound for small batches: 256 stars take 0.8 of the time of 64,
and the batches group the stars by region."""
STATISTICS_BLOCK = 32
"""Stars per block of the residual statistics within a batch of
:meth:`LabelEmulator.fit_statistics`: the dozen (n, P) float64 arrays of a block of 32 stars
on 7213 pixels (1.8 MB each) stay in the processor's cache between the passes over them,
where a whole batch's go out to memory and back at every pass. Each star's statistics are the
same in any block, to rounding."""


def row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) sum_p a_np b_np of two (N, P) arrays in one fused loop, without the (N, P) product
    ``(a * b).sum(axis=1)`` writes and reads again (about half the time on 7213 pixels)."""
    return np.einsum("np,np->n", a, b)


def window_sums(a: np.ndarray, width: int) -> np.ndarray:
    """(N, ceil(P / width)) sums of ``a`` (N, P) over windows of ``width`` adjacent pixels,
    the last window holding what is left (``numpy.add.reduceat``: no padded copy of ``a``,
    and twice as fast as summing a reshaped view over narrow windows)."""
    return np.add.reduceat(a, np.arange(0, a.shape[1], width), axis=1)


class Residuals:
    """Residuals of spectra (N, P) against emulated ones, weighted once for every statistic:
    w_p = g_p / (e_p^2 + s_p^2) and r_p = g_p (f_p - m_p), g the good usable pixels; the label
    gradient G = dm/dz (an (N, L, P) array, or a :class:`CoefficientGradient` that never forms
    it) and the emulator's misfit along the line-strength template, its mean mu and variance
    tau^2 (scalars or (N,) each, :meth:`StrengthMisfit.moments`), serve the line-strength
    statistic."""

    def __init__(self, flux: np.ndarray, err2: np.ndarray, good: np.ndarray,
                 model: np.ndarray, scatter2: np.ndarray, label_gradient=None,
                 strength_misfit=(0.0, 0.0)):
        with np.errstate(invalid="ignore", divide="ignore"):
            self.w = np.where(good, 1.0 / (err2 + scatter2), 0.0)
        self.r = np.where(good, flux - model, 0.0)
        self.wr = self.w * self.r
        self.good, self.model, self.label_gradient = good, model, label_gradient
        self.strength_misfit = strength_misfit
        self._derivatives, self._strength = {}, None

    def statistic(self, width: int = 1, reduce: str = "mean") -> np.ndarray:
        """(N,) :func:`pixel_chi2` of these residuals."""
        if reduce in TEMPLATES:
            return self.template(TEMPLATES[reduce])
        if reduce == STRENGTH:
            return self.strength()
        if reduce == STRENGTH_VARIANCE:
            return self.strength_variance()
        with np.errstate(invalid="ignore", divide="ignore"):
            if width == 1 and reduce == "mean":
                return row_dot(self.wr, self.r) / self.good.sum(axis=1)
            sums = [window_sums(a, width) for a in (self.w, self.wr)]
            seen = sums[0] > 0
            if reduce == "max":
                b2 = np.where(seen, sums[1] ** 2 / sums[0], -np.inf).max(axis=1)
                return np.where(seen.any(axis=1), b2, np.nan)
            b2 = np.where(seen, sums[1] ** 2 / sums[0], 0.0)
            return b2.sum(axis=1) / seen.sum(axis=1)

    def template(self, order: int) -> np.ndarray:
        """(N,) :func:`template_chi2` of these residuals."""
        return self._projection(self._derivative(order))

    def _derivative(self, order: int) -> np.ndarray:
        """The ``order``-th derivative of the emulated spectra along the pixels, each order
        computed once for all the templates that need it."""
        if order == 0:
            return self.model
        if order not in self._derivatives:
            self._derivatives[order] = np.gradient(self._derivative(order - 1), axis=1)
        return self._derivatives[order]

    def strength(self) -> np.ndarray:
        """(N,) :func:`strength_chi2` of these residuals, (a - mu)^2 / (v + tau^2) with a and
        v of :meth:`strength_amplitude` and the misfit's mu and tau^2."""
        return ((self.strength_amplitude()[0] - self.strength_misfit[0]) ** 2
                / self.strength_variance())

    def strength_variance(self) -> np.ndarray:
        """(N,) v + tau^2, the variance of the line-strength amplitude a of a star the emulator
        describes: its noise and the emulator's misfit along the template. A common change of
        every optical depth by a fraction c (flux m -> m**(1 + c)) adds about c to a, so the
        statistic's expectation grows by c^2 / (v + tau^2)."""
        return self.strength_amplitude()[1] + self.strength_misfit[1]

    def strength_amplitude(self) -> tuple[np.ndarray, np.ndarray]:
        """(N,) each: the weighted least-squares amplitude a of the residuals along the
        line-strength template (:func:`strength_chi2`) and its noise variance v = 1 / sum w t^2
        (NaN without a good pixel); ``label_gradient`` required. Computed once for the
        statistic and its variance."""
        if self._strength is None:
            self._strength = self._strength_amplitude()
        return self._strength

    def _strength_amplitude(self) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`strength_amplitude`, computed.

        With t' = t - c^T G the template less its W-projection onto the label gradients,
        c = (G W G^T)^-1 G W t, the sums need only L-vectors of G: sum w r t' =
        sum w r t - c . (G W r) and sum w t'^2 = sum w t^2 - c . (G W t), so G itself (N, L, P)
        need not be formed (:class:`CoefficientGradient`)."""
        if self.label_gradient is None:
            raise ValueError("the line-strength statistic needs the emulator's label gradient")
        g = self.label_gradient
        if isinstance(g, np.ndarray):
            g = ExplicitGradient(g)
        m = np.clip(self.model, FLUX_MIN, 1.0)
        template = m * np.log(m)
        wt = self.w * template
        gwt = g.dot(wt)  # (N, L)
        gram, gwr = g.residual_products(self.w, self.wr)
        coef = np.linalg.solve(gram + 1e-12 * np.eye(gwt.shape[1]), gwt[:, :, None])[..., 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            norm = row_dot(wt, template) - (coef * gwt).sum(axis=1)
            seen = norm > 0
            amplitude = (row_dot(wt, self.r) - (coef * gwr).sum(axis=1)) / norm
            return np.where(seen, amplitude, np.nan), np.where(seen, 1.0 / norm, np.nan)

    def _amplitude(self, template: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Amplitude a = sum w r t / sum w t^2 of r = a t and its variance 1 / sum w t^2."""
        wt = self.w * template
        with np.errstate(invalid="ignore", divide="ignore"):
            norm = row_dot(wt, template)
            seen = norm > 0
            return (np.where(seen, row_dot(wt, self.r) / norm, np.nan),
                    np.where(seen, 1.0 / norm, np.nan))

    def _projection(self, template: np.ndarray) -> np.ndarray:
        """(sum w r t)^2 / sum w t^2 = a^2 / v per star: the squared significance along
        ``template``."""
        amplitude, variance = self._amplitude(template)
        return amplitude**2 / variance


class ExplicitGradient:
    """Label gradients G (N, L, P) given as an array: the products the line-strength statistic
    takes, G v (N, L) for per-star pixel vectors v (N, P) and G diag(w) G^T (N, L, L)."""

    def __init__(self, g: np.ndarray):
        self.g = g

    def dot(self, v: np.ndarray) -> np.ndarray:
        return (self.g @ v[:, :, None])[..., 0]

    def gram(self, w: np.ndarray) -> np.ndarray:
        return (w[:, None, :] * self.g) @ np.swapaxes(self.g, 1, 2)

    def residual_products(self, w: np.ndarray, wr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """G diag(w) G^T (N, L, L) and G (w r) (N, L)."""
        return self.gram(w), self.dot(wr)


class CoefficientGradient:
    """The emulator's label gradients G = D^T C_k (D = d phi / d z (N, T, L) at the stars'
    standardized labels, C_k the (T, P) coefficients of each star's region) through their
    factors: G v = D^T (C_k v) and G diag(w) G^T = D^T (C_k diag(w) C_k^T) D, one matrix
    product per region present, without the (N, L, P) array
    (:meth:`LabelEmulator.label_gradient`)."""

    def __init__(self, emulator: LabelEmulator, z: np.ndarray, region: np.ndarray,
                 weighted=None):
        self.emulator, self.region, self.weighted = emulator, region, weighted
        self.d = design_gradient(z, emulator.order)  # (N, T, L)

    def dot(self, v: np.ndarray) -> np.ndarray:
        return self._through_d(self.emulator.coef_dot(v, self.region))

    def gram(self, w: np.ndarray) -> np.ndarray:
        return self._between_d(self.emulator.coef_gram(w, self.region))

    def residual_products(self, w: np.ndarray, wr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """G diag(w) G^T and G (w r): from ``weighted`` = (C_k diag(w) C_k^T, C_k (w r)) when
        the caller already has them for these weights and residuals (the emulator fit's last
        normal equations), else summed over the pixels."""
        if self.weighted is None:
            return self.gram(w), self.dot(wr)
        gram, dot = self.weighted
        return self._between_d(gram), self._through_d(dot)

    def _through_d(self, c: np.ndarray) -> np.ndarray:
        return np.einsum("nt,ntl->nl", c, self.d)

    def _between_d(self, c: np.ndarray) -> np.ndarray:
        return np.swapaxes(self.d, 1, 2) @ c @ self.d


def template_chi2(flux: np.ndarray, err2: np.ndarray, good: np.ndarray, model: np.ndarray,
                  scatter2: np.ndarray, order: int) -> np.ndarray:
    """(N,) squared significance of a residual along the template t = d^order m / dp^order.

    With w_p = g_p / (e_p^2 + s_p^2), r_p = f_p - m_p and t the ``order``-th derivative of the
    emulated spectrum m along the pixels (``numpy.gradient``), the weighted least-squares
    amplitude of r = a t is a = sum w r t / sum w t^2 with variance 1 / sum w t^2, and the
    statistic is a^2 sum w t^2 = (sum w r t)^2 / sum w t^2, about chi^2_1 (mean 1) for noise.
    Order 1 is the matched filter of a shift of the lines along the pixels,
    m(p - a) ~ m - a m' (an unremoved radial velocity, a wavelength-calibration error);
    order 2 of a change of their width, m convolved with a Gaussian of variance v being
    m + (v / 2) m'' (another line-spread function). Both add up over every line of the
    spectrum, where the chi^2 per pixel sees each line's small misfit separately.
    """
    return Residuals(flux, err2, good, model, scatter2).template(order)


def strength_chi2(flux: np.ndarray, err2: np.ndarray, good: np.ndarray, model: np.ndarray,
                  scatter2: np.ndarray, label_gradient: np.ndarray,
                  strength_misfit=(0.0, 0.0)) -> np.ndarray:
    """(N,) squared significance of a residual along a common change of every line's strength.

    With ``flux = exp(-tau)``, scaling every optical depth by ``1 + a`` gives
    ``m exp(-a tau) ~ m + a m ln m``: the template is ``t = m ln m`` of the emulated spectrum
    (m clipped to [FLUX_MIN, 1]). Labels can mimic much of it (a higher [Fe/H] strengthens the
    metal lines), so t is first made W-orthogonal to the emulator's label gradients
    G = dm/dlabel (N, L, P), ``t - G^T (G W G^T)^{-1} G W t``; what is left is the part of a
    line-strength change that no labels reproduce (hydrogen and molecular lines against the
    metal lines, weak against saturated ones). The statistic is then
    ``(sum w r t)^2 / sum w t^2`` as in :func:`template_chi2`, about chi^2_1 for noise.

    The emulator's own misfit has a part along t too, coherent over all lines where the
    per-pixel scatter s_p treats it as independent: with its local mean mu and variance tau^2
    (``strength_misfit``, per star; :class:`StrengthMisfit`) the statistic is
    ``(a - mu)^2 / (v + tau^2)``, a = sum w r t / sum w t^2 the amplitude and v = 1 / sum w t^2
    its noise variance.
    """
    return Residuals(flux, err2, good, model, scatter2, label_gradient,
                     strength_misfit).strength()


@dataclass
class StrengthMisfit:
    """The emulator's misfit along the line-strength template as a function of the
    standardized labels: its local mean mu(z) and the variance tau^2(z) of a new star's
    misfit about it, from a local linear regression over training stars the emulator
    describes.

    Each training star j (at its best-fit labels z_j) has an amplitude a_j along the template
    and its noise variance v_j (:meth:`Residuals.strength_amplitude`): a = misfit + noise. Over
    the K = ``neighbours`` training stars nearest z (Euclidean in z, distances d_j), with the
    biweight weights w_j prop. to (1 - d_j^2 / h^2)^2 summing to 1 (W their diagonal matrix)
    and the rows x_j = (1, z_j - z) of X, the weighted least-squares line
    a_j ~ beta . x_j gives

        mu(z)    = beta_0,  beta = A^-1 X^T W a,  A = X^T W X
        s^2(z)   = sum_j w_j r_j^2 / (1 - tr(A^-1 B)),  B = X^T W^2 X
        tau^2(z) = max(0, s^2 - sum_j w_j v_j) + s^2 (A^-1 B A^-1)_00

    with r_j = a_j - beta . x_j: s^2 estimates the variance of a about the line without bias
    (E sum_j w_j r_j^2 = s^2 (1 - tr(A^-1 B)) for independent scatter), s^2 less the noise is
    the misfit's own scatter, and the last term is the variance of mu itself, so that
    (a - mu)^2 / (v + tau^2) of a new star is about chi^2_1. A line, not a weighted mean: the
    misfit changes across the K stars, most at the edges of the label box (the most
    metal-poor stars), where a mean of neighbours all on one side is biased and its spread
    about itself too large. The bandwidth h is the distance to the (K+1)-th nearest star, so
    that both change continuously with z (``LINES_LIMIT`` reads the statistic to first order
    in a change that moves a star's best-fit labels a little). With K no more than L + 1
    (L labels) the line is a constant, mu the weighted mean.

    The misfit differs by an order of magnitude across the label space, and within a region of
    the emulator too: where the lines are weak (metal-poor or hot stars) little of the template
    survives the label gradients, so a small misfit is a large amplitude. One value per region
    sets a statistic far below chi^2_1 for most of its stars and far above it for the
    weakest-lined ones, whose tail then sets the flag threshold for all; the local estimate
    follows the misfit star by star. Much of the misfit is shared by neighbouring stars (the
    polynomial's smooth shape error along the template), so its local mean is subtracted
    rather than counted as noise: only the scatter about it hides a real change of the line
    strengths.
    """

    z: np.ndarray
    amplitude: np.ndarray
    variance: np.ndarray
    neighbours: int = STRENGTH_NEIGHBOURS

    @classmethod
    def fit(cls, z: np.ndarray, amplitude: np.ndarray, variance: np.ndarray,
            neighbours: int = STRENGTH_NEIGHBOURS) -> StrengthMisfit:
        """From training stars' standardized best-fit labels z (M, L) and their amplitudes
        and noise variances (M,); stars without a finite amplitude are left out."""
        ok = np.isfinite(amplitude) & np.isfinite(variance) & np.all(np.isfinite(z), axis=1)
        return cls(*(np.asarray(a, np.float64)[ok] for a in (z, amplitude, variance)),
                   int(neighbours))

    @classmethod
    def none(cls, n_labels: int) -> StrengthMisfit:
        """No misfit (mu = tau = 0 everywhere): the emulator before training stars set it."""
        return cls(np.empty((0, n_labels)), np.empty(0), np.empty(0))

    @cached_property
    def _tree(self):
        from scipy.spatial import cKDTree

        return cKDTree(self.z)

    def moments(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N,) each: mu and tau^2 at standardized labels z (N, L) (non-finite labels count as
        the training mean, as :meth:`LabelEmulator.region` places them), in chunks of
        ``MISFIT_CHUNK`` stars (the regressions hold (n, K, L + 1) arrays)."""
        z = np.nan_to_num(np.asarray(z, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        out = np.zeros((2, len(z)))
        if min(self.neighbours, len(self.z)) >= 2:
            for s in range(0, len(z), MISFIT_CHUNK):
                out[:, s:s + MISFIT_CHUNK] = self._local_line(z[s:s + MISFIT_CHUNK])
        return out[0], out[1]

    def _neighbours(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, K) indices of the K nearest training stars and their biweight weights, each
        row summing to 1."""
        k = min(self.neighbours, len(self.z))
        if k == len(self.z):  # every training star is a neighbour: plain weights
            return np.broadcast_to(np.arange(k), (len(z), k)), np.full((len(z), k), 1.0 / k)
        distance, nearest = self._tree.query(z, k + 1)  # the (k+1)-th sets the bandwidth
        with np.errstate(invalid="ignore", divide="ignore"):
            weight = (1.0 - (distance[:, :k] / distance[:, k:]) ** 2) ** 2
        weight = np.where(np.isfinite(weight) & (weight.sum(axis=1, keepdims=True) > 0),
                          weight, 1.0)  # k+1 stars at one point: plain weights
        return nearest[:, :k], weight / weight.sum(axis=1, keepdims=True)

    def _local_line(self, z: np.ndarray) -> np.ndarray:
        """(2, n): mu and tau^2 at z (n, L) from the weighted local line (class docstring)."""
        index, w = self._neighbours(z)
        x = np.ones(index.shape + (1,))
        if index.shape[1] > z.shape[1] + 1:
            x = np.concatenate([x, self.z[index] - z[:, None, :]], axis=2)
        # a tiny ridge on the slopes keeps A invertible where the neighbours coincide
        ridge = np.diag([0.0] + [1e-9] * (x.shape[2] - 1))
        inverse = np.linalg.inv(np.einsum("nki,nk,nkj->nij", x, w, x) + ridge)
        second = np.einsum("nki,nk,nkj->nij", x, w**2, x)
        amplitude = self.amplitude[index]
        beta = np.einsum("nij,nkj,nk->ni", inverse, x, w * amplitude)
        residual = amplitude - np.einsum("nki,ni->nk", x, beta)
        dof = np.maximum(1.0 - np.einsum("nij,nji->n", inverse, second), 1.0 / index.shape[1])
        spread = (w * residual**2).sum(axis=1) / dof
        mean_variance = spread * np.einsum("ni,nij,nj->n", inverse[:, 0], second,
                                           inverse[:, :, 0])
        noise = (w * self.variance[index]).sum(axis=1)
        return np.stack([beta[:, 0], np.maximum(spread - noise, 0.0) + mean_variance])


def pixel_chi2(flux: np.ndarray, err2: np.ndarray, good: np.ndarray, model: np.ndarray,
               scatter2: np.ndarray, width: int = 1, reduce: str = "mean") -> np.ndarray:
    """(N,) chi^2 per window of ``width`` adjacent pixels (NaN without a good pixel); with
    ``reduce`` 'gradient' or 'curvature' the template statistic of :func:`template_chi2`.

    With w_p = g_p / (e_p^2 + s_p^2) and r_p = f_p - m_p, each window j has the weighted
    residual sum in units of its own standard deviation, B_j = sum_j w_p r_p / sqrt(sum_j w_p),
    and the statistic is the mean (``reduce`` 'mean') or the largest ('max') B_j^2 over windows
    with a good pixel. Width 1, mean, is the chi^2 per good pixel,
    sum_p g_p r_p^2 / (e_p^2 + s_p^2) / sum_p g_p. Wider windows sum the signed residuals
    first: a broadband misfit (a continuum off by a few per cent, a tilt) adds up coherently,
    width times more than the independent noise, so it stands out of a statistic in which the
    per-pixel chi^2 dilutes it among all pixels; the largest window picks out a narrow feature
    (an emission line) that a mean over all windows dilutes. Several statistics of the same
    residuals: :class:`Residuals` (weights computed once)."""
    return Residuals(flux, err2, good, model, scatter2).statistic(width, reduce)


@dataclass
class LabelEmulator:
    """Fitted emulator: label standardization, region centres (K, L) in standardized labels,
    coefficients (K, T, P), scatter s_kp (K, P), usable pixels (K, P), and the training label
    box ``label_min``/``label_max`` (L,) in physical units (bounds of :meth:`best_fit`), and
    the misfit along the line-strength template ``strength_misfit`` (:class:`StrengthMisfit`):
    none from :meth:`fit`, set from training stars by
    :func:`pipeline.evaluation.shift.training_strength_misfit`."""

    label_mean: np.ndarray
    label_scale: np.ndarray
    order: int
    centres: np.ndarray
    coef: np.ndarray
    scatter: np.ndarray
    usable: np.ndarray
    label_min: np.ndarray
    label_max: np.ndarray
    strength_misfit: StrengthMisfit
    space: str = "flux"

    @classmethod
    def fit(cls, labels: np.ndarray, flux: np.ndarray, flux_err: np.ndarray,
            good: np.ndarray, order: int = 2, ridge: float = 1e-6, regions: int = 1,
            seed: int = 0, weighting: str = "uniform", space: str = "flux") -> LabelEmulator:
        """Fit to training stars: labels (N, L), flux/flux_err/good (N, P); ``weighting``
        one of ``WEIGHTINGS``, ``space`` one of ``SPACES`` (module docstring)."""
        if weighting not in WEIGHTINGS:
            raise ValueError(f"emulator weighting {weighting!r}: use one of {WEIGHTINGS}")
        if space not in SPACES:
            raise ValueError(f"emulator space {space!r}: use one of {SPACES}")
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
        region_fit = _region_fit if space == "flux" else _depth_fit
        for k in range(len(centres)):  # a few regions; every pixel of one is one solve
            rows = region == k
            g = good[rows]
            f = np.where(g, np.asarray(flux[rows], np.float64), 0.0)
            err2 = np.where(g, np.asarray(flux_err[rows], np.float64) ** 2, 0.0)
            c, s2 = region_fit(phi[rows], g, g.astype(np.float64), f, err2, ridge)
            if weighting == "inverse_variance":  # The Cannon's weights, s_kp from the above
                c, s2 = region_fit(phi[rows], g, np.where(g, 1.0 / (err2 + s2), 0.0), f,
                                   err2, ridge)
            coef.append(c)
            scatter.append(np.sqrt(s2))
            usable.append(g.sum(axis=0) >= 2 * n_terms)
        return cls(mean, scale, int(order), centres, np.stack(coef), np.stack(scatter),
                   np.stack(usable), labels.min(axis=0), labels.max(axis=0),
                   StrengthMisfit.none(z.shape[1]), space)

    def standardize(self, labels: np.ndarray) -> np.ndarray:
        return (np.asarray(labels, np.float64) - self.label_mean) / self.label_scale

    def region(self, labels: np.ndarray) -> np.ndarray:
        """(N,) region of each star (nearest centre; region 0 for non-finite labels)."""
        z = np.nan_to_num(self.standardize(labels), nan=0.0, posinf=0.0, neginf=0.0)
        return nearest(z, self.centres)

    def flux(self, labels: np.ndarray) -> np.ndarray:
        """Emulated spectra (N, P) float64 at ``labels`` (N, L) in physical units."""
        return self.emulate(design(self.standardize(labels), self.order), self.region(labels))

    def emulate(self, phi: np.ndarray, region: np.ndarray) -> np.ndarray:
        """(N, P) emulated flux: phi_n . c_{k_n p}, or exp(-exp(phi_n . c_{k_n p})) for the
        log-depth emulator."""
        out = self._polynomial(phi, region)
        return out if self.space == "flux" else depth_flux(out)[0]

    def _depth_flux(self, z: np.ndarray, region: np.ndarray,
                    dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
        """The log-depth emulator's flux m (N, P) at standardized labels ``z`` and dm/ds there,
        which turns the polynomial's label gradient into the flux's (:func:`depth_flux`), in
        ``dtype``."""
        return depth_flux(self._polynomial(design(z, self.order), region, dtype))

    def _polynomial(self, phi: np.ndarray, region: np.ndarray, dtype=np.float64) -> np.ndarray:
        """(N, P) phi_n . c_{k_n p} in ``dtype``: one matrix product per region present (no
        per-star gather of a (T, P) coefficient block)."""
        coef = self._coefficients(dtype)
        phi = phi.astype(dtype, copy=False)
        out = np.empty((len(phi), coef.shape[-1]), dtype)
        for k in np.unique(region):  # a few regions
            rows = region == k
            out[rows] = phi[rows] @ coef[k]
        return out

    def _coefficients(self, dtype) -> np.ndarray:
        """The coefficients (K, T, P) in ``dtype``: float64 as fitted, float32 (cast once) for
        the steps of the log-depth best fit."""
        return self.coef if np.dtype(dtype) == self.coef.dtype else self._coef32

    @cached_property
    def _coef32(self) -> np.ndarray:
        return self.coef.astype(np.float32)

    def chi2(self, flux: np.ndarray, flux_err: np.ndarray, good: np.ndarray,
             labels: np.ndarray, batch_size: int = 256, width: int = 1,
             reduce: str = "mean") -> np.ndarray:
        """(N,) chi^2 per good pixel of each spectrum against the emulator at ``labels``
        (per window of ``width`` pixels, mean or largest, or a template statistic:
        :func:`pixel_chi2`). NaN where a star has no good usable pixel or its labels are not
        finite."""
        return self.statistics(flux, flux_err, good, labels, [(width, reduce)], batch_size)[0]

    def statistics(self, flux: np.ndarray, flux_err: np.ndarray, good: np.ndarray,
                   labels: np.ndarray, reductions: list[tuple[int, str]],
                   batch_size: int = 256) -> list[np.ndarray]:
        """Each (width, reduce) of ``reductions`` as :meth:`chi2` computes it, (N,) each, with
        the emulated spectra of a batch computed once for all of them. The stars of a batch
        are grouped by region: each group is one matrix product with its region's
        coefficients and its scatter and usable pixels broadcast, instead of gathering a
        (T, P) coefficient block per star."""
        out = [np.empty(len(flux)) for _ in reductions]
        for sl, residuals in self._batches(flux, flux_err, good, labels, reductions, batch_size):
            for values, (width, reduce) in zip(out, reductions, strict=True):
                values[sl] = residuals.statistic(width, reduce)
        return out

    def strength_amplitudes(self, flux: np.ndarray, flux_err: np.ndarray, good: np.ndarray,
                            labels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(2, N): each spectrum's amplitude along the line-strength template at ``labels``
        and its noise variance (:meth:`Residuals.strength_amplitude`)."""
        out = np.empty((2, len(flux)))
        for sl, residuals in self._batches(flux, flux_err, good, labels, [(1, STRENGTH)],
                                           batch_size):
            out[:, sl] = residuals.strength_amplitude()
        return out

    def _batches(self, flux, flux_err, good, labels, reductions, batch_size):
        """(slice, :class:`Residuals`) of each batch of spectra at ``labels``."""
        for s in range(0, len(flux), batch_size):
            sl = slice(s, s + batch_size)
            yield sl, self.residuals(np.asarray(flux[sl], np.float64),
                                     np.asarray(flux_err[sl], np.float64) ** 2,
                                     np.asarray(good[sl], bool), self.standardize(labels[sl]),
                                     self.region(labels[sl]), reductions)

    def residuals(self, flux: np.ndarray, err2: np.ndarray, good: np.ndarray, z: np.ndarray,
                  region: np.ndarray, reductions: list[tuple[int, str]],
                  weighted=None) -> Residuals:
        """:class:`Residuals` of spectra (N, P) against the emulator at standardized labels
        ``z`` (N, L) in ``region`` (N,), with the label gradient where ``reductions`` hold the
        line-strength statistic (``weighted``: its :class:`CoefficientGradient` products
        when known)."""
        if self.space == "depth":
            model, dm = self._depth_flux(z, region)
        else:
            model = self._polynomial(design(z, self.order), region)
        gradient = None
        if any(reduce in GRADIENT_REDUCTIONS for _, reduce in reductions):
            gradient = (CoefficientGradient(self, z, region, weighted) if self.space == "flux"
                        else self._depth_gradient(z, region, dm))
        return Residuals(flux, err2, good & self.usable[region], model,
                         self.scatter[region] ** 2, gradient,
                         (0.0, 0.0) if gradient is None else self.strength_misfit.moments(z))

    def label_gradient(self, z: np.ndarray, region: np.ndarray) -> np.ndarray:
        """(N, L, P) d(emulated flux) / d z at standardized labels ``z``: D^T c_kp, with
        D = d phi / d z (:func:`design_gradient`), one matrix product per region present;
        times dm/ds at s = phi . c_kp for the log-depth emulator."""
        if self.space == "depth":
            return self._depth_gradient(z, region, self._depth_flux(z, region)[1])
        return self._polynomial_gradient(z, region)

    def _depth_gradient(self, z: np.ndarray, region: np.ndarray,
                        dm: np.ndarray) -> np.ndarray:
        """(N, L, P) d(emulated flux) / d z of the log-depth emulator: the polynomial's label
        gradient times ``dm`` = dm/ds (N, P) at z, in the dtype of dm."""
        out = self._polynomial_gradient(z, region, dm.dtype)
        out *= dm[:, None, :]
        return out

    def _polynomial_gradient(self, z: np.ndarray, region: np.ndarray,
                             dtype=np.float64) -> np.ndarray:
        """(N, L, P) d(phi . c_kp) / d z in ``dtype``: D^T c_kp, one matrix product per region
        present."""
        coef = self._coefficients(dtype)
        d = np.swapaxes(design_gradient(z, self.order), 1, 2).astype(dtype)  # (N, L, T)
        out = np.empty((len(z), z.shape[1], coef.shape[-1]), dtype)
        for k in np.unique(region):
            rows = region == k
            out[rows] = (d[rows].reshape(-1, d.shape[2]) @ coef[k]).reshape(
                rows.sum(), d.shape[1], -1)
        return out

    def best_fit(self, flux: np.ndarray, flux_err: np.ndarray, good: np.ndarray,
                 labels0: np.ndarray, iterations: int = 8, margin: float = 0.1,
                 batch_size: int = FIT_BATCH, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Labels (N, L) minimizing :meth:`chi2` from ``labels0`` (N, L), and chi2 (N,) there:
        :meth:`fit_statistics` with the chi^2 per pixel as the only reduction."""
        best, (chi2,) = self.fit_statistics(flux, flux_err, good, labels0, [(1, "mean")],
                                            iterations, margin, batch_size, threads)
        return best, chi2

    def fit_statistics(self, flux: np.ndarray, flux_err: np.ndarray, good: np.ndarray,
                       labels0: np.ndarray, reductions: list[tuple[int, str]],
                       iterations: int = 8, margin: float = 0.1, batch_size: int = FIT_BATCH,
                       threads: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
        """Labels (N, L) minimizing :meth:`chi2` from ``labels0`` (N, L), and each reduction
        (width, reduce) of :func:`pixel_chi2` (N,) of the residuals there, as
        :meth:`statistics` computes them, from the emulated spectra of the fit's last step
        (computed once per batch for all reductions).

        Levenberg-Marquardt in standardized labels z, all stars of a batch at once. With
        weights w_p = g_p / (sigma_p^2 + s_kp^2) / sum g (good and usable pixels of region k)
        the chi^2 per pixel is a quadratic form in phi = phi(z),

            chi2(z) = phi^T A phi - 2 phi^T b + S,
            A = sum_p w_p c_kp c_kp^T,  b = sum_p w_p f_p c_kp,  S = sum_p w_p f_p^2,

        so, with D = d phi / d z (T, L) from :func:`design_gradient`, the Gauss-Newton normal
        matrix J W J^T = D^T A D and J W r = D^T (b - A phi) cost T x T operations per star
        and iteration once A, b, S (one pass over the pixels) are known. Each iteration
        proposes

            dz = (D^T A D + lambda diag(D^T A D))^{-1} D^T (b - A phi),

        bounded to one training standard deviation per label and projected onto the training
        box widened by ``margin`` training standard deviations (an extrapolated emulator could
        otherwise reproduce a star outside the grid). The region is re-chosen at every trial
        point, as :meth:`chi2` chooses it (A, b, S summed once for each region a star visits):
        a step is kept only if the chi2 at its own region is lower (then lambda / 10, else
        lambda x 10), so the result is never above ``chi2(labels0)`` (for labels0 in the box);
        the statistics returned are evaluated pixel by pixel at the result, as :meth:`chi2`
        does. The log-depth emulator's flux is not linear in its coefficients: its steps are
        the same with J W J^T and J W r summed in float32 from the explicit label gradients
        J, recomputed only after an accepted step, each step accepted on the float32 chi^2
        (so not above the start's beyond float32 rounding), and a star stops once its
        proposed step is below ``STEP_TOLERANCE`` training standard deviations in every label.
        Non-finite starting labels start at the training mean. ``iterations`` = 0 gives
        them at ``labels0`` clipped to the box. ``threads`` batches run at once (the same
        results for any number).
        """
        labels0 = np.asarray(labels0, np.float64)
        lo = self.standardize(self.label_min) - margin
        hi = self.standardize(self.label_max) + margin

        def fit_batch(rows):
            g0 = np.asarray(good[rows], bool)
            f = np.where(g0, np.asarray(flux[rows], np.float64), 0.0)  # NaN-free off good pixels
            err2 = np.asarray(flux_err[rows], np.float64) ** 2
            z = np.clip(np.nan_to_num(self.standardize(labels0[rows]), nan=0.0, posinf=0.0,
                                      neginf=0.0), lo, hi)
            if self.space == "depth":
                z, region = self._levenberg_marquardt_explicit(f, err2, g0, z, lo, hi,
                                                               iterations)
            else:
                z, region, (a, b, _) = self._levenberg_marquardt(f, err2, g0, z, lo, hi,
                                                                  iterations)
            weighted = None
            if self.space == "flux" and any(reduce in GRADIENT_REDUCTIONS
                                            for _, reduce in reductions):
                # the line-strength statistic's C_k W C_k^T and C_k W r are the last normal
                # equations times the good pixels: n A and n (b - A phi), no second pixel sum
                n = (g0 & self.usable[region]).sum(axis=1)[:, None]
                weighted = (n[:, :, None] * a,
                            n * (b - (a @ design(z, self.order)[:, :, None])[:, :, 0]))
            values = [np.empty(len(z)) for _ in reductions]
            for s in range(0, len(z), STATISTICS_BLOCK):  # cache-sized blocks
                sl = slice(s, s + STATISTICS_BLOCK)
                residuals = self.residuals(
                    f[sl], err2[sl], g0[sl], z[sl], region[sl], reductions,
                    None if weighted is None else (weighted[0][sl], weighted[1][sl]))
                for column, (width, reduce) in zip(values, reductions, strict=True):
                    column[sl] = residuals.statistic(width, reduce)
            return z * self.label_scale + self.label_mean, values

        # batches of stars in the order of their starting regions: a batch then spans a few
        # regions, whose coefficient products (memory-bound reads) each serve many stars
        by_region = np.argsort(self.region(labels0), kind="stable")
        batches = [np.sort(by_region[s:s + batch_size])
                   for s in range(0, len(labels0), batch_size)]
        best, out = np.empty_like(labels0), [np.empty(len(labels0)) for _ in reductions]
        if self.space == "flux":
            self._outer_products  # noqa: B018 (built once, before the threads need it)
        # Stars are independent and BLAS runs on one thread (its threads would split sums
        # differently on another number of cores), so every thread count gives the same bits.
        # Most of the work is element-wise NumPy (one core each, GIL released): a batch per
        # thread uses the cores.
        with (threadpool_limits(1, user_api="blas"),
              ThreadPoolExecutor(max(1, int(threads))) as pool):
            for rows, (labels, values) in zip(batches, pool.map(fit_batch, batches),
                                              strict=True):
                best[rows] = labels
                for column, value in zip(out, values, strict=True):
                    column[rows] = value
        return best, out

    @cached_property
    def _outer_products(self) -> np.ndarray:
        """(K, P, T(T+1)/2) products c_kpi c_kpj, i <= j, of each region's coefficients: the
        columns of :meth:`coef_gram`, built once (not for each batch and each star that
        changes region), C-ordered for the matrix product with the pixel weights."""
        i, j = np.triu_indices(self.coef.shape[1])
        return np.ascontiguousarray(np.swapaxes(self.coef[:, i] * self.coef[:, j], 1, 2))

    def coef_dot(self, v: np.ndarray, region: np.ndarray) -> np.ndarray:
        """(N, T) C_k v of per-star pixel vectors v (N, P), C_k (T, P) the coefficients of each
        star's region: one matrix product per region present."""
        out = np.empty((len(v), self.coef.shape[1]))
        for k in np.unique(region):
            rows = region == k
            out[rows] = v[rows] @ self.coef[k].T
        return out

    def coef_gram(self, w: np.ndarray, region: np.ndarray) -> np.ndarray:
        """(N, T, T) C_k diag(w) C_k^T of per-star pixel weights w (N, P): one matrix product
        per region present, with the per-pixel products c_kpi c_kpj (i <= j, the result is
        symmetric) as columns."""
        n_terms = self.coef.shape[1]
        i, j = np.triu_indices(n_terms)
        out = np.empty((len(w), n_terms, n_terms))
        for k in np.unique(region):
            rows = region == k
            upper, block = w[rows] @ self._outer_products[k], np.empty((rows.sum(), n_terms,
                                                                        n_terms))
            block[:, i, j] = upper
            block[:, j, i] = upper
            out[rows] = block
        return out

    def _quadratic_terms(self, f, err2, g0, region):
        """A (n, T, T), b (n, T), S (n,) of :meth:`best_fit` for each star at ``region``
        (S NaN for a star without good usable pixels): :meth:`coef_gram` and :meth:`coef_dot`
        of the normalized weights."""
        g = g0 & self.usable[region]
        w = _fit_weights(g, err2, self.scatter[region] ** 2)
        wf = w * f
        return (self.coef_gram(w, region), self.coef_dot(wf, region),
                np.where(g.any(axis=1), row_dot(wf, f), np.nan))

    def _levenberg_marquardt(self, f, err2, g0, z, lo, hi, iterations):
        """z after ``iterations`` damped Gauss-Newton steps (see :meth:`best_fit`), its region
        (that of the nearest centre) and the :meth:`_quadratic_terms` (A, b, S) there."""
        def quadratic(z, a, b, s):
            phi = design(z, self.order)
            return np.einsum("nt,nts,ns->n", phi, a, phi) - 2 * np.einsum("nt,nt->n", phi, b) + s

        terms = _RegionTerms(self, f, err2, g0)
        region = nearest(z, self.centres)
        a, b, s = terms.at(region)
        chi2 = quadratic(z, a, b, s)
        lam = np.full(len(z), 1e-3)
        for _ in range(iterations):
            d = design_gradient(z, self.order)  # (n, T, L)
            d_t = np.swapaxes(d, 1, 2)  # batched matrix products: einsum does not use BLAS here
            normal = d_t @ a @ d
            rhs = (d_t @ (b - (a @ design(z, self.order)[:, :, None])[:, :, 0])[:, :, None])[..., 0]
            trial = _damped_step(z, normal, rhs, lam, lo, hi)
            region_t = nearest(trial, self.centres)
            a_t, b_t, s_t = terms.at(region_t)
            chi2_t = quadratic(trial, a_t, b_t, s_t)
            better = chi2_t < chi2  # NaN (no good pixel) never moves
            z = np.where(better[:, None], trial, z)
            chi2 = np.where(better, chi2_t, chi2)
            region = np.where(better, region_t, region)
            a, b, s = (np.where(better[:, None, None], a_t, a),
                       np.where(better[:, None], b_t, b), np.where(better, s_t, s))
            lam = np.where(better, lam / 10, lam * 10)
        return z, region, (a, b, s)

    def _levenberg_marquardt_explicit(self, f, err2, g0, z, lo, hi, iterations):
        """z and its region after ``iterations`` damped Gauss-Newton steps of the log-depth
        emulator: the steps, bounds and acceptance of :meth:`best_fit`, with the normal
        matrix J W J^T and J W r summed over the pixels from the label gradient J (n, L, P)
        (its flux is not linear in the coefficients: no quadratic form in phi).

        The pixel arithmetic of the steps is float32 (labels, steps and their 3 x 3 solves
        float64): it only chooses where the fit goes, to about 1e-5 in flux, far below any
        spectrum's noise, with half the memory traffic of float64 over these (n, L, P)
        arrays; the statistics at the result are float64. Only the stars still moving are
        evaluated (``STEP_TOLERANCE``)."""
        f, err2 = f.astype(np.float32), err2.astype(np.float32)
        scatter2 = (self.scatter**2).astype(np.float32)

        def at(z, rows):  # (region, weights, residuals, dm/ds) and the chi^2 of stars rows at z
            region = nearest(z, self.centres)
            g = g0[rows] & self.usable[region]
            w = _fit_weights(g, err2[rows], scatter2[region])
            m, dm = self._depth_flux(z, region, np.float32)
            r = np.where(g, f[rows] - m, np.float32(0.0))
            return [region, w, r, dm], np.where(g.any(axis=1),
                                                row_dot(w * r, r).astype(np.float64), np.nan)

        everyone = np.arange(len(z))
        state, chi2 = at(z, everyone)
        lam = np.full(len(z), 1e-3)
        normal, rhs = np.empty((len(z), z.shape[1], z.shape[1])), np.empty(z.shape)
        stale = np.ones(len(z), bool)  # normal equations not yet summed at z
        active = np.isfinite(chi2)  # NaN (no good pixel) never moves
        for _ in range(iterations):
            rows = np.flatnonzero(active)
            if rows.size == 0:
                break
            new = rows[stale[rows]]  # a rejected step leaves z, hence J W J^T and J W r
            if new.size:
                region, w, r, dm = (a[new] for a in state)
                jac = self._depth_gradient(z[new], region, dm)  # dm/ds of the evaluation
                jw = jac * w[:, None, :]
                normal[new] = jw @ np.swapaxes(jac, 1, 2)
                rhs[new] = (jw @ r[:, :, None])[..., 0]
                stale[new] = False
            trial = _damped_step(z[rows], normal[rows], rhs[rows], lam[rows], lo, hi)
            state_t, chi2_t = at(trial, rows)
            better = chi2_t < chi2[rows]
            moved = rows[better]
            for a, a_t in zip(state, state_t, strict=True):
                a[moved] = a_t[better]
            # a proposed step below STEP_TOLERANCE moves the labels by less than the fit can
            # resolve: the star has converged (a rejected one would only propose smaller ones)
            done = np.abs(trial - z[rows]).max(axis=1) < STEP_TOLERANCE
            z[moved], chi2[moved], stale[moved] = trial[better], chi2_t[better], True
            lam[rows] = np.where(better, lam[rows] / 10, lam[rows] * 10)
            active[rows[done]] = False
        return z, state[0]


def _fit_weights(g: np.ndarray, err2: np.ndarray, scatter2: np.ndarray) -> np.ndarray:
    """The best fit's weights on the good usable pixels g (n, P),
    w_p = g_p / (sigma_p^2 + s_kp^2) / sum g, in the dtype of ``err2`` (:meth:`best_fit`)."""
    with np.errstate(divide="ignore"):
        w = np.where(g, 1.0 / (err2 + scatter2), err2.dtype.type(0.0))
    w /= np.maximum(g.sum(axis=1), 1)[:, None].astype(w.dtype)
    return w


def _damped_step(z: np.ndarray, normal: np.ndarray, rhs: np.ndarray, lam: np.ndarray,
                 lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Trial labels of a Levenberg-Marquardt step from z (n, L): (N + lambda diag N)^-1 rhs
    for normal matrices N (n, L, L), bounded to one training standard deviation per label and
    clipped to the box [lo, hi] (:meth:`LabelEmulator.best_fit`)."""
    eye = np.eye(z.shape[1])
    damped = normal + lam[:, None, None] * normal * eye + 1e-12 * eye  # 1e-12: no pixels
    step = np.linalg.solve(damped, rhs[:, :, None])[..., 0]
    step /= np.maximum(1.0, np.abs(step).max(axis=1))[:, None]  # <= 1 std per label
    return np.clip(z + step, lo, hi)


class _RegionTerms:
    """The :meth:`LabelEmulator._quadratic_terms` (A, b, S) of a batch of stars, each computed
    once per star and region: a star near a region boundary whose trial steps cross it and are
    rejected would otherwise have its pixels summed again at every such step."""

    def __init__(self, emulator: LabelEmulator, f, err2, g0):
        self.emulator, self.f, self.err2, self.g0 = emulator, f, err2, g0
        self.known = {}  # region -> (which stars have their terms there, A, b, S)

    def at(self, region: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A (n, T, T), b (n, T), S (n,)) of each star at its ``region`` (n,)."""
        n, n_terms = len(region), self.emulator.coef.shape[1]
        a, b, s = np.empty((n, n_terms, n_terms)), np.empty((n, n_terms)), np.empty(n)
        for k in np.unique(region):
            rows = region == k
            have, a_k, b_k, s_k = self.known.setdefault(
                k, (np.zeros(n, bool), np.empty_like(a), np.empty_like(b), np.empty_like(s)))
            new = rows & ~have
            if new.any():
                a_k[new], b_k[new], s_k[new] = self.emulator._quadratic_terms(
                    self.f[new], self.err2[new], self.g0[new], region[new])
                have |= new
            a[rows], b[rows], s[rows] = a_k[rows], b_k[rows], s_k[rows]
        return a, b, s


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
