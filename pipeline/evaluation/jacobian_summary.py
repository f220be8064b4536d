"""Per-pixel statistics of the input Jacobians over all stars, streamed from the shards.

One row per pixel, ``PIX``, ``WAVE`` and for each label L ``L_MEAN``, ``L_MEDIAN``, ``L_P16``,
``L_P84``, ``L_MEAN_ABS`` over all stars of all shards. Means are float64 sums over chunks of
stars; the percentiles are exact (numpy 'linear' method on all stars) computed one label and
one block of pixels at a time, the block sized so that it holds at most ``memory_mb`` of values.
"""

from __future__ import annotations

import astropy.units as u
import numpy as np
from astropy.table import Table

from pipeline import LABELS
from pipeline.artifacts.catalog import describe_label_column
from pipeline.artifacts.jacobian_shards import open_shards
from pipeline.exceptions import DataError

PERCENTILES = (16.0, 50.0, 84.0)


def jacobian_summary(paths, memory_mb: float) -> Table:
    """Per-pixel statistics over all stars of the shards ``paths`` (see module docstring)."""
    with open_shards(paths) as (shards, wave):
        n_stars = sum(s.shape[0] for s in shards)
        if n_stars == 0:
            raise DataError(f"Jacobian shards {list(map(str, paths))} hold no stars")
        n_pix = wave.size
        budget = memory_mb * 2**20
        total = np.zeros((len(LABELS), n_pix))
        total_abs = np.zeros((len(LABELS), n_pix))
        chunk = max(1, int(budget // (len(LABELS) * n_pix * 8)))
        for data in shards:
            for start in range(0, data.shape[0], chunk):
                block = np.asarray(data[start:start + chunk], np.float64)
                total += block.sum(axis=0)
                total_abs += np.abs(block).sum(axis=0)
        pct = np.empty((len(LABELS), len(PERCENTILES), n_pix))
        width = max(1, int(budget // (n_stars * 8 * 2)))
        for p0 in range(0, n_pix, width):
            cols = slice(p0, min(p0 + width, n_pix))
            for k in range(len(LABELS)):
                values = np.concatenate([np.asarray(d[:, k, cols], np.float64) for d in shards])
                pct[k, :, cols] = np.percentile(values, PERCENTILES, axis=0)
    return summary_table(wave, total / n_stars, total_abs / n_stars, pct)


def summary_table(wave, mean, mean_abs, pct) -> Table:
    table = Table()
    table["PIX"] = np.arange(wave.size, dtype=np.int32)
    table["PIX"].description = "pixel index on the model grid"
    table["WAVE"] = wave
    table["WAVE"].unit = u.AA
    table["WAVE"].description = "vacuum wavelength"
    for k, label in enumerate(LABELS):
        columns = {"MEAN": mean[k], "MEDIAN": pct[k, 1], "P16": pct[k, 0], "P84": pct[k, 2],
                   "MEAN_ABS": mean_abs[k]}
        for stat, values in columns.items():
            name = f"{label}_{stat}"
            table[name] = values
            describe_label_column(table[name], label,
                                  f"{stat.lower()} over stars of d {label} / d flux",
                                  per=" per unit normalized flux")
    return table
