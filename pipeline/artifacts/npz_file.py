"""Model files as NumPy ``.npz`` archives (no pickles): atomic writes, and reads whose errors
name the file and the step that rewrites it (posterior, ensemble scatter, emulator)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from pipeline.artifacts.atomic import atomic_path
from pipeline.exceptions import ModelFileError


def write_npz(path: str | Path, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def read_npz(path: str | Path, keys, kind: str, step: str, missing_hint: str) -> dict:
    """Every array of the ``kind`` file ``path`` (e.g. kind 'posterior', step 'laplace').

    Raises:
        ModelFileError: the file does not exist (the message ends with ``missing_hint``), or is
        unreadable or lacks one of ``keys`` ("rerun the ``step`` step").
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{kind} file '{path}' does not exist; {missing_hint}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(f"missing keys {', '.join(missing)}")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise unreadable(path, kind, step, exc) from None
    return data


def unreadable(path: Path, kind: str, step: str, exc: Exception) -> ModelFileError:
    """The error for a ``kind`` file that exists but cannot be used."""
    return ModelFileError(f"'{path}': not a readable {kind} file ({exc}); rerun the {step} step")
