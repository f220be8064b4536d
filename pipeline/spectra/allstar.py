"""SDSS allStar catalogs as label sources: the quality cuts, each counted.

An allStar FITS table (HDU 1) is recognized by its STARFLAG and ASPCAPFLAG columns. Only the
columns used are read (memory-mapped): APOGEE_ID, TEFF, LOGG, FE_H, their ``*_ERR``, SNR,
STARFLAG, ASPCAPFLAG and, when present, EXTRATARG. The cuts, in this order, each removing rows
among those the previous ones kept (``data.apstar.allstar``; the log reports every count):

1. ``starflag``: STARFLAG has a bit named in ``starflag_bad``;
2. ``aspcapflag``: ASPCAPFLAG has a bit named in ``aspcapflag_bad``;
3. ``snr``: SNR below ``min_snr`` or not finite (0 keeps every finite SNR);
4. ``missing_labels``: TEFF, LOGG or FE_H is -9999 (or below -9998) or NaN, when
   ``drop_missing_labels`` (otherwise they become NaN for ``data.nan_labels``);
5. ``extratarg``: EXTRATARG has a bit named in ``extratarg_bad`` (DUPLICATE: the lower-S/N
   observation of a star observed in several fields);
6. ``repeated_id``: an APOGEE_ID still listed more than once keeps its highest-SNR row.

Bit names are those of :mod:`pipeline.spectra.bitmasks` (SDSS DR17).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from pipeline import LABELS
from pipeline.exceptions import DataError
from pipeline.spectra.bitmasks import has_bits, mask_value

log = logging.getLogger(__name__)

ID = "APOGEE_ID"
FLAGS = ("STARFLAG", "ASPCAPFLAG")
REQUIRED = (ID, *LABELS, "SNR", *FLAGS)
OPTIONAL = (*(f"{name}_ERR" for name in LABELS), "EXTRATARG")
CUTS = ("starflag", "aspcapflag", "snr", "missing_labels", "extratarg", "repeated_id")
MISSING = -9999.0  # APOGEE catalog convention for an unknown value


def is_allstar(path) -> bool:
    """Whether ``path`` is a FITS table whose HDU 1 has STARFLAG and ASPCAPFLAG columns."""
    try:
        with fits.open(path, memmap=True) as hdul:
            names = {c.upper() for c in hdul[1].columns.names} if len(hdul) > 1 else set()
    except Exception:  # not FITS, or HDU 1 is not a table: a plain catalog's reader decides
        return False
    return all(flag in names for flag in FLAGS)


def read_columns(path) -> Table:
    """The used columns of allStar HDU 1 (upper-case names); DataError naming a missing one."""
    path = Path(path)
    with fits.open(path, memmap=True) as hdul:
        data = hdul[1].data
        names = {c.upper(): c for c in hdul[1].columns.names}
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            raise DataError(f"allStar catalog '{path}' HDU 1 lacks column(s) "
                            f"{', '.join(missing)} (needs {', '.join(REQUIRED)})")
        table = Table({c: np.array(data[names[c]]) for c in (*REQUIRED, *OPTIONAL)
                       if c in names})
    table[ID] = np.char.strip(np.asarray(table[ID]).astype(str))
    return table


def _missing(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return ~np.isfinite(values) | (values <= MISSING + 1)


def quality_cuts(table: Table, opts: dict, where: str) -> tuple[np.ndarray, dict]:
    """Rows of ``table`` kept by the cuts of ``opts`` (``data.apstar.allstar``).

    Returns the boolean mask (N,) and the counts: ``rows``, one per name of :data:`CUTS`
    (rows that cut removed among those still kept) and ``kept``.
    """
    keep = np.ones(len(table), bool)
    counts = {"rows": len(table)}

    def cut(name, reject):
        nonlocal keep
        counts[name] = int((keep & reject).sum())
        keep &= ~reject

    key = "data.apstar.allstar"
    cut("starflag", has_bits(table["STARFLAG"], mask_value(
        "APOGEE_STARFLAG", opts["starflag_bad"], f"{key}.starflag_bad")))
    cut("aspcapflag", has_bits(table["ASPCAPFLAG"], mask_value(
        "APOGEE_ASPCAPFLAG", opts["aspcapflag_bad"], f"{key}.aspcapflag_bad")))
    snr = np.asarray(table["SNR"], dtype=np.float64)
    cut("snr", ~(np.isfinite(snr) & (snr >= opts["min_snr"])))
    missing = np.any([_missing(table[name]) for name in LABELS], axis=0)
    cut("missing_labels", missing & opts["drop_missing_labels"])
    extratarg = mask_value("APOGEE2_EXTRATARG", opts["extratarg_bad"], f"{key}.extratarg_bad")
    if "EXTRATARG" in table.colnames:
        cut("extratarg", has_bits(table["EXTRATARG"], extratarg))
    else:
        counts["extratarg"] = 0
        if extratarg:
            log.warning("%s: no EXTRATARG column; the %s.extratarg_bad cut is skipped", where,
                        key)
    rows = np.flatnonzero(keep)
    order = rows[np.lexsort((-snr[rows], np.asarray(table[ID])[rows]))]  # best SNR first
    _, first = np.unique(np.asarray(table[ID])[order], return_index=True)
    repeated = keep.copy()
    repeated[order[first]] = False
    cut("repeated_id", repeated)
    counts["kept"] = int(keep.sum())
    return keep, counts


def read_allstar(path, opts: dict) -> tuple[Table, dict]:
    """The allStar rows that pass :func:`quality_cuts`, one per APOGEE_ID, and the counts.

    Label columns keep their values except -9999 / NaN, which become NaN (only possible with
    ``drop_missing_labels: false``). Logs one line with every count.
    """
    table = read_columns(path)
    keep, counts = quality_cuts(table, opts, f"allStar '{path}'")
    log.info("allStar '%s': %d rows; removed %s; kept %d", path, counts["rows"],
             ", ".join(f"{name} {counts[name]}" for name in CUTS), counts["kept"])
    if not keep.any():
        raise DataError(f"allStar catalog '{path}': the cuts of data.apstar.allstar leave no "
                        f"star ({', '.join(f'{n} {counts[n]}' for n in CUTS)} of "
                        f"{counts['rows']} rows removed); relax them")
    table = table[keep]
    for name in (*LABELS, *(f"{n}_ERR" for n in LABELS)):
        if name in table.colnames:
            values = np.asarray(table[name], dtype=np.float64)
            table[name] = np.where(_missing(values), np.nan, values)
    return table, counts
