"""Catalog columns, units, descriptions and provenance in FITS, Parquet and CSV; atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table

from pipeline.artifacts import catalog as export
from pipeline.artifacts.provenance import provenance

CATALOG_COLUMNS = [
    "STAR_ID",
    "TEFF", "TEFF_ERR", "TEFF_ERR_MODEL", "TEFF_ERR_NOISE", "TEFF_ERR_SCATTER",
    "LOGG", "LOGG_ERR", "LOGG_ERR_MODEL", "LOGG_ERR_NOISE", "LOGG_ERR_SCATTER",
    "FE_H", "FE_H_ERR", "FE_H_ERR_MODEL", "FE_H_ERR_NOISE", "FE_H_ERR_SCATTER",
    "TEFF_LOGG_CORR", "TEFF_FE_H_CORR", "LOGG_FE_H_CORR",
]


def random_spd(rng, n, scale):
    a = rng.normal(size=(n, 3, 3)) * scale[:, None]
    return a @ a.transpose(0, 2, 1)


@pytest.fixture
def budget(rng):
    scale = np.array([100.0, 0.2, 0.05])
    model, noise = random_spd(rng, 5, scale), random_spd(rng, 5, scale)
    scatter = np.diag(scale**2)
    return {"prediction": rng.normal(size=(5, 3)) * scale + [5000, 3, 0], "model": model,
            "scatter": scatter, "noise": noise, "total": model + scatter + noise}


def test_catalog_columns_values_and_units(budget, rng):
    truth = rng.normal(size=(5, 3))
    flags = np.array([0, 1, 2, 4, 9])
    table = export.catalog_table([f"s{i}" for i in range(5)], budget, flags,
                                 true_labels=truth, snr=np.arange(5.0))
    assert table.colnames == CATALOG_COLUMNS + ["TEFF_TRUE", "LOGG_TRUE", "FE_H_TRUE", "SNR",
                                                "FLAG"]
    np.testing.assert_array_equal(table["LOGG"], budget["prediction"][:, 1])
    np.testing.assert_allclose(table["FE_H_ERR"] ** 2, budget["total"][:, 2, 2], rtol=1e-14)
    np.testing.assert_allclose(table["TEFF_ERR_MODEL"] ** 2, budget["model"][:, 0, 0],
                               rtol=1e-14)
    np.testing.assert_allclose(table["LOGG_ERR_NOISE"] ** 2, budget["noise"][:, 1, 1],
                               rtol=1e-14)
    np.testing.assert_allclose(table["FE_H_ERR_SCATTER"], 0.05, rtol=1e-14)
    tot = budget["total"]
    np.testing.assert_allclose(table["TEFF_FE_H_CORR"],
                               tot[:, 0, 2] / np.sqrt(tot[:, 0, 0] * tot[:, 2, 2]), rtol=1e-13)
    # the three budget parts add up to the total in quadrature
    parts = sum(table[f"TEFF_ERR_{p}"] ** 2 for p in ("MODEL", "NOISE", "SCATTER"))
    np.testing.assert_allclose(parts, table["TEFF_ERR"] ** 2, rtol=1e-12)
    np.testing.assert_array_equal(table["LOGG_TRUE"], truth[:, 1])
    assert str(table["TEFF_ERR"].unit) == "K"
    assert table["FE_H"].unit is None and "dex" in table["FE_H"].description
    assert table["FLAG"].dtype == np.int32
    plain = export.catalog_table(["a"] * 5, budget, np.zeros(5))
    assert plain.colnames == CATALOG_COLUMNS + ["FLAG"]


def test_written_formats_agree_and_carry_provenance(budget, tmp_path):
    table = export.catalog_table([f"s{i}" for i in range(5)], budget, np.arange(5))
    header = provenance({"seed": 3}, device="CPU", input="x.fits")
    paths = export.write_table(table, tmp_path / "cat", header)
    assert [p.name for p in paths] == ["cat.fits", "cat.parquet", "cat.csv"]
    with fits.open(tmp_path / "cat.fits") as hdul:
        assert hdul[0].header["CFGHASH"] == header["CFGHASH"]
        assert hdul["CATALOG"].header["DEVICE"] == "CPU"
        assert hdul["CATALOG"].header["TUNIT2"] == "K"
        assert "dex" in hdul["CATALOG"].header.comments["TTYPE12"]
        assert hdul["CATALOG"].header["TCOMM16"].endswith("[dex]")  # FE_H_ERR_SCATTER, in full
    from_fits = Table.read(tmp_path / "cat.fits", hdu="CATALOG")
    from_parquet = pd.read_parquet(tmp_path / "cat.parquet")
    from_csv = pd.read_csv(tmp_path / "cat.csv")
    for frame in (from_parquet, from_csv):
        assert list(frame.columns) == table.colnames
    for name in ("TEFF", "FE_H_ERR", "LOGG_FE_H_CORR"):
        np.testing.assert_array_equal(from_fits[name], table[name])
        np.testing.assert_array_equal(from_parquet[name], table[name])
        np.testing.assert_allclose(from_csv[name], table[name], rtol=1e-9)
    meta = pq.read_schema(tmp_path / "cat.parquet").metadata
    assert json.loads(meta[b"provenance"])["CFGHASH"] == header["CFGHASH"]
    assert json.loads(meta[b"units"])["TEFF"] == "K"
    assert "dex" in json.loads(meta[b"descriptions"])["FE_H"]


def test_failed_write_leaves_no_file(budget, tmp_path, monkeypatch):
    table = export.catalog_table(["a"] * 5, budget, np.zeros(5))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_csv", broken)
    with pytest.raises(OSError):
        export.write_table(table, tmp_path / "cat", {})
    assert list(tmp_path.iterdir()) == []


def test_flag_bits_are_distinct_powers_of_two():
    bits = [export.FLAG_OOD, export.FLAG_BADPIX, export.FLAG_RESAMPLED, export.FLAG_NONFINITE,
            export.FLAG_MODEL_OOD, export.FLAG_SPECTRUM_OOD, export.FLAG_FEATURE_OOD]
    assert bits == [1, 2, 4, 8, 16, 32, 64]
    # every documented bit has its constant, and there are no others
    assert sorted(export.FLAG_BITS) == list(range(len(bits)))
    for bit, text in export.FLAG_BITS.items():
        assert getattr(export, "FLAG_" + text.split(":")[0]) == 1 << bit
    assert sorted(n for n in vars(export) if n.startswith("FLAG_") and n != "FLAG_BITS") == \
        sorted("FLAG_" + text.split(":")[0] for text in export.FLAG_BITS.values())
