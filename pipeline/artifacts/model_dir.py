"""The trained-model directory: its one writer and its one reader.

    model.keras   the network (inference copy, no optimizer state); written last, it marks
                  a complete directory
    scaler.json   the label scaler (pipeline.nn.scaler.LabelScaler)
    wave.npy      the training wavelength grid, float64 (P,)
    history.csv   epoch, loss, val_loss of the training run
    diagnostics.json  health of the trained network on the validation spectra: active units
                  per hidden layer, conditioning of the last hidden features, the output-layer
                  refit's losses (pipeline.nn.diagnostics)
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import LABELS
from pipeline.artifacts.atomic import atomic_path
from pipeline.exceptions import ModelFileError, OutputError
from pipeline.nn.scaler import LabelScaler

log = logging.getLogger(__name__)

MODEL_FILE, SCALER_FILE, WAVE_FILE = "model.keras", "scaler.json", "wave.npy"
HISTORY_FILE, DIAGNOSTICS_FILE = "history.csv", "diagnostics.json"


def write_model_dir(outdir: str | Path, model, scaler: LabelScaler, wave: np.ndarray,
                    history: pd.DataFrame, provenance: dict) -> None:
    """Write the model directory atomically, file by file; ``model.keras`` comes last."""
    outdir = Path(outdir)
    with atomic_path(outdir / WAVE_FILE) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.asarray(wave, dtype=np.float64))
    scaler.save(outdir / SCALER_FILE, provenance=provenance)
    with atomic_path(outdir / HISTORY_FILE) as tmp:
        history.to_csv(tmp, index=False, float_format="%.9g")
    final, tmp = outdir / MODEL_FILE, outdir / f".{MODEL_FILE}.{os.getpid()}.tmp.keras"
    try:
        model.save(tmp)  # keras insists on the .keras suffix, so no atomic_path here
        os.replace(tmp, final)
    except OSError as exc:
        raise OutputError(f"writing '{final}' failed: {exc}; check free disk space") from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s, %s, %s and %s in %s", WAVE_FILE, SCALER_FILE, HISTORY_FILE, MODEL_FILE,
             outdir)


def _json_ready(obj):
    """NaN and infinities become None: diagnostics.json stays strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_diagnostics(outdir: str | Path, diagnostics: dict) -> Path:
    """Write ``diagnostics.json`` (strict JSON, non-finite numbers as null) atomically."""
    path = Path(outdir) / DIAGNOSTICS_FILE
    text = json.dumps(_json_ready(diagnostics), indent=1, allow_nan=False)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text + "\n")
    return path


def read_diagnostics(path: str | Path) -> dict:
    """The training diagnostics of a model directory (or of the ``diagnostics.json`` given)."""
    path = Path(path)
    if path.is_dir():
        path = path / DIAGNOSTICS_FILE
    if not path.is_file():
        raise ModelFileError(f"'{path}': training diagnostics do not exist; rerun the train "
                             "step with the current pipeline version")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"'{path}': not readable JSON ({exc}); rerun the train step") \
            from None
    if not isinstance(doc, dict) or "layers" not in doc:
        raise ModelFileError(f"'{path}': no 'layers' entry; rerun the train step with the "
                             "current pipeline version")
    return doc


def read_history(path: str | Path) -> pd.DataFrame:
    """The training history: one row per epoch with ``epoch``, ``loss``, ``val_loss``."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"'{path}': training history does not exist; run the train step")
    try:
        history = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"'{path}': not a readable CSV ({exc}); rerun the train step") \
            from None
    missing = [c for c in ("epoch", "loss", "val_loss") if c not in history.columns]
    if missing:
        raise ModelFileError(f"'{path}': missing column(s) {', '.join(missing)}; rerun the "
                             "train step with the current pipeline version")
    if history.empty:
        raise ModelFileError(f"'{path}': no epochs recorded; rerun the train step")
    return history


def load_wave(path: str | Path) -> np.ndarray:
    """The training wavelength grid (P,) float64 saved as ``wave.npy``."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"wavelength grid '{path}' does not exist; rerun the train step")
    try:
        wave = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"wavelength grid '{path}' is corrupt ({exc}); rerun the train "
                             "step") from None
    if wave.ndim != 1 or not np.isfinite(wave).all() or np.any(np.diff(wave) <= 0):
        raise ModelFileError(f"wavelength grid '{path}' must be a finite, strictly increasing "
                             "1-D array; rerun the train step")
    return wave.astype(np.float64)


def load_model_file(path: str | Path):
    """Load a ``.keras`` model for inference (no optimizer), raising ModelFileError."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file '{path}' does not exist; rerun the train step")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # keras raises ValueError, OSError, zipfile errors...
        raise ModelFileError(f"model file '{path}' is corrupt ({type(exc).__name__}: {exc}); "
                             "rerun the train step") from None


def load_trained(model_dir: str | Path):
    """Load what the train step wrote in ``model_dir``.

    Returns
    -------
    (keras.Model, LabelScaler, numpy.ndarray)
        The model (inference only), the label scaler and the training grid ``wave`` (P,).

    Raises
    ------
    ModelFileError
        Naming the missing or corrupt file, or a model whose input size differs from the grid.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFileError(f"model directory '{model_dir}' does not exist; run the train "
                             "step first or pass the directory holding model.keras")
    scaler = LabelScaler.load(model_dir / SCALER_FILE)
    wave = load_wave(model_dir / WAVE_FILE)
    model = load_model_file(model_dir / MODEL_FILE)
    n_in, n_out = model.input_shape[-1], model.output_shape[-1]
    if n_in != wave.size or n_out != len(LABELS):
        raise ModelFileError(f"model '{model_dir / MODEL_FILE}' maps {n_in} pixels to {n_out} "
                             f"outputs but '{model_dir / WAVE_FILE}' has {wave.size} pixels and "
                             f"there are {len(LABELS)} labels; rerun the train step")
    return model, scaler, wave
