"""Catalog and table writers: FITS (units + provenance header), Parquet (schema metadata), CSV.

The prediction catalog (docs/outputs.md) has one row per star:

    STAR_ID
    L, L_ERR, L_ERR_MODEL, L_ERR_NOISE, L_ERR_SCATTER     for L in TEFF, LOGG, FE_H
    L_ERR_ENSEMBLE                                           ensembles only: between-member std
    TEFF_LOGG_CORR, TEFF_FE_H_CORR, LOGG_FE_H_CORR          correlations of the total covariance
    L_TRUE                                                   when the input had labels
    SNR                                                      when the input had it
    CHI2_EMULATOR(_REL), CHI2_BROADBAND(_REL), CHI2_PEAK(_REL), CHI2_DOPPLER(_REL),
    CHI2_LSF(_REL), CHI2_LINES(_REL), LINES_LIMIT,
    FEATURE_DISTANCE                                         shift statistics (SHIFT_COLUMNS)
    L_EMULATOR                                               the emulator's best-fit labels
    FLAG                                                     bit field (FLAG_BITS)

'dex' is not a FITS unit, so columns in dex or log10(cm s-2) carry their unit in the column
description (the TTYPE comment in FITS) instead of a unit astropy would warn about.
"""

from __future__ import annotations

import base64
import contextlib
import json
from itertools import combinations
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.table import Table

from pipeline import LABEL_UNITS, LABELS
from pipeline.artifacts.atomic import atomic_path, write_failed
from pipeline.exceptions import DataError

TABLE_FORMATS = ("fits", "parquet", "csv")

FLAG_BITS = {
    0: "OOD: prediction outside the training label range by more than predict.ood_sigma "
       "training standard deviations",
    1: "BADPIX: more than predict.flag_bad_pixel_fraction of the pixels are bad",
    2: "RESAMPLED: the input was interpolated onto the model's wavelength grid",
    3: "NONFINITE: the prediction or its covariance is not finite",
    4: "MODEL_OOD: the model (epistemic) error exceeds predict.ood_model_factor times the 99th "
       "percentile of the training stars' model errors",
    5: "SPECTRUM_OOD: CHI2_EMULATOR_REL exceeds its validation emulator.chi2_quantile: no "
       "labels of the training set reproduce this spectrum",
    6: "FEATURE_OOD: FEATURE_DISTANCE exceeds its validation emulator.feature_quantile: the "
       "network's last hidden features lie outside the training cloud",
    7: "BROADBAND_OOD: CHI2_BROADBAND_REL exceeds its validation emulator.chi2_quantile: the "
       "spectrum's broadband shape (continuum level, tilt) matches no emulated spectrum",
    8: "PEAK_OOD: CHI2_PEAK_REL exceeds its validation emulator.chi2_quantile: a narrow "
       "feature (an emission line, an artefact) that no emulated spectrum has",
    9: "DOPPLER_OOD: CHI2_DOPPLER_REL exceeds its validation emulator.chi2_quantile: the lines "
       "sit off their emulated positions (an unremoved radial velocity, a wavelength error)",
    10: "LSF_OOD: CHI2_LSF_REL exceeds its validation emulator.chi2_quantile: the lines are "
        "wider or narrower than emulated (another line-spread function or resolution)",
    11: "LINES_OOD: CHI2_LINES_REL exceeds its validation emulator.chi2_quantile: all lines "
        "are stronger or weaker together than any labels of the training set make them",
}
(FLAG_OOD, FLAG_BADPIX, FLAG_RESAMPLED, FLAG_NONFINITE, FLAG_MODEL_OOD, FLAG_SPECTRUM_OOD,
 FLAG_FEATURE_OOD, FLAG_BROADBAND_OOD, FLAG_PEAK_OOD, FLAG_DOPPLER_OOD,
 FLAG_LSF_OOD, FLAG_LINES_OOD) = (1 << bit for bit in FLAG_BITS)

SHIFT_COLUMNS = {
    "CHI2_EMULATOR": "chi^2 per good pixel of the spectrum against the label -> flux emulator "
                     "at its best-fit labels, L_EMULATOR (flux errors + emulator scatter)",
    "CHI2_EMULATOR_REL": "CHI2_EMULATOR divided by the validation median at the star's SNR",
    "CHI2_BROADBAND": "chi^2 against the emulator at L_EMULATOR with the residuals summed over "
                      "windows of emulator.broadband_width pixels first (about 1 for noise)",
    "CHI2_BROADBAND_REL": "CHI2_BROADBAND divided by the validation median at the star's SNR",
    "CHI2_PEAK": "largest chi^2 against the emulator at L_EMULATOR of the residuals summed "
                 "over a window of emulator.peak_width pixels",
    "CHI2_PEAK_REL": "CHI2_PEAK divided by the validation median at the star's SNR",
    "CHI2_DOPPLER": "squared significance of the residuals against the emulator at L_EMULATOR "
                    "along the emulated spectrum's first derivative (a shift of the lines)",
    "CHI2_DOPPLER_REL": "CHI2_DOPPLER divided by the validation median at the star's SNR",
    "CHI2_LSF": "squared significance of the residuals against the emulator at L_EMULATOR "
                "along the emulated spectrum's second derivative (a change of line width)",
    "CHI2_LSF_REL": "CHI2_LSF divided by the validation median at the star's SNR",
    "CHI2_LINES": "squared significance of the residuals against the emulator at L_EMULATOR "
                  "along m ln m (every line's optical depth scaled alike), m the emulated "
                  "spectrum, with the part the labels explain removed",
    "CHI2_LINES_REL": "CHI2_LINES divided by the validation median at the star's SNR",
    "LINES_LIMIT": "smallest fractional change of every line's optical depth alike (either "
                   "sign) whose expected CHI2_LINES_REL reaches its flag threshold in this "
                   "star (bit 11 catches about half such stars): a smaller line-list or "
                   "abundance-pattern error goes unseen",
    "FEATURE_DISTANCE": "Mahalanobis distance of the last-hidden-layer features from the "
                        "training features, sqrt(D^2 / d) (about 1 in distribution)",
}
"""Label-free shift statistics (pipeline.evaluation.shift) and the line-strength statistic's
detection limit, dimensionless."""

_BUDGET_SUFFIX = {"model": "_ERR_MODEL", "noise": "_ERR_NOISE", "scatter": "_ERR_SCATTER"}
_DESCRIPTION = {
    "": "predicted {label}",
    "_ERR": "total 1-sigma error of {label}",
    "_ERR_MODEL": "model (Laplace, epistemic) 1-sigma error of {label}",
    "_ERR_NOISE": "flux noise propagated through the input Jacobian, 1-sigma, {label}",
    "_ERR_SCATTER": "fitted scatter (aleatoric) 1-sigma of {label}",
    "_TRUE": "true (input) {label}",
    "_EMULATOR": "{label} that best fit the spectrum with the label -> flux emulator (from the "
                 "prediction, within the training range; the labels of CHI2_EMULATOR)",
    "_ERR_ENSEMBLE": "spread of the ensemble members' predictions (between-member 1-sigma, "
                     "part of the model error) of {label}",
}


def correlations(cov: np.ndarray) -> np.ndarray:
    """Correlation matrices (..., 3, 3) of covariances (..., 3, 3); NaN where a variance is 0."""
    std = np.sqrt(np.einsum("...ii->...i", cov))
    with np.errstate(divide="ignore", invalid="ignore"):
        return cov / (std[..., :, None] * std[..., None, :])


FITS_UNITS = {"TEFF": u.K}
"""Label units FITS knows; the others ('dex', 'log10(cm s-2)') go into the description."""


def describe_label_column(column, label: str, description: str, per: str = "") -> None:
    """Unit and description of a column in units of ``label`` (``per``: e.g. ' per unit
    normalized flux'): the astropy unit where FITS has one, the unit text always at the end
    of the description (pipeline.LABEL_UNITS)."""
    column.description = f"{description} [{LABEL_UNITS[label]}{per}]"
    if label in FITS_UNITS:
        column.unit = FITS_UNITS[label]


def set_label_column(table: Table, name: str, label: str, values: np.ndarray,
                     kind: str) -> None:
    """Add float64 column ``name`` with the unit (or unit text) of ``label``."""
    table[name] = np.asarray(values, np.float64)
    describe_label_column(table[name], label, _DESCRIPTION[kind].format(label=label))


def catalog_table(star_id, budget: dict, flags: np.ndarray, *, true_labels=None,
                  snr=None, shift: dict | None = None) -> Table:
    """The prediction catalog (see module docstring) from an ``error_budget`` result.

    Parameters
    ----------
    star_id : (N,) identifiers.
    budget : dict from ``pipeline.laplace.error_budget.error_budget`` or
        ``pipeline.laplace.ensemble.ensemble_budget`` (physical units).
    flags : (N,) int FLAG bit field.
    true_labels : optional (N, 3) input labels (NaN where unknown).
    snr : optional (N,) signal-to-noise ratio.
    shift : optional dict of (N,) arrays keyed by the names of SHIFT_COLUMNS and
        ``L_EMULATOR`` for L in LABELS.
    """
    table = Table()
    table["STAR_ID"] = np.asarray(star_id).astype(str)
    table["STAR_ID"].description = "star identifier (from the input)"
    scatter = np.broadcast_to(budget["scatter"], budget["total"].shape)
    for j, label in enumerate(LABELS):
        set_label_column(table, label, label, budget["prediction"][:, j], "")
        set_label_column(table, f"{label}_ERR", label, np.sqrt(budget["total"][:, j, j]), "_ERR")
        for part, suffix in _BUDGET_SUFFIX.items():
            cov = scatter if part == "scatter" else budget[part]
            set_label_column(table, label + suffix, label, np.sqrt(cov[:, j, j]), suffix)
        if "ensemble" in budget:  # pipeline.laplace.ensemble
            set_label_column(table, f"{label}_ERR_ENSEMBLE", label,
                             np.sqrt(budget["ensemble"][:, j, j]), "_ERR_ENSEMBLE")
    corr = correlations(budget["total"])
    for i, j in combinations(range(len(LABELS)), 2):
        name = f"{LABELS[i]}_{LABELS[j]}_CORR"
        table[name] = corr[:, i, j]
        table[name].description = f"correlation of {LABELS[i]} and {LABELS[j]} errors (total)"
    if true_labels is not None:
        for j, label in enumerate(LABELS):
            set_label_column(table, f"{label}_TRUE", label, true_labels[:, j], "_TRUE")
    if snr is not None:
        table["SNR"] = np.asarray(snr, np.float64)
        table["SNR"].description = "signal-to-noise ratio per pixel (from the input)"
    for name, description in SHIFT_COLUMNS.items() if shift is not None else ():
        table[name] = np.asarray(shift[name], np.float64)
        table[name].description = description
    for label in LABELS if shift is not None else ():
        set_label_column(table, f"{label}_EMULATOR", label, shift[f"{label}_EMULATOR"],
                         "_EMULATOR")
    table["FLAG"] = np.asarray(flags, np.int32)
    table["FLAG"].description = "bit field: " + "; ".join(
        f"bit {bit} {text.split(':')[0]}" for bit, text in FLAG_BITS.items())
    return table


# ------------------------------------------------------------------------------- writers
def fits_hdulist(table: Table, header: dict, extname: str) -> fits.HDUList:
    """Primary HDU with ``header`` cards + a BinTable whose TTYPE comments hold descriptions."""
    primary = fits.PrimaryHDU()
    for key, value in header.items():
        primary.header[key] = value
    hdu = fits.table_to_hdu(table)
    hdu.name = extname
    for i, name in enumerate(table.colnames, start=1):
        description = table[name].description
        if description:
            # the TTYPE comment shows in every FITS viewer; the full text goes to TCOMMn
            # (HEASARC convention), as the comment may be cut to fit the 80-character card
            room = 80 - len(f"TTYPE{i:<3d}= '{name}'".ljust(30)) - 3
            hdu.header.comments[f"TTYPE{i}"] = description[:room]
            hdu.header[f"TCOMM{i}"] = description
    for key, value in header.items():
        hdu.header[key] = value
    return fits.HDUList([primary, hdu])


def write_parquet(table: Table, path: Path, header: dict) -> None:
    """Parquet with provenance, units and descriptions in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table.to_pandas(index=False), preserve_index=False)
    meta = dict(arrow.schema.metadata or {})
    meta[b"provenance"] = json.dumps(header).encode()
    meta.update(column_metadata(table))
    pq.write_table(arrow.replace_schema_metadata(meta), path)


def column_metadata(table: Table) -> dict[bytes, bytes]:
    """Parquet schema metadata of the columns: JSON ``units`` and ``descriptions``."""
    return {b"units": json.dumps({c: str(table[c].unit) for c in table.colnames
                                  if table[c].unit is not None}).encode(),
            b"descriptions": json.dumps({c: table[c].description for c in table.colnames
                                         if table[c].description}).encode()}


def write_csv(table: Table, path, header: bool = True) -> None:
    """CSV of ``table`` to a path or an open text file (``header``: the column-name line)."""
    table.to_pandas(index=False).to_csv(path, index=False, header=header,
                                        float_format="%.10g")


def write_table(table: Table, stem: str | Path, header: dict, *,
                formats=TABLE_FORMATS, extname: str = "CATALOG") -> list[Path]:
    """Write ``table`` as ``stem.{fits,parquet,csv}``, all atomically.

    Every file is first written under a temporary name; the final names appear only after all
    formats were written, so a failure leaves none of them looking complete.
    """
    stem = Path(stem)
    paths = [stem.with_name(f"{stem.name}.{fmt}") for fmt in formats]
    with contextlib.ExitStack() as stack:
        for fmt, path in zip(formats, paths, strict=True):
            tmp = stack.enter_context(atomic_path(path))
            if fmt == "fits":
                fits_hdulist(table, header, extname).writeto(tmp, overwrite=True)
            elif fmt == "parquet":
                write_parquet(table, tmp, header)
            elif fmt == "csv":
                write_csv(table, tmp)
            else:
                raise ValueError(f"unknown table format '{fmt}'; valid: {TABLE_FORMATS}")
    return paths


class StreamingTableWriter:
    """:func:`write_table` for a table that arrives in chunks of rows: the same
    ``stem.{fits,parquet,csv}`` files (columns, units, descriptions, header cards), with the
    memory of one chunk however many rows there are::

        with StreamingTableWriter(stem) as out:
            for chunk in chunks:          # astropy Tables with the same columns
                out.write(chunk)
            paths = out.finish(header)    # cards known only at the end (row counts)

    Parquet gets one row group per chunk (``pyarrow.parquet.ParquetWriter``; the provenance
    goes into the footer metadata at ``finish``), CSV appends rows. A FITS binary table needs
    the row count and the width of every string column in its header, before the first row:
    ``finish`` writes it from the Parquet file (a temporary one when Parquet is not among the
    formats), one row group at a time, through ``astropy.io.fits.StreamingHDU``. Every file
    is written under a temporary name and renamed only when all formats are complete
    (``atomic_path``); leaving the block by an exception, or without ``finish``, leaves none.
    """

    def __init__(self, stem: str | Path, formats=TABLE_FORMATS, extname: str = "CATALOG"):
        unknown = [fmt for fmt in formats if fmt not in TABLE_FORMATS]
        if unknown:
            raise ValueError(f"unknown table format(s) {unknown}; valid: {TABLE_FORMATS}")
        stem = Path(stem)
        self.paths = {fmt: stem.with_name(f"{stem.name}.{fmt}") for fmt in formats}
        self.extname = extname
        self.n_rows = 0
        self._template: Table | None = None  # first rows: dtypes, units, descriptions
        self._widths: dict[str, int] = {}  # widest value of each string column
        self._parquet = self._csv = None
        self._finished = False

    def __enter__(self) -> StreamingTableWriter:
        self._stack = contextlib.ExitStack()
        self._tmp = {fmt: self._stack.enter_context(atomic_path(path))
                     for fmt, path in self.paths.items()}
        self._spool = self._tmp.get("parquet")
        if self._spool is None and "fits" in self._tmp:
            self._spool = self._tmp["fits"].with_suffix(".rows.parquet")
            self._stack.callback(self._spool.unlink, missing_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        self._close_streams()
        if exc_type is None and not self._finished:
            exc = RuntimeError("StreamingTableWriter left without finish(header): no "
                               f"{', '.join(map(str, self.paths.values()))} written")
            self._stack.__exit__(RuntimeError, exc, None)
            raise exc
        return self._stack.__exit__(exc_type, exc, tb)

    @contextlib.contextmanager
    def _writing(self, fmt: str):
        """OSError while writing one format -> OutputError naming that file."""
        try:
            yield
        except OSError as exc:
            raise write_failed(self.paths[fmt], exc) from None

    def write(self, table: Table) -> None:
        """Append the rows of ``table`` (the columns of the first chunk, in its order)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._template is None:
            self._template = table[:1].copy()
        elif table.colnames != self._template.colnames:
            raise DataError(f"chunk columns {table.colnames} differ from the first chunk's "
                            f"{self._template.colnames}")
        for name in table.colnames:
            if table[name].dtype.kind in "SU":
                self._widths[name] = max(self._widths.get(name, 1), table[name].dtype.itemsize
                                         // (4 if table[name].dtype.kind == "U" else 1))
        frame = table.to_pandas(index=False)
        if self._spool is not None:
            with self._writing("parquet" if "parquet" in self.paths else "fits"):
                if self._parquet is None:
                    schema = pa.Table.from_pandas(frame, preserve_index=False).schema
                    self._metadata = {**(schema.metadata or {}), **column_metadata(table)}
                    # the Arrow schema (ARROW:schema) is stored by finish(), when the
                    # provenance that belongs in its metadata is known
                    self._parquet = pq.ParquetWriter(self._spool, schema, store_schema=False)
                self._parquet.write_table(pa.Table.from_pandas(
                    frame, schema=self._parquet.schema, preserve_index=False))
        if "csv" in self.paths:
            with self._writing("csv"):
                if self._csv is None:
                    self._csv = open(self._tmp["csv"], "w", newline="")  # noqa: SIM115
                write_csv(table, self._csv, header=self.n_rows == 0)
        self.n_rows += len(table)

    def finish(self, header: dict) -> list[Path]:
        """Add the provenance ``header``, complete every file; returns the final paths (in
        place once the ``with`` block ends)."""
        if self._template is None:
            raise DataError(f"no rows were written to {', '.join(map(str, self.paths.values()))}")
        if self._parquet is not None:
            with self._writing("parquet" if "parquet" in self.paths else "fits"):
                meta = {**self._metadata, b"provenance": json.dumps(header).encode()}
                schema = self._parquet.schema.with_metadata(meta)
                # what pyarrow's own writer stores: the metadata as key-value pairs and the
                # IPC-serialized schema, base64, under ARROW:schema (the column types readers
                # get back, e.g. large_string; without it they would see plain string)
                self._parquet.add_key_value_metadata(
                    {**meta, b"ARROW:schema": base64.b64encode(schema.serialize().to_pybytes())})
        self._close_streams()
        if "fits" in self.paths:
            with self._writing("fits"):
                self._write_fits(header)
        self._finished = True
        return list(self.paths.values())

    def _close_streams(self) -> None:
        for stream in (self._parquet, self._csv):
            if stream is not None:
                stream.close()
        self._parquet = self._csv = None

    def _write_fits(self, header: dict) -> None:
        """Primary HDU, then the binary table streamed from the Parquet rows."""
        import pyarrow.parquet as pq

        template = self._template.copy()
        for name, width in self._widths.items():
            template[name] = template[name].astype(f"{template[name].dtype.kind}{width}")
        hdus = fits_hdulist(template, header, self.extname)
        hdus[1].header["NAXIS2"] = self.n_rows
        fits.HDUList([hdus[0]]).writeto(self._tmp["fits"], overwrite=True)
        # a str: astropy takes a Path's bare file name and would look for it in the cwd
        with fits.StreamingHDU(str(self._tmp["fits"]), hdus[1].header) as out:
            for batch in pq.ParquetFile(self._spool).iter_batches():
                chunk = Table({name: np.asarray(batch.column(name).to_numpy(
                    zero_copy_only=False), template[name].dtype) for name in template.colnames})
                rows = np.asarray(fits.table_to_hdu(chunk).data)  # FITS binary table rows
                out.write(rows.astype(rows.dtype.newbyteorder(">")).view(np.uint8))
            if not out.writecomplete:  # the Parquet rows do not add up to NAXIS2
                raise DataError(f"'{self.paths['fits']}': the spooled rows do not match the "
                                f"{self.n_rows} rows written; write the catalog again")


def read_table(path: str | Path, extname: str = "CATALOG", step: str = "predict") -> Table:
    """A table written by :func:`write_table` (FITS HDU ``extname``, Parquet or CSV)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"'{path}': file does not exist; run the {step} step first")
    try:
        if path.suffix == ".fits":
            return Table.read(path, hdu=extname)
        return Table.read(path, format="parquet" if path.suffix == ".parquet" else "ascii.csv")
    except Exception as exc:  # astropy and pyarrow raise many kinds on a malformed file
        raise DataError(f"'{path}': not a readable {extname.lower()} table ({exc}); rerun "
                        f"the {step} step") from None


def read_catalog(path: str | Path) -> Table:
    """A prediction catalog (any of its three formats)."""
    return read_table(path, "CATALOG", "predict")


def require_columns(path, table: Table, columns, step: str) -> None:
    """DataError naming the columns of ``columns`` that ``table`` (read from ``path``) lacks."""
    missing = [c for c in columns if c not in table.colnames]
    if missing:
        raise DataError(f"'{path}': missing column(s) {', '.join(missing)} (has "
                        f"{', '.join(table.colnames)}); rerun the {step} step with the current "
                        "pipeline version")
