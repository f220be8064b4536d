"""The result files a figure reads, each through the one reader of its file.

Every path is given explicitly (the Snakemake rule lists them all as inputs), so a figure
never finds its files by globbing: shards left over from an earlier run with more shards are
not read. A missing or malformed file raises an error naming it and the step that makes it
before any drawing starts, so a missing input never leaves a partial figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.table import Table

from pipeline import LABELS
from pipeline.artifacts.catalog import read_catalog, read_table, require_columns
from pipeline.artifacts.members import member_paths
from pipeline.artifacts.model_dir import HISTORY_FILE, read_history
from pipeline.artifacts.posterior_file import read_posterior_arrays
from pipeline.exceptions import DataError
from pipeline.spectra.fits import read_labels


@dataclass(frozen=True)
class FigureInputs:
    """Paths of everything the figures read.

    ``train`` is the training dataset (example spectra), ``jacobian_data`` the dataset whose
    Jacobians are in ``shards`` (their true Teff orders the Jacobian map), ``catalog`` the
    prediction catalog of the paper figures, ``summary`` the Jacobian summary table.
    """

    train: Path
    jacobian_data: Path
    history: Path
    posterior: Path
    catalog: Path
    summary: Path
    shards: tuple[Path, ...]

    @classmethod
    def from_results(cls, root: str | Path, config: dict) -> FigureInputs:
        """The paths of a results directory written by the Snakefile with ``config``.

        The shards are the ``jacobian.shards`` of the config, never whatever is on disk.
        """
        root = Path(root)
        predicted = config["predict"]["splits"]
        split = "test" if "test" in predicted else predicted[-1]
        jac_split = config["jacobian"]["splits"][-1]
        shards = tuple(root / "jacobians" / jac_split / f"shard-{i}.fits"
                       for i in range(config["jacobian"]["shards"]))
        # an ensemble's figures show member 0 (pipeline.artifacts.members)
        model_dir, posterior = member_paths(root, config["ensemble"]["members"])[0]
        return cls(train=root / "data" / "train.fits",
                   jacobian_data=root / "data" / f"{jac_split}.fits",
                   history=model_dir / HISTORY_FILE, posterior=posterior,
                   catalog=root / "predictions" / f"{split}.fits",
                   summary=root / "tables" / "jacobian_summary.fits", shards=shards)

    def history_table(self) -> pd.DataFrame:
        return read_history(self.history)

    def posterior_arrays(self) -> dict:
        return read_posterior_arrays(self.posterior)

    def catalog_table(self, columns: tuple[str, ...] = ()) -> Table:
        """The prediction catalog with at least ``columns``."""
        table = read_catalog(self.catalog)
        require_columns(self.catalog, table, columns, "predict")
        return table

    def jacobian_summary(self) -> Table:
        table = read_table(self.summary, "JACOBIAN_SUMMARY", "tables")
        needed = ["WAVE"] + [f"{lab}_{s}" for lab in LABELS for s in ("MEAN", "P16", "P84")]
        require_columns(self.summary, table, tuple(needed), "tables")
        return table

    def jacobian_labels(self, columns: tuple[str, ...] = ("STAR_ID",)) -> Table:
        """The LABELS table of the Jacobians' dataset, without reading its spectra."""
        table = read_labels(self.jacobian_data)
        require_columns(self.jacobian_data, table, columns, "data")
        return table

    def jacobian_shards(self) -> list[Path]:
        """The shard files, in shard order; each must exist."""
        if not self.shards:
            raise DataError("no Jacobian shard files given; run the jacobian step first")
        for path in self.shards:
            if not Path(path).is_file():
                raise DataError(f"'{path}': Jacobian shard does not exist; run the jacobian "
                                "step first")
        return [Path(p) for p in self.shards]


def label_arrays(table: Table, suffix: str) -> np.ndarray:
    """Columns ``L + suffix`` for L in LABELS as float64 (N, 3)."""
    return np.stack([np.asarray(table[f"{lab}{suffix}"], np.float64) for lab in LABELS], 1)
