"""Canonical FITS: round trip with units and provenance, streaming writer, every bad input."""

import tracemalloc

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from pipeline.artifacts.provenance import provenance
from pipeline.exceptions import DataError, GridMismatchError
from pipeline.spectra import validation
from pipeline.spectra.dataset import Spectra
from pipeline.spectra.fits import SpectraWriter, read_spectra, write_spectra
from pipeline.spectra.validation import check_label_variance, match_grid

N, P = 6, 40


def make_spectra(n=N, p=P, seed=0) -> Spectra:
    rng = np.random.default_rng(seed)
    wave = np.linspace(15200.0, 16900.0, p)
    labels = Table({"STAR_ID": [f"S{i}" for i in range(n)], "TEFF": rng.uniform(4000, 6000, n),
                    "LOGG": rng.uniform(1, 5, n), "FE_H": rng.uniform(-1, 0.3, n),
                    "TEFF_ERR": np.full(n, 50.0), "SNR": rng.uniform(30, 300, n)})
    return Spectra(rng.uniform(0.5, 1.1, (n, p)).astype(np.float32),
                   np.full((n, p), 0.01, np.float32), wave, labels)


def hdus(spectra: Spectra) -> list:
    """Raw HDUs of ``spectra`` (bypasses write_spectra so tests can break anything)."""
    return [fits.PrimaryHDU(), fits.ImageHDU(spectra.flux, name="FLUX"),
            fits.ImageHDU(spectra.flux_err, name="FLUX_ERR"),
            fits.ImageHDU(spectra.wave, name="WAVE"),
            fits.BinTableHDU(spectra.labels, name="LABELS")]


def _drop(name):
    def edit(h):
        return [x for x in h if x.name != name]
    return edit


def _replace(name, data):
    def edit(h):
        return [fits.ImageHDU(data, name=name) if x.name == name else x for x in h]
    return edit


def _labels(table):
    def edit(h):
        return [fits.BinTableHDU(table, name="LABELS") if x.name == "LABELS" else x for x in h]
    return edit


def _flux_row(row, value):
    s = make_spectra()
    s.flux[row] = value
    return _replace("FLUX", s.flux)


_good = make_spectra()
_wave_unsorted = _good.wave.copy()
_wave_unsorted[[10, 11]] = _wave_unsorted[[11, 10]]
_wave_nan = _good.wave.copy()
_wave_nan[7] = np.nan
_dup = _good.labels.copy()
_dup["STAR_ID"][4] = "S1"
_no_id = _good.labels.copy()
_no_id.remove_column("STAR_ID")
_mostly_bad = _good.flux_err.copy()
_mostly_bad[3, : P // 2 + 2] = -1.0

# (id, edit of the HDU list, read_spectra keywords, message fragments)
BAD_INPUTS = [
    ("missing-hdu", _drop("FLUX_ERR"), {}, ["HDU 'FLUX_ERR' is missing"]),
    ("missing-column", _labels(_no_id), {}, ["lacks column 'STAR_ID'"]),
    ("missing-label", _labels(_good.labels[["STAR_ID", "TEFF", "LOGG"]]),
     {"require_labels": True}, ["lacks column 'FE_H'"]),
    ("err-shape", _replace("FLUX_ERR", _good.flux_err[:, :-1]), {}, ["'FLUX_ERR' has shape"]),
    ("wave-size", _replace("WAVE", _good.wave[:-3]), {}, ["'WAVE' has shape", f"({P},)"]),
    ("label-rows", _labels(_good.labels[:-1]), {}, ["'LABELS' has 5 rows", "6 spectra"]),
    ("wave-order", _replace("WAVE", _wave_unsorted), {}, ["not strictly increasing at pixel 11"]),
    ("wave-nan", _replace("WAVE", _wave_nan), {}, ["'WAVE' pixel 7", "finite"]),
    ("duplicate-id", _labels(_dup), {}, ["'S1' occurs 2 times", "rows [1, 4]"]),
    ("all-nan-row", _flux_row(2, np.nan), {}, ["row 2", "'S2'", "entirely NaN"]),
    ("all-inf-row", _flux_row(5, np.inf), {}, ["row 5", "entirely NaN or infinite"]),
    ("all-zero-row", _flux_row(1, 0.0), {}, ["row 1", "all zeros"]),
    ("bad-fraction", _replace("FLUX_ERR", _mostly_bad), {},
     ["row 3", "data.max_bad_pixel_fraction"]),
    ("empty", _replace("FLUX", np.zeros((0, P), np.float32)), {}, ["'FLUX' is empty"]),
]


def write_bad(path, edit):
    fits.HDUList(edit(hdus(make_spectra()))).writeto(path)


def test_round_trip_with_units_mask_and_provenance(tmp_path):
    spectra = make_spectra()
    spectra.mask = np.zeros((N, P), np.int32)
    spectra.mask[0, 3] = 4
    header = provenance({"seed": 3}, device="cpu", SOURCE="test")
    write_spectra(tmp_path / "a.fits", spectra, header)
    back = read_spectra(tmp_path / "a.fits", require_labels=True)
    expected = spectra.flux.copy()
    expected[0, 3] = 1.0  # masked pixel replaced
    np.testing.assert_array_equal(back.flux, expected)
    assert back.flux_err[0, 3] == 1.0e3 and back.meta["N_BADPIX"] == 1
    np.testing.assert_array_equal(back.wave, spectra.wave)
    np.testing.assert_array_equal(back.label_array(), spectra.label_array())
    assert list(back.star_id) == list(spectra.star_id)
    assert back.meta["SOURCE"] == "test" and back.meta["SEED"] == "3"
    assert back.meta["CFGHASH"] == header["CFGHASH"] and back.meta["NSTARS"] == N
    with fits.open(tmp_path / "a.fits") as hdul:
        assert hdul["WAVE"].header["BUNIT"] == "Angstrom"
        table = Table.read(hdul["LABELS"])
        assert str(table["TEFF"].unit) == "K" and str(table["TEFF_ERR"].unit) == "K"
        assert hdul["FLUX"].data.dtype.kind == "f" and hdul["FLUX"].data.itemsize == 4


def test_streaming_writer_equals_write_spectra(tmp_path):
    spectra = make_spectra(n=11)
    write_spectra(tmp_path / "a.fits", spectra)
    with SpectraWriter(tmp_path / "b.fits", spectra.wave, spectra.labels, {"X": 1}) as out:
        for start in range(0, 11, 4):
            out.write(start, spectra.flux[start:start + 4], spectra.flux_err[start:start + 4])
        out.set_card("NBADPIX", 5)
    a, b = read_spectra(tmp_path / "a.fits"), read_spectra(tmp_path / "b.fits")
    np.testing.assert_array_equal(a.flux, b.flux)
    np.testing.assert_array_equal(a.flux_err, b.flux_err)
    np.testing.assert_array_equal(a.wave, b.wave)
    assert list(a.labels["STAR_ID"]) == list(b.labels["STAR_ID"])
    assert b.meta["NBADPIX"] == 5 and b.meta["X"] == 1
    fits.open(tmp_path / "b.fits").verify("exception")


def test_incomplete_or_failing_writer_leaves_no_file(tmp_path):
    spectra = make_spectra()
    with pytest.raises(RuntimeError, match="row 2 was never written"):
        with SpectraWriter(tmp_path / "c.fits", spectra.wave, spectra.labels) as out:
            out.write(0, spectra.flux[:2], spectra.flux_err[:2])
    with pytest.raises(ValueError, match="boom"):
        with SpectraWriter(tmp_path / "d.fits", spectra.wave, spectra.labels):
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_bad_pixels_are_flagged_replaced_and_counted(tmp_path):
    spectra = make_spectra()
    spectra.flux[0, 0] = np.nan
    spectra.flux[1, 5] = np.inf
    spectra.flux_err[2, 7] = 0.0
    spectra.flux_err[3, 8] = -0.1
    spectra.flux_err[4, 9] = np.nan
    write_spectra(tmp_path / "a.fits", spectra)
    back = read_spectra(tmp_path / "a.fits", bad_pixel_err=77.0)
    bad = [(0, 0), (1, 5), (2, 7), (3, 8), (4, 9)]
    assert back.meta["N_BADPIX"] == 5
    for row, col in bad:
        assert back.flux[row, col] == 1.0 and back.flux_err[row, col] == 77.0
    assert np.all(np.isfinite(back.flux)) and np.all(back.flux_err > 0)


def _reference_flagging(flux, flux_err, mask, bad_pixel_err):
    """The whole-array formulas (N, P) that the chunked validation must reproduce."""
    bad = ~np.isfinite(flux_err) | ~(flux_err > 0) | ~np.isfinite(flux) | (mask != 0)
    flux, flux_err = flux.copy(), flux_err.copy()
    flux[bad], flux_err[bad] = 1.0, bad_pixel_err
    return flux, flux_err, int(bad.sum())


def test_chunked_flagging_equals_whole_array_reference(monkeypatch):
    monkeypatch.setattr(validation, "CHUNK_ROWS", 4)  # 23 rows: 5 full chunks and a partial
    spectra = make_spectra(n=23, seed=3)
    rng = np.random.default_rng(4)
    spectra.mask = np.zeros((23, P), np.int32)
    for target, value in ((spectra.flux, np.nan), (spectra.flux, np.inf),
                          (spectra.flux, -np.inf), (spectra.flux_err, 0.0),
                          (spectra.flux_err, -0.2), (spectra.flux_err, np.nan),
                          (spectra.flux_err, np.inf), (spectra.mask, 2)):
        target[rng.integers(0, 23, 12), rng.integers(0, P, 12)] = value
    expected = _reference_flagging(spectra.flux, spectra.flux_err, spectra.mask, 55.0)
    out = validation.flag_bad_pixels("x.fits", spectra, 55.0)
    np.testing.assert_array_equal(out.flux, expected[0])
    np.testing.assert_array_equal(out.flux_err, expected[1])
    assert out.meta["N_BADPIX"] == expected[2] > 60


def test_chunked_checks_name_first_row_count_all_and_change_nothing(monkeypatch):
    monkeypatch.setattr(validation, "CHUNK_ROWS", 4)
    spectra = make_spectra(n=23)
    spectra.flux[9] = 0.0
    spectra.flux[9, :5] = np.nan  # non-finite pixels count as zeros, as before chunking
    spectra.flux[17] = 0.0
    spectra.flux_err[2, 0] = -1.0  # a bad pixel that must stay untouched on failure
    before = spectra.flux.copy(), spectra.flux_err.copy()
    with pytest.raises(DataError, match=r"row 9 \(STAR_ID 'S9'\) is all zeros.*\(2 such rows\)"):
        validation.flag_bad_pixels("x.fits", spectra, 1e3)
    np.testing.assert_array_equal(spectra.flux, before[0])
    np.testing.assert_array_equal(spectra.flux_err, before[1])


def test_read_holds_one_copy_of_each_image(tmp_path, monkeypatch):
    """Peak of NumPy allocations while reading: FLUX + FLUX_ERR plus chunk temporaries (a
    whole-array read with (N, P) validation temporaries peaked at ~5.5 images)."""
    monkeypatch.setattr(validation, "CHUNK_ROWS", 256)
    spectra = make_spectra(n=4000, p=500)
    spectra.flux[::7, ::3] = np.nan  # bad pixels everywhere: the replacement pass runs too
    write_spectra(tmp_path / "a.fits", spectra)
    image = spectra.flux.nbytes
    tracemalloc.start()
    for rows in (None, slice(0, 4000)):
        tracemalloc.reset_peak()
        back = read_spectra(tmp_path / "a.fits", rows=rows)
        peak = tracemalloc.get_traced_memory()[1]
        assert back.meta["N_BADPIX"] == 572 * 167
        assert peak < 2.25 * image, (rows, peak / image)
        del back
    tracemalloc.stop()


def test_truncated_file_is_a_clear_error(tmp_path):
    write_spectra(tmp_path / "a.fits", make_spectra())
    data = (tmp_path / "a.fits").read_bytes()
    (tmp_path / "b.fits").write_bytes(data[: 2 * 2880 + 500])  # inside the FLUX data
    for rows in (None, slice(0, 2)):
        with pytest.raises(DataError, match=r"b.fits'.*not a readable FITS file.*6260 bytes"):
            read_spectra(tmp_path / "b.fits", rows=rows)


def test_row_slice_of_a_file_with_mask(tmp_path):
    # MASK is the last HDU here: the truncation check must count its data size in bytes
    spectra = make_spectra()
    spectra.mask = np.zeros((N, P), np.int32)
    spectra.mask[4, 2] = 1
    write_spectra(tmp_path / "a.fits", spectra)
    part = read_spectra(tmp_path / "a.fits", rows=slice(3, 5))
    assert part.meta["N_BADPIX"] == 1 and part.flux[1, 2] == 1.0
    np.testing.assert_array_equal(part.mask, spectra.mask[3:5])


def test_nan_labels_dropped_with_count_or_fail(tmp_path, caplog):
    spectra = make_spectra()
    spectra.labels["LOGG"][[1, 4]] = np.nan
    write_spectra(tmp_path / "a.fits", spectra)
    kept = read_spectra(tmp_path / "a.fits", require_labels=True, nan_labels="drop")
    assert list(kept.star_id) == ["S0", "S2", "S3", "S5"] and kept.flux.shape == (4, P)
    assert "dropping 2 stars with NaN labels" in caplog.text
    with pytest.raises(DataError, match=r"row 1 has a NaN label \(2 such rows\).*nan_labels"):
        read_spectra(tmp_path / "a.fits", require_labels=True, nan_labels="fail")


@pytest.mark.parametrize(("edit", "kwargs", "fragments"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_file_and_problem(tmp_path, edit, kwargs, fragments):
    path = tmp_path / "bad.fits"
    write_bad(path, edit)
    with pytest.raises(DataError) as info:
        read_spectra(path, **kwargs)
    assert str(path) in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("content", [b"", b"SIMPLE = not really a FITS file\n" * 100])
def test_not_fits_is_a_clear_error(tmp_path, content):
    path = tmp_path / "x.fits"
    path.write_bytes(content)
    with pytest.raises(DataError, match="not a readable FITS file"):
        read_spectra(path)
    with pytest.raises(DataError, match="does not exist"):
        read_spectra(tmp_path / "missing.fits")


def test_zero_variance_labels_are_an_error():
    spectra = make_spectra()
    check_label_variance(spectra)
    spectra.labels["FE_H"] = 0.0
    with pytest.raises(DataError, match="'FE_H' has zero variance"):
        check_label_variance(spectra, "train.fits")


def test_match_grid_same_slice_interpolate_or_refuse():
    rng = np.random.default_rng(2)
    wave = 10 ** (4.18 + 6e-6 * np.arange(300))
    flux = (1.0 + 0.1 * np.sin(wave / 20.0))[None].repeat(2, 0).astype(np.float64)
    err = rng.uniform(0.01, 0.02, (2, 300))
    labels = Table({"STAR_ID": ["a", "b"]})
    spectra = Spectra(flux, err, wave, labels)
    assert match_grid(spectra, wave.copy()) is spectra
    sliced = match_grid(spectra, wave[50:250])
    np.testing.assert_array_equal(sliced.flux, flux[:, 50:250])
    np.testing.assert_array_equal(sliced.flux_err, err[:, 50:250])
    shifted = 10 ** (4.18 + 6e-6 * (np.arange(200) + 40.3))  # 7214-like: any other grid
    resampled = match_grid(spectra, shifted)
    assert resampled.meta["RESAMPLD"] and resampled.flux.shape == (2, 200)
    truth = np.tile(1.0 + 0.1 * np.sin(shifted / 20.0), (2, 1))
    np.testing.assert_allclose(resampled.flux, truth, atol=2e-6)  # linear interpolation error
    np.testing.assert_allclose(resampled.flux[0], np.interp(shifted, wave, flux[0]), rtol=1e-12)
    reference = np.stack([np.interp(shifted, wave, e) for e in err])
    np.testing.assert_allclose(resampled.flux_err, reference, rtol=1e-12)
    with pytest.raises(GridMismatchError) as info:
        match_grid(spectra, 10 ** (4.179 + 6e-6 * np.arange(400)), path="in.fits")
    message = str(info.value)
    assert "in.fits" in message and "300 pixels" in message and "400 pixels" in message
    assert f"{wave[0]:.3f}" in message


def test_match_grid_marks_gap_and_bad_neighbours():
    wave = np.concatenate([np.linspace(15000, 15100, 101), np.linspace(15200, 15300, 101)])
    err = np.full((1, 202), 0.01)
    err[0, 20] = 1e3
    spectra = Spectra(np.ones((1, 202)), err, wave, Table({"STAR_ID": ["a"]}))
    target = np.linspace(15000.5, 15299.5, 300)
    out = match_grid(spectra, target, bad_pixel_err=1e3)
    in_gap = (target > 15100) & (target < 15200)
    assert np.all(out.flux_err[0, in_gap] == 1e3)
    assert out.flux_err[0, np.argmin(np.abs(target - 15020.5))] == 1e3
    assert out.meta["N_BADPIX"] == in_gap.sum() + 2
