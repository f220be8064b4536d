"""The embedded default data: APOGEE-like H-band spectra from an analytic opacity model.

Model (shapes: N stars, G line groups of :mod:`pipeline.spectra.linelist`, P pixels)::

    tau(lambda) = C(Teff, log g, [Fe/H]) @ B(lambda)        C: (N, 3G), B: (3G, P)
    flux        = exp(-tau)                                  continuum-normalized, (N, P)

Each group g has three unit profiles on the grid (rows of B): a narrow and a broad Gaussian core
(equal area: broadening conserves the equivalent width of weak lines) and a Lorentzian
pressure-damping wing, each the sum over the group's lines weighted by ``10**loggf``. A star
sets ``C[g] = A_g * (1 - u, u, d_g)`` with

* line strength ``A_g`` (line-centre optical depth of a ``loggf = 0`` line), a Saha-Boltzmann
  form per unit continuum opacity::

      log10 A_g = m_g ([Fe/H] + alpha_g [a/Fe]) - chi_g theta + log10 f_g - log10 kappa + const

  ``theta = 5040 / Teff``; ``f_g`` the neutral fraction ``P_e / (P_e + Phi_I(T))`` of an atom
  (Saha), the associated fraction ``x / (1 + x)``, ``x = 10**(D (theta - theta_half)) Pg/1e5``
  of a molecule (CO, OH, CN vanish above ~4500-5000 K), and for hydrogen the n = 4 population
  (``chi = 12.75 eV``: Brackett lines appear in hot stars); ``kappa = P_e theta**2.5
  10**(0.754 theta)`` is the H- continuum opacity; gas pressure ``Pg`` rises with log g and the
  electron pressure ``P_e`` follows from metal and hydrogen ionization. ``const`` makes
  ``A_g = tau_ref`` at the group's reference star;
* width weight ``u`` in [0, 1) from macroturbulence (larger in giants) and rotation (hot
  dwarfs above the Kraft break);
* damping ``d_g`` ~ ``Pg**0.7`` (van der Waals) for metals, ``P_e`` (Stark) for hydrogen.

``exp(-tau)`` gives the curve of growth: weak lines deepen linearly with abundance, strong lines
saturate and then grow only through their damping wings (gravity). Ionization, molecules and
the H- opacity all tie Teff, log g and [Fe/H] together: the degeneracies of real spectra.

The label Jacobian ``d flux / d label = -flux * (dC/dlabel @ B)`` is exact: ``dC/dlabel`` comes
from complex-step differentiation of the closed-form coefficients (``Im C(x + i h) / h``, no
subtractive cancellation), the rest is the chain rule as a matrix product.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table

from pipeline.config import validate
from pipeline.exceptions import DataError, NumericalError
from pipeline.spectra import linelist
from pipeline.spectra.dataset import Spectra

C_KMS = 299792.458
APSTAR_CRVAL1 = 4.179
APSTAR_CDELT1 = 6.0e-6
APSTAR_NWAVE = 8575
APSTAR_CHIPS = ((322, 3242), (3648, 6048), (6412, 8305))
"""apStar pixel ranges [start, stop) of the blue, green and red detectors."""
SOLAR = (5777.0, 4.44, 0.0)
_COMPLEX_STEP = 1.0e-20


def apstar_wave() -> np.ndarray:
    """The full apStar log-linear vacuum grid, float64 (8575,) in Angstrom."""
    return 10.0 ** (APSTAR_CRVAL1 + APSTAR_CDELT1 * np.arange(APSTAR_NWAVE))


def apogee_grid() -> np.ndarray:
    """The default training grid: apStar restricted to the three chips, float64 (7213,)."""
    idx = np.concatenate([np.arange(a, b) for a, b in APSTAR_CHIPS])
    return apstar_wave()[idx]


def _check_wave(wave) -> np.ndarray:
    wave = apogee_grid() if wave is None else np.asarray(wave, dtype=np.float64)
    if wave.ndim != 1 or wave.size < 2 or not np.all(np.diff(wave) > 0):
        raise DataError(f"synthetic: wave must be a strictly increasing 1-D grid, got shape "
                        f"{wave.shape}")
    return wave


# ------------------------------------------------------------------- stellar atmosphere
def _atmosphere(teff, logg, feh):
    """theta, gas pressure Pg, electron pressure Pe, continuum opacity kappa (cgs, arbitrary
    normalization). Closed forms only, so complex-step differentiation is exact."""
    theta = 5040.0 / teff
    log_t = np.log10(teff)
    pg = 10.0 ** (5.0 + 0.62 * (logg - 4.44) - 0.2 * feh + 1.2 * (theta - 0.87))

    def saha(ion):  # Phi_I(T) = Pe N+/N0 in dyn cm-2, partition-function ratio 1
        return 10.0 ** (2.5 * log_t - ion * theta - 0.1762 + 0.301)

    donors = 1.0e-4 * 10.0**feh * pg  # metal electron donors, I ~ 7.6 eV
    phi_m = saha(7.6)
    pe_metal = 2.0 * donors * phi_m / (phi_m + np.sqrt(phi_m**2 + 4.0 * donors * phi_m))
    pe = np.sqrt(pe_metal**2 + pg * saha(13.6))
    kappa = pe * theta**2.5 * 10.0 ** (0.754 * theta)
    return theta, pg, pe, kappa, saha


def _log_strength(group, teff, logg, feh):
    """log10 of the unnormalized line strength of ``group`` (see module docstring)."""
    theta, pg, pe, kappa, saha = _atmosphere(teff, logg, feh)
    alpha_fe = 0.15 * (1.0 - np.tanh((feh + 0.6) / 0.3))  # +0.3 dex in the halo, 0 at solar
    log_a = group.metal_power * (feh + group.alpha * alpha_fe) - group.chi * theta
    if group.kind == "atom":
        log_a = log_a + np.log10(pe / (pe + saha(group.ion)))
    elif group.kind == "molecule":
        x = 10.0 ** (group.dissociation * (theta - 5040.0 / group.t_half)) * pg / 1.0e5
        log_a = log_a + np.log10(x / (1.0 + x))
    else:  # hydrogen: neutral fraction
        log_a = log_a + np.log10(pe / (pe + saha(13.6)))
    return log_a - np.log10(kappa)


def _damping(group, teff, logg, feh):
    theta, pg, pe, _, _ = _atmosphere(teff, logg, feh)
    if group.kind == "hydrogen":  # quasi-static (Holtsmark) Stark wings ~ N_e
        _, _, pe_ref, _, _ = _atmosphere(group.ref[0], group.ref[1], 0.0)
        return group.damping * pe / pe_ref
    return group.damping * (pg / 1.0e5) ** 0.7 * theta**-0.3  # van der Waals


def _width_weight(teff, logg):
    """u in [0, 1): weight of the broad core; macroturbulence + rotation in km/s squared."""
    v_macro = 2.5 + 1.5 * (4.44 - logg)
    v_rot = 15.0 / (1.0 + np.exp(-(teff - 6300.0) / 150.0)) / (1.0 + np.exp(-(logg - 3.5) / 0.3))
    return (v_macro**2 + v_rot**2) / 448.0  # 448 = 22**2 - 6**2 (broad**2 - narrow**2)


def coefficients(labels) -> np.ndarray:
    """Per-star basis coefficients C, shape (N, 3G); complex input gives complex output.

    Args:
        labels: (N, 3) Teff [K], log g [dex cgs], [Fe/H] [dex].
    """
    teff, logg, feh = labels[:, 0], labels[:, 1], labels[:, 2]
    u = _width_weight(teff, logg)
    cols = []
    for group in linelist.GROUPS:
        norm = _log_strength(group, group.ref[0], group.ref[1], 0.0)
        strength = group.tau_ref * 10.0 ** (_log_strength(group, teff, logg, feh) - norm)
        cols += [strength * (1.0 - u), strength * u, strength * _damping(group, teff, logg, feh)]
    return np.stack(cols, axis=1)


# ------------------------------------------------------------------------ profile basis
_BASIS_CACHE: dict = {}


def profile_basis(wave, dtype=np.float32) -> np.ndarray:
    """Unit-strength opacity profiles B, shape (3G, P): per group narrow core, broad core,
    damping wing (see module docstring), on any grid ``wave`` (Angstrom). Cached per grid."""
    wave = _check_wave(wave)
    key = (wave.size, float(wave[0]), float(wave[-1]), hash(wave.tobytes()), np.dtype(dtype))
    if key not in _BASIS_CACHE:
        lines = linelist.line_list()
        rows = []
        for g, group in enumerate(linelist.GROUPS):
            sel = lines.group == g
            dv = C_KMS * np.log(wave[None, :] / lines.wave[sel, None])  # (n_lines, P) km/s
            gf = 10.0 ** lines.loggf[sel]
            narrow, broad = group.sigma
            area = narrow * np.sqrt(2.0 * np.pi)
            rows.append(gf @ np.exp(-0.5 * (dv / narrow) ** 2))
            rows.append(gf @ (narrow / broad * np.exp(-0.5 * (dv / broad) ** 2)))
            rows.append(gf @ (area / np.pi * group.gamma / (dv**2 + group.gamma**2)))
        if len(_BASIS_CACHE) > 8:
            _BASIS_CACHE.clear()
        _BASIS_CACHE[key] = np.asarray(rows, dtype=dtype)
    return _BASIS_CACHE[key]


def _as_labels(labels) -> np.ndarray:
    labels = np.atleast_2d(np.asarray(labels, dtype=np.float64))
    if labels.shape[1] != 3 or not np.all(np.isfinite(labels)) or np.any(labels[:, 0] <= 0):
        raise DataError("synthetic: labels must be finite (N, 3) Teff, log g, [Fe/H] with "
                        f"Teff > 0, got shape {labels.shape}")
    return labels


def synthesize(labels, wave=None, dtype=np.float32, groups=None) -> np.ndarray:
    """Noiseless normalized flux ``exp(-C @ B)``, shape (N, P), of ``dtype``.

    ``groups``: optional names of :data:`pipeline.spectra.linelist.GROUPS` to keep (the others get
    zero opacity), e.g. ``["brackett"]`` to look at one species.
    """
    basis = profile_basis(wave, dtype)
    coef = coefficients(_as_labels(labels))
    if groups is not None:
        keep = np.isin([g.name for g in linelist.GROUPS], list(groups))
        coef = coef * np.repeat(keep, 3)[None, :]
    tau = coef.astype(dtype) @ basis
    return np.exp(-tau, out=tau)


def label_jacobian(labels, wave=None) -> np.ndarray:
    """d flux / d (Teff, log g, [Fe/H]) in float64, shape (N, P, 3), per K, per dex, per dex.

    ``dC/dlabel_j = Im C(labels + i h e_j) / h`` (complex step, exact to rounding), then
    ``d flux = -flux * (dC @ B)``.
    """
    labels = _as_labels(labels)
    basis = profile_basis(wave, np.float64)
    flux = np.exp(-(coefficients(labels) @ basis))
    jac = np.empty(flux.shape + (3,))
    for j in range(3):
        step = labels.astype(complex)
        step[:, j] += 1j * _COMPLEX_STEP
        dcoef = coefficients(step).imag / _COMPLEX_STEP
        jac[:, :, j] = -flux * (dcoef @ basis)
    return jac


def cramer_rao_bound(labels, flux_err, wave=None, chunk: int = 256) -> np.ndarray:
    """Per-star Cramér-Rao bound ``(J^T C^-1 J)^-1``, float64 (N, 3, 3), physical units.

    ``J`` is :func:`label_jacobian` (N, P, 3), ``C = diag(flux_err**2)``; pixels whose error is
    non-finite or <= 0 (bad pixels) get zero weight. Raises NumericalError naming the first
    star whose Fisher matrix is singular.
    """
    labels = _as_labels(labels)
    flux_err = np.atleast_2d(np.asarray(flux_err, dtype=np.float64))
    good = np.isfinite(flux_err) & (flux_err > 0)
    weight = np.where(good, 1.0 / np.where(good, flux_err, 1.0) ** 2, 0.0)
    out = np.empty((labels.shape[0], 3, 3))
    for start in range(0, labels.shape[0], chunk):
        sl = slice(start, start + chunk)
        jac = label_jacobian(labels[sl], wave)
        fisher = np.einsum("npi,np,npj->nij", jac, weight[sl], jac)
        try:
            out[sl] = np.linalg.inv(fisher)
        except np.linalg.LinAlgError:
            bad = [i for i in range(len(fisher)) if np.linalg.matrix_rank(fisher[i]) < 3]
            raise NumericalError(f"cramer_rao_bound: singular Fisher matrix for star "
                                 f"{start + bad[0]}; it has too few good pixels") from None
    return out


# ----------------------------------------------------------------------- label sampling
def synthetic_config(cfg: dict | None) -> dict:
    """The ``data`` section with defaults filled, from a full config, a data section or None."""
    if cfg is None:
        return validate({})["data"]
    if "data" in cfg:
        return cfg["data"]
    return validate({"data": cfg})["data"]


def sample_labels(n: int, rng: np.random.Generator, cfg: dict | None = None) -> np.ndarray:
    """Labels (n, 3) along a red giant branch + red clump and a main sequence.

    [Fe/H]: thin/thick disc N(-0.15, 0.3) plus a halo tail uniform in [-2.5, -1]. Giants:
    log g uniform, Teff = 4800 + 480 (log g - 3) - 150 [Fe/H] (metal-poor giants are hotter),
    a third of them in the red clump. Dwarfs: Teff uniform, log g on the main sequence
    4.75 - 0.6 ((Teff - 3500) / 3500)**1.5 minus an evolutionary offset. Clipped to the
    ``data.synthetic`` ranges.
    """
    syn = synthetic_config(cfg)["synthetic"]
    (t_lo, t_hi), (g_lo, g_hi), (z_lo, z_hi) = (syn["teff_range"], syn["logg_range"],
                                                syn["feh_range"])
    feh = np.where(rng.random(n) < syn["halo_fraction"], rng.uniform(-2.5, -1.0, n),
                   rng.normal(-0.15, 0.3, n))
    giant = rng.random(n) < syn["giant_fraction"]
    clump = giant & (rng.random(n) < 1.0 / 3.0)
    logg_rgb = rng.uniform(0.2, 3.8, n)
    teff_rgb = 4800.0 + 480.0 * (logg_rgb - 3.0) - 150.0 * feh + rng.normal(0, 80, n)
    teff_rc = 4750.0 - 120.0 * feh + rng.normal(0, 70, n)
    logg_rc = rng.normal(2.45, 0.08, n)
    teff_ms = rng.uniform(t_lo, t_hi, n)
    logg_ms = (4.75 - 0.6 * ((teff_ms - 3500.0) / 3500.0).clip(0) ** 1.5
               - np.abs(rng.normal(0, 0.08 + 0.15 * (teff_ms > 5500), n)))
    teff = np.where(clump, teff_rc, np.where(giant, teff_rgb, teff_ms))
    logg = np.where(clump, logg_rc, np.where(giant, logg_rgb, logg_ms))
    return np.column_stack([teff.clip(t_lo, t_hi), logg.clip(g_lo, g_hi), feh.clip(z_lo, z_hi)])


# -------------------------------------------------------------------------------- noise
def error_pattern(wave) -> np.ndarray:
    """Fixed relative error per pixel (P,), median 1: throughput falls toward chip edges.

    Chips are found from gaps in the grid (a step > 1.5x the median log step)."""
    wave = _check_wave(wave)
    step = np.diff(np.log(wave))
    edges = np.concatenate([[0], np.flatnonzero(step > 1.5 * np.median(step)) + 1, [wave.size]])
    pattern = np.empty(wave.size)
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        x = np.linspace(-1.0, 1.0, b - a)
        pattern[a:b] = 1.0 + 0.5 * x**6 + 0.05 * np.sin(37.0 * x)
    return pattern / np.median(pattern)


def sample_snr(n: int, rng: np.random.Generator, cfg: dict | None = None) -> np.ndarray:
    """Per-star median SNR (n,), log-uniform in [data.synthetic.snr_min, snr_max]."""
    syn = synthetic_config(cfg)["synthetic"]
    return np.exp(rng.uniform(np.log(syn["snr_min"]), np.log(syn["snr_max"]), n))


def generate(n: int, seed, cfg: dict | None = None, wave=None, id_prefix: str = "SYN",
             labels=None, snr=None, first_id: int = 0) -> Spectra:
    """``n`` noisy synthetic spectra as a :class:`Spectra`, deterministic from ``seed``.

    ``flux_err = pattern(lambda) sqrt(flux) / SNR`` with SNR log-uniform in
    [snr_min, snr_max]; ``flux = model + flux_err * N(0, 1)``; a Poisson number (mean
    ``bad_pixel_fraction * P``) of bad pixels per star get a spike in flux and
    ``FLUX_ERR = 0`` (the canonical bad-pixel flag). Labels table: STAR_ID, TEFF, LOGG,
    FE_H, SNR.

    Args:
        seed: int or sequence of ints (numpy SeedSequence entropy).
        labels, snr: optional (n, 3) labels and (n,) SNR instead of sampled ones.
        id_prefix, first_id: STAR_IDs are ``f"{id_prefix}-{first_id + i:07d}"``.
    """
    data = synthetic_config(cfg)
    syn = data["synthetic"]
    wave = _check_wave(wave)
    rng = np.random.default_rng(seed)
    labels = sample_labels(n, rng, data) if labels is None else _as_labels(labels)
    snr = sample_snr(n, rng, data) if snr is None else np.asarray(snr, np.float64)
    model = synthesize(labels, wave)
    flux_err = (error_pattern(wave).astype(np.float32) * np.sqrt(model)
                / snr[:, None].astype(np.float32))
    flux = model + flux_err * rng.standard_normal(model.shape, dtype=np.float32)
    n_bad = rng.poisson(syn["bad_pixel_fraction"] * wave.size, n)
    rows = np.repeat(np.arange(n), n_bad)
    cols = rng.integers(0, wave.size, rows.size)
    flux[rows, cols] += rng.exponential(1.0, rows.size).astype(np.float32)
    flux_err[rows, cols] = 0.0
    table = Table({"STAR_ID": [f"{id_prefix}-{first_id + i:07d}" for i in range(n)],
                   "TEFF": labels[:, 0], "LOGG": labels[:, 1], "FE_H": labels[:, 2],
                   "SNR": snr})
    return Spectra(flux, flux_err, wave, table, meta={"N_BADPIX": int((flux_err == 0).sum())})
