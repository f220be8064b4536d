"""Named wavelength grids: pixel counts and chip edges (astroNN's chips_pix_info numbers and
the seed network's 7213-pixel grid written out here), the synthetic data on each grid, and
every shipped real apStar file detected and read onto each grid without a format."""

import numpy as np
import pytest

from pipeline.config import validate
from pipeline.exceptions import ConfigError, GridMismatchError
from pipeline.spectra import synthetic
from pipeline.spectra.fits import read_spectra, write_spectra
from pipeline.spectra.grids import GRIDS, grid_wave
from pipeline.spectra.inputs import detect_format, load_input
from pipeline.steps import data as data_step
from tests.conftest import REPO

# name: (pixels, chip [start, stop) edges on the 8575-pixel apStar grid)
EXPECTED = {
    "apogee-7213": (7213, ((322, 3242), (3648, 6048), (6412, 8305))),
    "apogee-dr12-7214": (7214, ((322, 3242), (3648, 6048), (6412, 8306))),
    "apogee-dr17-7514": (7514, ((246, 3274), (3585, 6080), (6344, 8335))),
}
SHIPPED = sorted((REPO / "data").glob("apStar-*.fits"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_grid_pixels_and_chip_edges(name):
    n_pixels, chips = EXPECTED[name]
    grid = GRIDS[name]
    assert grid.n_pixels == n_pixels == sum(b - a for a, b in chips)
    wave = grid.wave()
    assert wave.size == n_pixels and np.all(np.diff(wave) > 0)
    # chip edges from the wavelengths alone: a log step > 1.5 x the pixel step is a gap
    log_step = np.diff(np.log10(wave))
    gaps = np.flatnonzero(log_step > 1.5 * 6e-6) + 1
    starts = np.concatenate([[0], gaps])
    stops = np.concatenate([gaps, [wave.size]])
    pixel = np.rint((np.log10(wave) - 4.179) / 6e-6).astype(int)  # apStar pixel number
    assert list(zip(pixel[starts], pixel[stops - 1] + 1, strict=True)) == list(chips)
    assert wave[0] == pytest.approx(10 ** (4.179 + 6e-6 * chips[0][0]), rel=1e-12)


def test_full_grid_and_default():
    assert GRIDS["apstar-8575"].n_pixels == 8575
    np.testing.assert_array_equal(GRIDS["apstar-8575"].wave(), synthetic.apstar_wave())
    cfg = validate({})
    assert cfg["data"]["grid"] == "apogee-7213"
    np.testing.assert_array_equal(grid_wave(cfg), synthetic.apogee_grid())
    with pytest.raises(ConfigError, match=r"data.grid.*apogee-dr17-7514"):
        validate({"data": {"grid": "apogee-dr16"}})


@pytest.mark.parametrize("name", ["apogee-dr12-7214", "apogee-dr17-7514"])
def test_synthetic_data_follow_the_grid(tmp_path, name):
    cfg = validate({"seed": 3, "data": {"grid": name, "n_train": 6, "n_valid": 3,
                                        "n_test": 3}})
    paths = data_step.write_datasets(cfg, tmp_path)
    train = read_spectra(paths["train"], require_labels=True)
    assert train.flux.shape == (6, EXPECTED[name][0])  # the network's input size
    np.testing.assert_array_equal(train.wave, GRIDS[name].wave())
    assert train.meta["GRID"] == name
    # the noise pattern finds the three chips of this grid
    pattern = synthetic.error_pattern(train.wave)
    edges = np.cumsum([b - a for a, b in EXPECTED[name][1]])[:-1]
    assert np.all(pattern[edges] > 1.2 * np.median(pattern))  # noisier at chip edges


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_real_files_are_detected_and_read_without_a_format(path):
    assert SHIPPED, "no real apStar file shipped in data/"
    assert detect_format(path) == "apstar"
    cfg = validate({})
    for name, grid in GRIDS.items():
        spectra, resampled = load_input(path, None, grid.wave(), cfg)
        assert spectra.flux.shape == (1, grid.n_pixels) and not resampled, name
        good = spectra.flux_err[0] < cfg["data"]["bad_pixel_err"]
        assert 0.8 < good.mean() <= 1.0 and np.isfinite(spectra.flux).all()


def test_canonical_inputs_serve_a_model_only_where_its_grid_is_covered(tmp_path):
    """A dataset FITS on the DR17 grid feeds a 7213-pixel model by exact slicing; one on the
    7213 grid cannot feed a 7514-pixel model (its first and last pixels lie outside)."""
    cfg = validate({})
    wide, narrow = GRIDS["apogee-dr17-7514"].wave(), GRIDS["apogee-7213"].wave()
    for name, wave in (("wide", wide), ("narrow", narrow)):
        write_spectra(tmp_path / f"{name}.fits", synthetic.generate(4, 5, wave=wave))
    sliced, resampled = load_input(tmp_path / "wide.fits", None, narrow, cfg)
    full, _ = load_input(tmp_path / "wide.fits", None, wide, cfg)
    assert not resampled and sliced.n_pixels == 7213
    np.testing.assert_array_equal(sliced.flux, full.flux[:, np.searchsorted(wide, narrow)])
    with pytest.raises(GridMismatchError, match="narrow.fits"):
        load_input(tmp_path / "narrow.fits", None, wide, cfg)
