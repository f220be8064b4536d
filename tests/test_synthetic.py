"""The synthetic generator: grid, determinism, exact label Jacobian, physics, Cramér-Rao bound."""

import numpy as np
import pytest

from pipeline.spectra import linelist, synthetic
from pipeline.spectra.fits import read_spectra, write_spectra

STARS = np.array([[4200.0, 1.8, -0.3], [5800.0, 4.3, 0.1], [6800.0, 4.1, -1.2],
                  [3700.0, 0.8, -2.0]])
GRID_7214 = np.exp(np.linspace(np.log(15150.0), np.log(16950.0), 7214))


def absorption(labels, groups=None, wave=None, dtype=np.float64):
    """Summed absorption depth sum(1 - flux) per star: an equivalent width in pixels."""
    return (1.0 - synthetic.synthesize(labels, wave, dtype, groups)).sum(axis=1)


def test_apogee_grid_is_the_apstar_chip_slice():
    wave = synthetic.apogee_grid()
    assert wave.shape == (7213,)
    full = 10.0 ** (4.179 + 6e-6 * np.arange(8575))
    np.testing.assert_array_equal(wave[:2920], full[322:3242])
    np.testing.assert_array_equal(wave[-1893:], full[6412:8305])
    assert wave[0] == pytest.approx(15168.13, abs=0.01)


def test_generate_is_deterministic_from_the_seed():
    a, b = synthetic.generate(20, 5), synthetic.generate(20, 5)
    np.testing.assert_array_equal(a.flux, b.flux)
    np.testing.assert_array_equal(a.flux_err, b.flux_err)
    np.testing.assert_array_equal(a.label_array(), b.label_array())
    c = synthetic.generate(20, 6)
    assert not np.array_equal(a.flux, c.flux)


def test_generated_labels_snr_noise_and_bad_pixels(rng):
    spectra = synthetic.generate(400, 11)
    y = spectra.label_array()
    assert y[:, 0].min() >= 3500 and y[:, 0].max() <= 7000
    assert y[:, 1].min() >= 0 and y[:, 1].max() <= 5
    assert y[:, 2].min() >= -2.5 and y[:, 2].max() <= 0.5
    giants, dwarfs = y[:, 1] < 3.8, y[:, 1] > 4.0
    assert 0.4 < giants.mean() < 0.8 and dwarfs.mean() > 0.2
    # the giant branch is cool, the main sequence reaches the hot end
    assert np.median(y[giants, 0]) < 5000 and y[dwarfs, 0].max() > 6500
    snr = np.asarray(spectra.labels["SNR"])
    assert snr.min() >= 30 and snr.max() <= 300 and np.ptp(np.log(snr)) > 1.5
    bad = spectra.flux_err == 0
    assert bad.mean() == pytest.approx(0.002, rel=0.2)
    assert spectra.meta["N_BADPIX"] == bad.sum()
    # noise: normalized residuals against the noiseless model are unit Gaussian
    model = synthetic.synthesize(y, dtype=np.float64)
    z = (spectra.flux - model)[~bad] / spectra.flux_err[~bad]
    assert z.std() == pytest.approx(1.0, abs=0.01) and abs(z.mean()) < 0.01


@pytest.mark.parametrize("wave", [None, GRID_7214], ids=["7213", "7214"])
def test_label_jacobian_matches_float64_finite_differences(wave):
    jac = synthetic.label_jacobian(STARS, wave)
    assert jac.shape == (4, 7213 if wave is None else 7214, 3) and jac.dtype == np.float64
    for j, h in enumerate([0.05, 1e-4, 1e-4]):
        up, down = STARS.copy(), STARS.copy()
        up[:, j] += h
        down[:, j] -= h
        fd = (synthetic.synthesize(up, wave, np.float64)
              - synthetic.synthesize(down, wave, np.float64)) / (2 * h)
        scale = np.abs(jac[:, :, j]).max(axis=1, keepdims=True)
        assert np.all(scale > 0)
        assert np.all(np.abs(fd - jac[:, :, j]) < 1e-6 * scale)


def test_float32_synthesis_agrees_with_float64():
    f32 = synthetic.synthesize(STARS)
    f64 = synthetic.synthesize(STARS, dtype=np.float64)
    assert f32.dtype == np.float32
    np.testing.assert_allclose(f32, f64, atol=2e-6)


def test_brackett_lines_deepen_toward_hotter_dwarfs():
    teff = np.array([5000.0, 5500.0, 6000.0, 6500.0, 7000.0])
    main_sequence = np.column_stack([teff, 4.75 - 0.6 * ((teff - 3500) / 3500) ** 1.5,
                                     np.zeros(5)])
    br = absorption(main_sequence, ["brackett"])
    assert np.all(np.diff(br) > 0) and br[-1] > 10 * br[0]
    assert absorption([[7000, 4.2, 0]], ["brackett"])[0] > 100 * absorption(
        [[4500, 2.0, 0]], ["brackett"])[0]
    # in the full spectrum the Brackett line centres deepen with Teff: d flux / d Teff < 0
    wave = synthetic.apogee_grid()
    centres = [np.argmin(np.abs(wave - w)) for w in linelist.BRACKETT.values()
               if wave[0] < w < wave[-1] and np.min(np.abs(wave - w)) < 0.3]
    jac = synthetic.label_jacobian([[6500, 4.2, 0.0]])
    assert len(centres) >= 8 and np.all(jac[0, centres, 0] < 0)


def test_pressure_broadening_grows_with_log_g():
    """Stark wings of Brackett lines and damping wings of strong metal lines widen in dwarfs."""
    wave = synthetic.apogee_grid()
    near = np.zeros(wave.size, bool)
    for w in linelist.BRACKETT.values():
        near |= np.abs(wave - w) < 4.0
    stars = [[6000, 3.8, 0], [6000, 4.5, 0], [6800, 3.6, 0], [6800, 4.4, 0]]
    depth = 1.0 - synthetic.synthesize(stars, None, np.float64, ["brackett"])
    wing_fraction = depth[:, ~near].sum(axis=1) / depth.sum(axis=1)
    assert wing_fraction[1] > 1.25 * wing_fraction[0] and wing_fraction[3] > wing_fraction[2]
    coef = synthetic.coefficients(np.array([[5000, 2.5, 0], [5000, 4.5, 0]])).reshape(2, -1, 3)
    mg = linelist.GROUP_INDEX["mg"]
    damping = coef[:, mg, 2] / coef[:, mg, :2].sum(axis=1)
    assert damping[1] > 3 * damping[0]


def test_molecular_bands_in_cool_giants():
    co = ["co_low", "co_high"]
    cool_giant, cool_dwarf, sun = absorption([[4000, 1.5, 0], [4000, 4.7, 0], [5777, 4.44, 0]],
                                             co)
    assert cool_giant > 5 * sun and cool_giant > 3 * cool_dwarf
    teff = np.linspace(3800, 5600, 7)
    giants = np.column_stack([teff, 3.0 + (teff - 4800) / 480, np.zeros(7)])
    for groups in (co, ["oh"], ["cn"]):
        assert np.all(np.diff(absorption(giants, groups)) < 0), groups


def test_excitation_balance_with_teff():
    """Low-excitation lines weaken relative to high-excitation lines as Teff rises."""
    stars = np.array([[4000, 4.6, 0], [5000, 4.5, 0], [6000, 4.3, 0], [7000, 4.2, 0]])
    ratio = absorption(stars, ["fe_low"]) / absorption(stars, ["fe_high"])
    assert np.all(np.diff(ratio) < 0) and ratio[0] > 5 * ratio[-1]


def test_lines_grow_with_metallicity_through_a_curve_of_growth():
    feh = np.linspace(-2.5, 0.5, 13)
    for teff, logg in ((4500, 2.0), (5800, 4.4)):
        stars = np.column_stack([np.full(13, teff), np.full(13, logg), feh])
        assert np.all(np.diff(absorption(stars)) > 0)

    def slopes(star, group, h=1e-3):
        """d log(absorption) / d [Fe/H] over d log(line strength) / d [Fe/H]."""
        lo, hi = np.array([star]), np.array([star])
        lo[0, 2] -= h
        hi[0, 2] += h
        g = linelist.GROUP_INDEX[group]
        strength = [synthetic.coefficients(s)[0, 3 * g:3 * g + 2].sum() for s in (lo, hi)]
        ew = [absorption(s, [group])[0] for s in (lo, hi)]
        return np.log(ew[1] / ew[0]) / np.log(strength[1] / strength[0])

    assert slopes([5000.0, 2.5, -2.5], "fe_mid") == pytest.approx(1.0, abs=0.05)  # linear
    assert slopes([4200.0, 1.8, 0.3], "mg") < 0.5  # saturated


def test_cramer_rao_bound_matches_brute_force_fisher(rng):
    labels = STARS[:3]
    flux_err = rng.uniform(0.005, 0.02, (3, 7213))
    flux_err[0, :50] = 0.0  # bad pixels carry no information
    flux_err[1, 100] = np.inf
    crb = synthetic.cramer_rao_bound(labels, flux_err)
    assert crb.shape == (3, 3, 3)
    steps = [0.05, 1e-4, 1e-4]
    for n in range(3):  # explicit per-star loop, Jacobian by float64 central differences
        jac = np.empty((7213, 3))
        for j in range(3):
            up, down = labels[n].copy(), labels[n].copy()
            up[j] += steps[j]
            down[j] -= steps[j]
            jac[:, j] = (synthetic.synthesize(up, dtype=np.float64)[0]
                         - synthetic.synthesize(down, dtype=np.float64)[0]) / (2 * steps[j])
        good = np.isfinite(flux_err[n]) & (flux_err[n] > 0)
        fisher = jac[good].T @ np.diag(1.0 / flux_err[n, good] ** 2) @ jac[good]
        np.testing.assert_allclose(crb[n], np.linalg.inv(fisher), rtol=1e-5)
        assert np.all(np.linalg.eigvalsh(crb[n]) > 0)
    # the bound scales as flux_err**2
    np.testing.assert_allclose(synthetic.cramer_rao_bound(labels, 2 * flux_err), 4 * crb,
                               rtol=1e-10)


def test_any_grid_works_end_to_end(tmp_path):
    spectra = synthetic.generate(6, 3, wave=GRID_7214)
    assert spectra.flux.shape == (6, 7214) and spectra.wave.shape == (7214,)
    crb = synthetic.cramer_rao_bound(spectra.label_array(), spectra.flux_err, GRID_7214)
    assert crb.shape == (6, 3, 3) and np.all(np.isfinite(crb))
    write_spectra(tmp_path / "s.fits", spectra)
    back = read_spectra(tmp_path / "s.fits", require_labels=True)
    assert back.n_pixels == 7214
    np.testing.assert_array_equal(back.wave, GRID_7214)


def test_bad_labels_are_rejected():
    from pipeline.exceptions import DataError

    with pytest.raises(DataError, match="labels"):
        synthetic.synthesize([[np.nan, 4.0, 0.0]])
    with pytest.raises(DataError, match="labels"):
        synthetic.synthesize([[5000.0, 4.0]])
