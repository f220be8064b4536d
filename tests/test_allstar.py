"""allStar catalog ingest: the documented quality cuts on a hand-made allStar table, each
count checked against rows built to fail exactly one cut; the join into the canonical FITS."""

import logging

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from pipeline.config import validate
from pipeline.exceptions import ConfigError, DataError
from pipeline.spectra import allstar, apogee
from pipeline.spectra.bitmasks import ASPCAPFLAG, EXTRATARG, STARFLAG
from pipeline.spectra.fits import read_spectra
from pipeline.spectra.grids import GRIDS
from pipeline.steps import data as data_step
from tests.conftest import APSTAR_FILE

# id, STARFLAG bits, ASPCAPFLAG bits, SNR, (TEFF, LOGG, FE_H), EXTRATARG bits; DR17 bit
# numbers written out from the SDSS documentation, independently of pipeline.spectra.bitmasks
ROWS = [
    ("S0", [], [], 200.0, (4800.0, 2.5, -0.1), []),
    ("S1", [0], [], 150.0, (4700.0, 2.4, 0.0), []),          # BAD_PIXELS: starflag
    ("S2", [11], [], 120.0, (4900.0, 2.9, -0.3), []),        # PERSIST_LOW only: kept..
    ("S3", [], [23], 180.0, (5000.0, 3.1, -0.2), []),        # STAR_BAD: aspcapflag
    ("S4", [], [41, 0], 90.0, (4600.0, 2.2, 0.1), []),       # MULTIPLE_SUSPECT, TEFF_WARN: kept
    ("S5", [], [], 50.0, (4650.0, 2.3, 0.05), []),           # SNR < 70: snr
    ("S6", [], [], 140.0, (4750.0, 2.6, -9999.0), []),       # FE_H -9999: missing_labels
    ("S7", [], [], 140.0, (np.nan, 2.6, -0.4), []),          # TEFF NaN: missing_labels
    ("S0", [], [], 110.0, (4810.0, 2.5, -0.1), [4]),         # DUPLICATE: extratarg
    ("S2", [], [], 150.0, (4950.0, 3.0, -0.35), []),         # ..and this S2 wins: repeated_id
    ("S8", [22], [19], 20.0, (4400.0, 1.9, -0.6), []),       # RV_FAIL (+ M_H_BAD, low SNR)
    ("G0", [], [], 100.0, (4500.0, 2.0, -0.5), []),
    ("G1", [], [], 100.0, (5100.0, 3.4, 0.2), []),
    ("G2", [2], [7], 100.0, (5200.0, 3.6, -0.7), []),        # warnings only: kept
    ("G3", [], [], 100.0, (4550.0, 2.1, 0.3), []),
]
EXPECTED = {"rows": 15, "starflag": 2, "aspcapflag": 1, "snr": 1, "missing_labels": 2,
            "extratarg": 1, "repeated_id": 1, "kept": 7}
KEPT = {"S0": 4800.0, "S2": 4950.0, "S4": 4600.0, "G0": 4500.0, "G1": 5100.0, "G2": 5200.0,
        "G3": 4550.0}


def _bits(numbers):
    return int(sum(2**b for b in numbers))


def write_allstar(path, rows=ROWS, extratarg=True):
    table = Table()
    table["APOGEE_ID"] = [r[0] for r in rows]
    table["STARFLAG"] = np.array([_bits(r[1]) for r in rows], dtype=np.int64)
    table["ASPCAPFLAG"] = np.array([_bits(r[2]) for r in rows], dtype=np.uint64)
    table["SNR"] = np.array([r[3] for r in rows], dtype=np.float32)
    for j, name in enumerate(("TEFF", "LOGG", "FE_H")):
        table[name] = np.array([r[4][j] for r in rows], dtype=np.float32)
        table[f"{name}_ERR"] = np.full(len(rows), 0.05, dtype=np.float32)
    if extratarg:
        table["EXTRATARG"] = np.array([_bits(r[5]) for r in rows], dtype=np.int16)
    table["TELESCOPE"] = ["apo25m"] * len(rows)  # columns the reader does not need
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table)]).writeto(path)
    return path


@pytest.fixture
def opts():
    return validate({})["data"]["apstar"]["allstar"]


def test_bit_numbers_match_the_dr17_documentation():
    assert (STARFLAG["BAD_PIXELS"], STARFLAG["PERSIST_LOW"], STARFLAG["RV_FAIL"]) == (0, 11, 22)
    assert (ASPCAPFLAG["STAR_BAD"], ASPCAPFLAG["M_H_BAD"], ASPCAPFLAG["TEFF_BAD"],
            ASPCAPFLAG["NO_ASPCAP_RESULT"], ASPCAPFLAG["MULTIPLE_SUSPECT"]) == (23, 19, 16, 31, 41)
    assert EXTRATARG["DUPLICATE"] == 4


def test_default_cuts_give_the_documented_counts(tmp_path, opts, caplog):
    path = write_allstar(tmp_path / "allStar.fits")
    assert allstar.is_allstar(path)
    with caplog.at_level(logging.INFO, logger="pipeline.spectra.allstar"):
        table, counts = allstar.read_allstar(path, opts)
    assert counts == EXPECTED
    assert dict(zip(table["APOGEE_ID"], table["TEFF"], strict=True)) == KEPT
    assert ("15 rows; removed starflag 2, aspcapflag 1, snr 1, missing_labels 2, extratarg 1, "
            "repeated_id 1; kept 7") in caplog.text


def test_each_cut_is_configurable(tmp_path, opts):
    path = write_allstar(tmp_path / "allStar.fits")
    opts.update(starflag_bad=[], aspcapflag_bad=["STAR_BAD", "MULTIPLE_SUSPECT"], min_snr=0,
                drop_missing_labels=False, extratarg_bad=[])
    table, counts = allstar.read_allstar(path, opts)
    # S3 and S4 (its 64-bit flag, bit 41) cut; S1, S5, S6, S7, S8 kept; both S0 rows meet
    # at repeated_id, which keeps the SNR-200 one
    assert counts == {"rows": 15, "starflag": 0, "aspcapflag": 2, "snr": 0, "missing_labels": 0,
                      "extratarg": 0, "repeated_id": 2, "kept": 11}
    fe_h = dict(zip(table["APOGEE_ID"], table["FE_H"], strict=True))
    assert np.isnan(fe_h["S6"]) and fe_h["S0"] == pytest.approx(-0.1)
    assert table["SNR"][list(table["APOGEE_ID"]).index("S0")] == 200.0
    opts["aspcapflag_bad"] = ["STAR_BAD", "STAR_BADD"]
    with pytest.raises(ConfigError, match=r"data.apstar.allstar.aspcapflag_bad.*STAR_BADD"):
        allstar.read_allstar(path, opts)


def test_missing_extratarg_column_skips_that_cut(tmp_path, opts, caplog):
    path = write_allstar(tmp_path / "allStar.fits", extratarg=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.spectra.allstar"):
        _, counts = allstar.read_allstar(path, opts)
    assert counts["extratarg"] == 0 and counts["repeated_id"] == 2 and counts["kept"] == 7
    assert "no EXTRATARG column" in caplog.text


def test_allstar_errors_name_the_file_and_column(tmp_path, opts):
    table = Table({"APOGEE_ID": ["A"], "STARFLAG": [0], "ASPCAPFLAG": [0], "TEFF": [5000.0]})
    table.write(tmp_path / "short.fits")
    with pytest.raises(DataError, match=r"short.fits.*LOGG, FE_H, SNR"):
        allstar.read_allstar(tmp_path / "short.fits", opts)
    path = write_allstar(tmp_path / "allStar.fits", rows=ROWS[:2])
    opts["min_snr"] = 1000
    with pytest.raises(DataError, match="leave no star"):
        allstar.read_allstar(path, opts)
    (tmp_path / "plain.csv").write_text("APOGEE_ID,TEFF,LOGG,FE_H\nA,1,2,3\n")
    assert not allstar.is_allstar(tmp_path / "plain.csv")


def test_apstar_plus_allstar_gives_the_canonical_training_set(tmp_path):
    folder = tmp_path / "apstar"
    folder.mkdir()
    with fits.open(APSTAR_FILE) as hdul:
        for star in sorted({r[0] for r in ROWS}):
            hdul[0].header["OBJID"] = star
            hdul.writeto(folder / f"apStar-dr17-{star}.fits")
    catalog = write_allstar(tmp_path / "allStar-dr17-synspec_rev1.fits")
    cfg = validate({"data": {"source": "apstar", "grid": "apogee-dr17-7514",
                             "apstar": {"paths": [str(folder)], "catalog": str(catalog)},
                             "split": {"valid_fraction": 0.25, "test_fraction": 0.25}}})
    paths = data_step.write_datasets(cfg, tmp_path / "out")
    parts = [read_spectra(paths[s], require_labels=True) for s in ("train", "valid", "test")]
    ids = [star for part in parts for star in part.star_id]
    assert sorted(ids) == sorted(KEPT) and [p.n_stars for p in parts] == [3, 2, 2]
    for part in parts:
        assert part.n_pixels == GRIDS["apogee-dr17-7514"].n_pixels
        np.testing.assert_array_equal(part.wave, GRIDS["apogee-dr17-7514"].wave())
        for star, teff in zip(part.star_id, part.labels["TEFF"], strict=True):
            assert teff == KEPT[star]
    spectra = apogee.ingest([folder], catalog, GRIDS["apogee-7213"].wave(), cfg)
    assert spectra.n_pixels == 7213 and sorted(spectra.star_id) == sorted(KEPT)
