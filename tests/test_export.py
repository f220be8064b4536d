"""Catalog columns, units, descriptions and provenance in FITS, Parquet and CSV; atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table

from pipeline import LABELS
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
            export.FLAG_MODEL_OOD, export.FLAG_SPECTRUM_OOD, export.FLAG_FEATURE_OOD,
            export.FLAG_BROADBAND_OOD, export.FLAG_PEAK_OOD, export.FLAG_DOPPLER_OOD,
            export.FLAG_LSF_OOD, export.FLAG_LINES_OOD]
    assert bits == [1 << bit for bit in range(12)]
    # every documented bit has its constant, and there are no others
    assert sorted(export.FLAG_BITS) == list(range(len(bits)))
    for bit, text in export.FLAG_BITS.items():
        assert getattr(export, "FLAG_" + text.split(":")[0]) == 1 << bit
    assert sorted(n for n in vars(export) if n.startswith("FLAG_") and n != "FLAG_BITS") == \
        sorted("FLAG_" + text.split(":")[0] for text in export.FLAG_BITS.values())


def _chunks(budget, rng):
    """Three catalog chunks whose STAR_IDs differ in width (the widest in the last) and carry
    every optional column, and the whole catalog they make."""
    from astropy.table import vstack

    ids = [["a", "bb"], ["ccc"], ["dddd", "e", "ffffffffff"]]
    chunks, start = [], 0
    for names in ids:
        rows = slice(start, start + len(names))
        part = {k: v if k == "scatter" else v[rows] for k, v in budget.items()}
        shift = {k: rng.random(len(names)) for k in (*export.SHIFT_COLUMNS,
                                                     *(f"{lab}_EMULATOR" for lab in LABELS))}
        chunks.append(export.catalog_table(names, part, np.arange(len(names)) + start,
                                           true_labels=rng.normal(size=(len(names), 3)),
                                           snr=rng.uniform(10, 200, len(names)), shift=shift))
        start += len(names)
    return chunks, vstack(chunks, metadata_conflicts="silent")


@pytest.fixture
def budget6(budget):
    return {k: v if k == "scatter" else np.concatenate([v, v[:1]]) for k, v in budget.items()}


def test_streamed_catalog_is_the_whole_table_writer_output(budget6, rng, tmp_path):
    """Chunk by chunk gives the files write_table gives for the whole table: FITS byte for
    byte (same header cards, string column as wide as the widest STAR_ID of any chunk), the
    same Parquet table and metadata, the same CSV text."""
    chunks, whole = _chunks(budget6, rng)
    header = provenance({"seed": 3}, device="CPU", timestamp=False, nstars=len(whole))
    reference = export.write_table(whole, tmp_path / "whole", header)
    with export.StreamingTableWriter(tmp_path / "streamed") as out:
        for chunk in chunks:
            out.write(chunk)
        assert not (tmp_path / "streamed.fits").exists()  # nothing final before finish
        streamed = out.finish(header)
    assert [p.name for p in streamed] == ["streamed.fits", "streamed.parquet", "streamed.csv"]
    assert out.n_rows == 6
    assert streamed[0].read_bytes() == reference[0].read_bytes()
    assert streamed[2].read_text() == reference[2].read_text()
    got, want = (pq.read_table(p) for p in (streamed[1], reference[1]))
    assert got.equals(want)
    assert got.schema.metadata == want.schema.metadata
    assert got.schema.types == want.schema.types  # e.g. large_string, not string
    files = [pq.ParquetFile(p).metadata.metadata for p in (streamed[1], reference[1])]
    assert files[0].keys() == files[1].keys()
    assert pq.ParquetFile(streamed[1]).num_row_groups == 3  # really written chunk by chunk
    table = Table.read(streamed[0], hdu="CATALOG")
    assert list(table["STAR_ID"]) == ["a", "bb", "ccc", "dddd", "e", "ffffffffff"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in streamed] + [p.name for p in reference])  # no spool left


def test_streamed_fits_alone_with_date_cards(budget6, rng, tmp_path):
    """FITS only (rows spooled to a temporary Parquet, removed): the same header as the whole
    table writer's apart from the DATE card, the same data."""
    chunks, whole = _chunks(budget6, rng)
    reference = export.write_table(whole, tmp_path / "whole", provenance(), formats=("fits",),
                                   extname="SUMMARY")
    with export.StreamingTableWriter(tmp_path / "s", formats=("fits",), extname="SUMMARY") as out:
        for chunk in chunks:
            out.write(chunk)
        out.finish(provenance())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.fits", "whole.fits"]
    with fits.open(reference[0]) as want, fits.open(tmp_path / "s.fits") as got:
        assert len(got) == len(want) == 2
        for g, w in zip(got, want, strict=True):
            cards = [(c.keyword, c.value, c.comment) for c in g.header.cards
                     if c.keyword != "DATE"]
            assert cards == [(c.keyword, c.value, c.comment) for c in w.header.cards
                             if c.keyword != "DATE"]
        assert got["SUMMARY"].data.tobytes() == want["SUMMARY"].data.tobytes()


def test_streamed_writer_failures_leave_no_file(budget6, rng, tmp_path, monkeypatch):
    chunks, _ = _chunks(budget6, rng)
    with pytest.raises(RuntimeError, match="without finish"):
        with export.StreamingTableWriter(tmp_path / "a") as out:
            out.write(chunks[0])
    with pytest.raises(ValueError, match="boom"):
        with export.StreamingTableWriter(tmp_path / "b") as out:
            out.write(chunks[0])
            raise ValueError("boom")
    with pytest.raises(export.DataError, match="differ from the first chunk"):
        with export.StreamingTableWriter(tmp_path / "c") as out:
            out.write(chunks[0])
            out.write(chunks[1][["STAR_ID", "TEFF"]])
    with pytest.raises(export.DataError, match="no rows"):
        with export.StreamingTableWriter(tmp_path / "d") as out:
            out.finish({})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fits.StreamingHDU, "write", disk_full)
    from pipeline.exceptions import OutputError

    with pytest.raises(OutputError, match=r"e\.fits' failed: No space left"):
        with export.StreamingTableWriter(tmp_path / "e") as out:
            out.write(chunks[0])
            out.finish({})
    assert list(tmp_path.iterdir()) == []
