"""Read the pipeline's result files for the figures, checking them against their contracts.

Every reader raises :class:`pipeline.exceptions.DataError` naming the file (and the column or
key) and the pipeline step that makes it, before any drawing starts, so a missing input never
leaves a partial figure. Unknown catalog values written as -9999 become NaN.

Layout under the results directory (docs/outputs.md)::

    data/{split}.fits                 canonical dataset FITS
    model/history.csv                 epoch, loss, val_loss
    laplace/posterior.npz             curvature_eigenvalues, prior_precision, noise_std, ...
    predictions/{split}.fits          catalog: L, L_ERR, L_ERR_MODEL/NOISE/SCATTER, L_TRUE, SNR
    jacobians/{split}/shard-<i>.fits  JACOBIAN (n, 3, P) float32, STAR_ID table, WAVE
    tables/jacobian_summary.fits      PIX, WAVE, L_MEAN, L_MEDIAN, L_P16, L_P84, L_MEAN_ABS
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from pipeline import LABELS
from pipeline.exceptions import DataError

MISSING_VALUE = -9999.0
POSTERIOR_ALIASES = {  # contract name -> name pipeline.laplace.Posterior.save writes
    "curvature_eigenvalues": "eigenvalues",
    "evidence_grid_prior_precision": "evidence_curve_prior_precision",
    "evidence_grid_log_evidence": "evidence_curve_log_evidence",
}


def _shard_index(path: Path) -> int:
    match = re.fullmatch(r"shard-(\d+)\.fits", path.name)
    return int(match.group(1)) if match else -1


@dataclass(frozen=True)
class ResultsTree:
    """The results directory and the splits the figures use.

    ``split`` is the prediction catalog of the paper figures ('test' when predicted);
    ``jacobian_split`` is the one the ``tables`` rule summarizes (last of jacobian.splits).
    """

    root: Path
    split: str = "test"
    jacobian_split: str = "test"

    @classmethod
    def from_config(cls, root: str | Path, config: dict) -> ResultsTree:
        predicted = config["predict"]["splits"]
        split = "test" if "test" in predicted else predicted[-1]
        return cls(Path(root), split, config["jacobian"]["splits"][-1])

    def require(self, relative: str, step: str) -> Path:
        """The path of ``relative`` under the results directory; DataError if it is absent."""
        path = self.root / relative
        if not path.is_file():
            raise DataError(
                f"'{path}': input file does not exist; run the '{step}' step first "
                f"(e.g. snakemake {path})"
            )
        return path

    # ------------------------------------------------------------------ individual files
    def data_path(self, split: str) -> Path:
        return self.require(f"data/{split}.fits", "data")

    def data_labels(self, split: str, columns: tuple[str, ...] = ("STAR_ID",)) -> Table:
        """The LABELS table of a dataset split, without reading its spectra."""
        path = self.data_path(split)
        try:
            with fits.open(path, memmap=True) as hdul:
                table = Table(hdul["LABELS"].data, copy=True)
        except Exception as exc:
            raise DataError(
                f"'{path}': no readable LABELS table ({exc}); re-run the 'data' step"
            ) from None
        _require_columns(path, table, columns, "data")
        return table

    def history(self) -> Table:
        """Training history: one row per epoch with ``epoch``, ``loss``, ``val_loss``."""
        path = self.require("model/history.csv", "train")
        try:
            table = Table.read(path, format="ascii.csv")
        except Exception as exc:  # astropy raises many kinds on a malformed CSV
            raise DataError(
                f"'{path}': not a readable CSV ({exc}); re-run the 'train' step"
            ) from None
        _require_columns(path, table, ("epoch", "loss", "val_loss"), "train")
        if len(table) == 0:
            raise DataError(f"'{path}': no epochs recorded; re-run the 'train' step")
        return table

    def posterior(self) -> dict[str, np.ndarray]:
        """Arrays of the Laplace posterior file (optional keys may be absent).

        Keys are also offered under their contract names (see ``POSTERIOR_ALIASES``).
        """
        path = self.require("laplace/posterior.npz", "laplace")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: np.asarray(npz[key]) for key in npz.files}
        except Exception as exc:
            raise DataError(
                f"'{path}': not a readable .npz archive ({exc}); re-run 'laplace'"
            ) from None
        for name, alias in POSTERIOR_ALIASES.items():
            if name not in arrays and alias in arrays:
                arrays[name] = arrays[alias]
        return arrays

    def catalog(self, columns: tuple[str, ...] = ()) -> Table:
        """The prediction catalog of ``self.split`` with at least ``columns``; -9999 -> NaN."""
        path = self.require(f"predictions/{self.split}.fits", "predict")
        table = read_fits_table(path, "predict")
        _require_columns(path, table, columns, "predict")
        for name in table.colnames:
            if table[name].dtype.kind == "f":
                values = np.array(table[name], dtype=np.float64)
                values[values == MISSING_VALUE] = np.nan
                table[name] = values
        return table

    def jacobian_summary(self) -> Table:
        path = self.require("tables/jacobian_summary.fits", "tables")
        table = read_fits_table(path, "tables")
        needed = ["WAVE"] + [f"{lab}_{s}" for lab in LABELS for s in ("MEAN", "P16", "P84")]
        _require_columns(path, table, tuple(needed), "tables")
        return table

    def jacobian_shards(self) -> list[Path]:
        """The Jacobian shard files of ``jacobian_split`` in shard order."""
        folder = self.root / "jacobians" / self.jacobian_split
        shards = sorted(folder.glob("shard-*.fits"), key=_shard_index)
        if not shards:
            raise DataError(
                f"'{folder}': no shard-<i>.fits Jacobian files; run the 'jacobian' step first"
            )
        return shards


def _require_columns(path: Path, table: Table, columns: tuple[str, ...], step: str) -> None:
    missing = [c for c in columns if c not in table.colnames]
    if missing:
        raise DataError(
            f"'{path}': missing column(s) {', '.join(missing)} (has {', '.join(table.colnames)});"
            f" re-run the '{step}' step with the current pipeline version"
        )


def read_fits_table(path: Path, step: str) -> Table:
    """The first binary table HDU of a FITS file as a Table."""
    try:
        with fits.open(path, memmap=False) as hdul:
            for hdu in hdul:
                if isinstance(hdu, fits.BinTableHDU):
                    return Table(hdu.data, copy=True)
    except Exception as exc:
        raise DataError(
            f"'{path}': not a readable FITS file ({exc}); re-run the '{step}' step"
        ) from None
    raise DataError(f"'{path}': has no binary table HDU; re-run the '{step}' step")


def label_arrays(table: Table, suffix: str) -> np.ndarray:
    """Columns ``L + suffix`` for L in LABELS as float64 (N, 3)."""
    return np.stack([np.asarray(table[f"{lab}{suffix}"], np.float64) for lab in LABELS], 1)


def read_jacobian_rows(path: Path, select) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From one shard, the rows that ``select(star_ids) -> integer rows`` picks.

    The image is memory-mapped so only the selected rows are read from disk.

    Returns:
        star ids of the selected rows (k,), WAVE float64 (P,), JACOBIAN float32 (k, 3, P),
        rows in file order.
    """
    try:
        with fits.open(path, memmap=True) as hdul:
            for name in ("JACOBIAN", "WAVE", "STAR_ID"):
                if name not in hdul:
                    raise DataError(f"'{path}': missing HDU '{name}'; re-run the 'jacobian' step")
            star_id = np.asarray(hdul["STAR_ID"].data["STAR_ID"]).astype(str)
            wave = np.array(hdul["WAVE"].data, dtype=np.float64)
            image = hdul["JACOBIAN"].data
            if image is None or image.ndim != 3 or image.shape[1] != len(LABELS):
                shape = None if image is None else image.shape
                raise DataError(f"'{path}': JACOBIAN has shape {shape}, expected (n, 3, P)")
            rows = np.sort(np.asarray(select(star_id), dtype=np.int64))
            jac = np.array(image[rows], dtype=np.float32)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"'{path}': not a readable Jacobian shard ({exc}); re-run 'jacobian'"
        ) from None
    return star_id[rows], wave, jac


def shard_star_ids(path: Path) -> np.ndarray:
    """The STAR_ID column of one Jacobian shard (the image itself is not read)."""
    try:
        with fits.open(path, memmap=True) as hdul:
            return np.asarray(hdul["STAR_ID"].data["STAR_ID"]).astype(str)
    except Exception as exc:
        raise DataError(f"'{path}': no readable STAR_ID table ({exc}); re-run 'jacobian'") from None
