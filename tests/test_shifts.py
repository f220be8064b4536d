"""The distribution shifts do what they say: closed forms and the exact generator as references."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.exceptions import ConfigError
from pipeline.spectra import linelist, shifts, synthetic

WAVE = synthetic.apogee_grid()
SMALL = WAVE[2000:2600]  # 600 pixels of the blue chip: the generator's basis builds 12x faster
ACROSS_GAP = WAVE[2600:3300]  # the end of the blue chip, the gap, the start of the green chip
LABELS = np.array([[4800.0, 2.5, 0.0], [5600.0, 4.3, -0.5]])


def gaussian_line(depth: float, centre_pix: float, sigma_pix: float, n: int = 400):
    """A Gaussian absorption line on a log-linear grid of ``n`` pixels (one chip)."""
    wave = 15200.0 * np.exp(1.3816e-5 * np.arange(n))
    x = np.arange(n)
    return wave, 1.0 - depth * np.exp(-0.5 * ((x - centre_pix) / sigma_pix) ** 2)


def moments(flux):
    """Equivalent width (pixels), centroid and variance (pixels) of ``1 - flux``."""
    w = 1.0 - np.asarray(flux, np.float64)
    x = np.arange(w.size)
    ew = w.sum()
    mean = (w * x).sum() / ew
    return ew, mean, (w * (x - mean) ** 2).sum() / ew


def test_segments_are_the_three_chips():
    got = [(s.start, s.stop) for s in shifts.segments(WAVE)]
    sizes = [b - a for a, b in synthetic.APSTAR_CHIPS]
    assert [b - a for a, b in got] == sizes and got[-1][1] == WAVE.size


def test_doppler_shift_moves_a_line_centre_by_v_over_c_pixels():
    wave, flux = gaussian_line(0.5, 200.0, 3.0)
    pixels = shifts.velocity_to_pixels(5.0, wave)
    assert pixels == pytest.approx(np.log1p(5.0 / synthetic.C_KMS) / 1.3816e-5, rel=1e-9)
    assert pixels == pytest.approx(1.207, abs=2e-3)
    _, before, _ = moments(flux)
    _, after, _ = moments(shifts.doppler_shift(flux, wave, 5.0))
    assert after - before == pytest.approx(pixels, abs=0.01)
    _, blue, _ = moments(shifts.doppler_shift(flux, wave, -5.0))
    assert blue - before == pytest.approx(-pixels, abs=0.01)


def test_doppler_shift_matches_the_generator_on_the_shifted_grid():
    """Interpolating the rest spectrum approaches the exact model evaluated at lambda/(1+v/c)."""
    rest = synthetic.synthesize(LABELS, SMALL, np.float64)
    exact = synthetic.synthesize(LABELS, SMALL / (1.0 + 5.0 / synthetic.C_KMS), np.float64)
    got = shifts.doppler_shift(rest, SMALL, 5.0)
    inner = np.concatenate([np.arange(a + 3, b - 3) for a, b in
                            [(s.start, s.stop) for s in shifts.segments(SMALL)]])
    err = np.abs(got - exact)[:, inner]
    assert err.max() < 0.25 * np.abs(rest - exact)[:, inner].max()
    assert np.sqrt((err**2).mean()) < 0.1 * np.sqrt(((rest - exact)[:, inner] ** 2).mean())
    np.testing.assert_array_equal(shifts.doppler_shift(rest, SMALL, 0.0), rest)


def test_broadening_conserves_equivalent_width_and_adds_variance():
    wave, flux = gaussian_line(0.4, 200.0, 2.0)
    sigma_kms = 8.0
    sigma_pix = sigma_kms / (synthetic.C_KMS * 1.3816e-5)
    ew0, mean0, var0 = moments(flux)
    ew1, mean1, var1 = moments(shifts.broaden_lsf(flux, wave, sigma_kms))
    assert ew1 == pytest.approx(ew0, rel=1e-6)
    assert mean1 == pytest.approx(mean0, abs=1e-6)
    assert var1 - var0 == pytest.approx(sigma_pix**2, rel=1e-3)  # Gaussians convolve
    # and on the generator's spectra: each chip's equivalent width (edges aside) is conserved
    model = synthetic.synthesize(LABELS, ACROSS_GAP, np.float64)
    broad = shifts.broaden_lsf(model, ACROSS_GAP, 6.0)
    assert len(shifts.segments(ACROSS_GAP)) == 2
    for seg in shifts.segments(ACROSS_GAP):
        inner = slice(seg.start + 40, seg.stop - 40)
        np.testing.assert_allclose((1 - broad[:, inner]).sum(1), (1 - model[:, inner]).sum(1),
                                   rtol=2e-3)
    assert np.abs(broad - model).max() > 0.05  # lines did change
    with pytest.raises(ConfigError, match="sigma_kms"):
        shifts.broaden_lsf(model, ACROSS_GAP, -1.0)


def test_continuum_scale_and_tilt_multiply_flux_and_error():
    spectra = synthetic.generate(3, 0, wave=SMALL)
    out = shifts.scale_continuum(spectra, 0.97, 0.03)
    factor = shifts.continuum_factor(SMALL, 0.97, 0.03)
    assert factor[0] == pytest.approx(0.97 * 0.97) and factor[-1] == pytest.approx(0.97 * 1.03)
    lnw = np.log(SMALL)
    slope, level = np.polyfit(lnw - 0.5 * (lnw[0] + lnw[-1]), factor, 1)  # linear in ln lambda
    assert level == pytest.approx(0.97, rel=1e-9)  # scale at the centre of the band
    assert slope * 0.5 * (lnw[-1] - lnw[0]) == pytest.approx(0.97 * 0.03, rel=1e-6)
    np.testing.assert_allclose(out.flux / spectra.flux, np.broadcast_to(factor, out.flux.shape),
                               rtol=1e-6)
    good = spectra.flux_err > 0
    np.testing.assert_allclose((out.flux_err / np.where(good, spectra.flux_err, 1))[good],
                               np.broadcast_to(factor, good.shape)[good], rtol=1e-6)


def test_spikes_appear_at_the_stated_count_with_errors_untouched(rng):
    spectra = synthetic.generate(5, 0, wave=SMALL)
    out = shifts.add_spikes(spectra, 20, rng, amplitude=(0.5, 2.0))
    diff = out.flux - spectra.flux
    assert np.all((diff != 0).sum(axis=1) == 20)
    assert diff[diff != 0].min() >= 0.5 - 1e-6 and diff.max() <= 2.0 + 1e-6
    np.testing.assert_array_equal(out.flux_err, spectra.flux_err)
    with pytest.raises(ConfigError, match="count"):
        shifts.add_spikes(spectra, -1, rng)


def test_emission_line_equivalent_width_is_closed_form():
    wave, flux = gaussian_line(0.0, 0.0, 1.0)
    out = shifts.add_emission_lines(flux, wave, [wave[200]], 0.3, 15.0)
    sigma_pix = 15.0 / (synthetic.C_KMS * 1.3816e-5)
    assert (out - flux).sum() == pytest.approx(0.3 * sigma_pix * np.sqrt(2 * np.pi), rel=1e-6)
    assert np.argmax(out) == 200 and out.max() == pytest.approx(1.3)


def test_renoise_keeps_the_standardized_noise_draw():
    spectra = synthetic.generate(4, 1, wave=SMALL, labels=LABELS[[0, 1, 0, 1]],
                                 snr=np.full(4, 50.0))
    model = synthetic.synthesize(spectra.label_array(), SMALL)
    new = model**np.float32(1.25)
    out = shifts.renoise(spectra, model, new)
    ok = (spectra.flux_err > 0) & (out.flux_err > 0)
    z0 = (spectra.flux - model)[ok] / spectra.flux_err[ok]
    z1 = (out.flux - new)[ok] / out.flux_err[ok]
    np.testing.assert_allclose(z1, z0, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(out.flux_err[spectra.flux_err == 0], 0.0)
    # the error model of the generator at the new flux: pattern sqrt(flux) / SNR
    want = synthetic.error_pattern(SMALL) * np.sqrt(new) / 50.0
    np.testing.assert_allclose(out.flux_err[ok], np.broadcast_to(want, ok.shape)[ok], rtol=1e-4)


def test_line_strength_shift_scales_the_optical_depth():
    out = shifts.shifted_spectra("lines_x1.25", 3, 0, wave=SMALL)
    labels = out.label_array()
    tau = synthetic.coefficients(labels) @ synthetic.profile_basis(SMALL, np.float64)
    model = np.exp(-1.25 * tau)
    ok = out.flux_err > 0
    z = (out.flux - model)[ok] / out.flux_err[ok]
    assert abs(z.mean()) < 0.05 and z.std() == pytest.approx(1.0, abs=0.05)


def test_forest_seed_moves_the_forest_and_restores_it():
    before = synthetic.synthesize(LABELS, SMALL)
    lines = linelist.line_list()
    with shifts.forest_seed(linelist.FOREST_SEED + 1):
        other = linelist.line_list()
        inside = synthetic.synthesize(LABELS, SMALL)
    assert not np.allclose(other.of("fe_mid"), lines.of("fe_mid"))
    np.testing.assert_array_equal(other.of("mg"), lines.of("mg"))  # named lines stay
    assert np.abs(inside - before).max() > 0.1
    np.testing.assert_array_equal(synthetic.synthesize(LABELS, SMALL), before)
    assert linelist.FOREST_SEED == 20240611


def test_suite_labels_snr_and_names():
    hot = shifts.shifted_spectra("teff_hot", 50, 0, wave=SMALL)
    assert hot.labels["TEFF"].min() >= 7000 and hot.labels["TEFF"].max() <= 7800
    low = shifts.shifted_spectra("snr_12", 5, 0, wave=SMALL)
    np.testing.assert_array_equal(low.labels["SNR"], 12.0)
    rv = shifts.shifted_spectra("rv_5kms", 2, 0, wave=SMALL)
    exact = synthetic.synthesize(rv.label_array(), SMALL / (1 + 5.0 / synthetic.C_KMS))
    ok = rv.flux_err > 0
    z = (rv.flux - exact)[ok] / rv.flux_err[ok]
    assert z.std() == pytest.approx(1.0, abs=0.05)
    ref = shifts.shifted_spectra("spikes", 2, 0, wave=SMALL)
    assert ref.star_id[0].startswith("SHIFT-SPIKES")
    with pytest.raises(ConfigError, match="unknown shift 'nope'.*lines_x1.25"):
        shifts.shifted_spectra("nope", 2, 0, wave=SMALL)


def test_oracle_best_fit_matches_scipy_least_squares():
    """The oracle's Gauss-Newton fit of a shifted spectrum (line opacity x1.25) reaches the
    minimum chi^2 an independent trust-region fit (scipy least_squares, finite differences)
    finds, and an unshifted spectrum comes back at its own labels with chi^2 0."""
    from scipy.optimize import least_squares

    from benchmarks.shift_detectability import best_fit_labels

    wave = synthetic.apogee_grid()[::8]
    labels = np.array([[4600.0, 2.4, -0.2], [5600.0, 4.3, 0.1]])
    model = synthetic.synthesize(labels, wave, np.float64)
    err = 0.01 * np.sqrt(model)
    err[:, :5] = 0.0  # bad pixels are ignored
    theta, chi2, cov = best_fit_labels(model, err, labels + [40.0, 0.1, 0.05], wave)
    np.testing.assert_allclose(theta, labels, rtol=1e-7)
    assert np.all(chi2 < 1e-12) and np.all(np.linalg.eigvalsh(cov) > 0)

    target = model ** 1.25
    theta, chi2, _ = best_fit_labels(target, err, labels, wave)
    scale = np.array([100.0, 0.1, 0.1])
    for i in range(2):
        good = err[i] > 0

        def resid(x, i=i, good=good):
            flux = synthetic.synthesize(x * scale, wave, np.float64)[0]
            return ((target[i] - flux) / np.where(good, err[i], 1.0))[good]

        ref = least_squares(resid, labels[i] / scale, x_scale="jac", xtol=1e-12, ftol=1e-12)
        assert chi2[i] == pytest.approx(2.0 * ref.cost, rel=1e-4)
        assert np.all(np.abs(theta[i] - ref.x * scale) < [0.5, 2e-3, 2e-3])
        assert chi2[i] > 10.0  # the shift is not absorbed by the labels


def test_oracle_bound_of_the_suite_stars():
    """The oracle on a few of the suite's stars: a line-strength change leaves a chi^2 the
    labels cannot absorb (power near 1) while biasing the best-fit [Fe/H] upward, and the
    command prints a row per shift."""
    from benchmarks.shift_detectability import main, oracle

    r = oracle("lines_x1.25", 6, 2026)
    assert r["n"] == 6 and 0.5 < r["power"] <= 1.0 and r["lambda_median"] > 100
    assert r["bias_median"][2] > 0.02  # stronger lines read as a higher [Fe/H]
    assert main(["--n", "2", "--only", "rv_5kms"]) == 0
