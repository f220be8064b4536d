"""The train step: fit the label network with Adam, resumably and deterministically.

    python -m pipeline.steps.train --config-json J --train F --valid F --outdir results/model

Loss: mean squared error of the scaled labels ``z = (y - mean) / scale`` (the
:class:`~pipeline.nn.scaler.LabelScaler` fitted on the training labels, scale = standard
deviation / sqrt(w) with the per-label weights w of config ``train.label_weights``,
:mod:`pipeline.nn.label_weights`), i.e. a Gaussian likelihood with unit variance per scaled
label. Adam with config ``train.learning_rate``,
``beta_1``, ``beta_2``, ``epsilon``; mini-batches of ``train.batch_size``. After each epoch but
the last, ReLU units that died are recycled (``train.recycle_dormant``,
:mod:`pipeline.nn.dormant`).

Reproducibility and resume. Epoch e (0-based) visits the training stars in the order
``default_rng([seed, e]).permutation(N)``, a pure function of (seed, epoch) fed to tf.data;
after every epoch ``outdir/checkpoints/epoch-NNNN/`` is written atomically (a temporary
directory renamed into place) holding the model with its Adam state (``model.keras``) and
``state.json`` (history, early-stopping best loss, best epoch and wait count, and a
fingerprint of config, data and the label scaler). A rerun after a kill resumes from the
newest complete checkpoint and ends with weights identical to an uninterrupted run. Outputs
``wave.npy``, ``scaler.json``, ``history.csv`` and finally ``model.keras`` (the file that marks
completion) are written atomically. See docs/training.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from pipeline.artifacts.model_dir import (
    MODEL_FILE,
    load_model_file,
    write_diagnostics,
    write_model_dir,
)
from pipeline.artifacts.provenance import provenance
from pipeline.exceptions import DataError, GridMismatchError, NumericalError, OutputError
from pipeline.laplace.curvature import Head
from pipeline.nn.diagnostics import log_diagnostics, unit_diagnostics
from pipeline.nn.dormant import DormantRecycler
from pipeline.nn.label_weights import label_weights
from pipeline.nn.model import (
    build_model,
    input_statistics,
    refresh_normalization,
    set_input_normalization,
)
from pipeline.nn.scaler import LabelScaler
from pipeline.runtime import device_name, seed_everything
from pipeline.spectra.dataset import Spectra, as_rows, is_row_reader
from pipeline.spectra.validation import check_training_labels
from pipeline.streaming import batches

log = logging.getLogger(__name__)
CHECKPOINTS, STATE_FILE = "checkpoints", "state.json"
FINGERPRINT_ROWS = 4096  # rows of flux hashed at a time
REFIT_ROWS = 2048  # rows of flux per chunk of the output-layer refit (59 MB at 7213 px)
NOISE_STREAM = 0x4E4F495345  # spawn-key word of the augmentation noise ("NOISE")


# ------------------------------------------------------------------------------ training state
@dataclass
class TrainingState:
    """Everything besides the weights that a resumed run needs to continue identically."""

    fingerprint: str
    epoch: int = 0                      # completed epochs
    history: list[dict] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = 0
    wait: int = 0
    stopped: bool = False               # early stopping fired
    best_weights: list | None = field(default=None, repr=False)  # lives in epoch-<best>/

    def to_json(self) -> str:
        doc = {k: getattr(self, k) for k in ("fingerprint", "epoch", "history", "best_epoch",
                                              "wait", "stopped")}
        doc["best_loss"] = None if math.isinf(self.best_loss) else self.best_loss
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainingState:
        doc = json.loads(text)
        best = doc.pop("best_loss")
        return cls(best_loss=math.inf if best is None else float(best), **doc)


def epoch_permutation(n_stars: int, seed: int, epoch: int) -> np.ndarray:
    """Order in which epoch ``epoch`` (0-based) visits the training stars: pure in (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_stars)


def update_early_stopping(state: TrainingState, val_loss: float, weights, cfg: dict) -> None:
    """Keras EarlyStopping semantics on ``val_loss``, with state kept in ``state``.

    An epoch improves if ``val_loss < best_loss - min_delta``; training stops after
    ``patience`` epochs in a row without improvement. ``weights()`` gives the current weights.
    """
    state.wait += 1
    if val_loss < state.best_loss - cfg["min_delta"]:
        state.best_loss, state.best_epoch, state.wait = val_loss, state.epoch, 0
        state.best_weights = weights()
    elif cfg["enabled"] and state.wait >= cfg["patience"]:
        state.stopped = True


def update_learning_rate(state: TrainingState, optimizer, cfg: dict) -> None:
    """Halve-on-plateau (Keras ReduceLROnPlateau semantics, as StarNet and astroNN train).

    After every ``patience`` epochs in a row without a new best ``val_loss`` (the early-stopping
    counter ``state.wait``), the learning rate is multiplied by ``factor``, down to ``min_lr``.
    The rate lives in the optimizer, which every checkpoint saves, so a resumed run continues
    with the same schedule.
    """
    if not cfg["enabled"] or state.wait == 0 or state.wait % cfg["patience"]:
        return
    old = float(optimizer.learning_rate.numpy())
    new = max(old * cfg["factor"], cfg["min_lr"])
    if new < old:
        optimizer.learning_rate.assign(new)
        log.info("learning rate %.3g -> %.3g after %d epochs without improvement", old, new,
                 state.wait)


# ---------------------------------------------------------------------------------- checkpoints
def _checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def save_checkpoint(root: Path, model, state: TrainingState) -> Path:
    """Write ``root/epoch-NNNN`` atomically; keep only it and the best epoch's directory."""
    name = _checkpoint_name(state.epoch)
    final, tmp = root / name, root / f".{name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save(tmp / MODEL_FILE)
        (tmp / STATE_FILE).write_text(state.to_json())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError as exc:
        raise OutputError(f"cannot write checkpoint '{final}': {exc}; check free disk space "
                          "and permissions") from None
    keep = {name, _checkpoint_name(state.best_epoch)}
    for old in root.glob("epoch-*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(d for d in root.glob("epoch-*") if (d / STATE_FILE).is_file()
                  and (d / MODEL_FILE).is_file())
    return done[-1] if done else None


def resume(root: Path, model, fingerprint: str) -> TrainingState | None:
    """Load the newest checkpoint into ``model`` (weights and Adam state) and return its state.

    Returns None (the caller starts from scratch) when there is no checkpoint, or it belongs
    to another config or data set, or it cannot be read; the reason is logged.
    """
    latest = latest_checkpoint(root)
    if latest is None:
        return None
    try:
        state = TrainingState.from_json((latest / STATE_FILE).read_text())
        if state.fingerprint != fingerprint:
            log.warning("checkpoint %s belongs to another config or data set; starting from "
                        "scratch", latest)
            return None
        model.optimizer.build(model.trainable_variables)  # else its variables are skipped
        model.load_weights(latest / MODEL_FILE)
        best_dir = root / _checkpoint_name(state.best_epoch)
        if state.best_epoch > 0:
            state.best_weights = (model.get_weights() if best_dir == latest
                                  else load_model_file(best_dir / MODEL_FILE).get_weights())
    except Exception as exc:  # corrupt JSON, zip or h5: training is reproducible, so restart
        log.warning("checkpoint %s is unreadable (%s: %s); starting from scratch", latest,
                    type(exc).__name__, exc)
        return None
    log.info("resuming from checkpoint %s after epoch %d", latest, state.epoch)
    return state


# ------------------------------------------------------------------------------------- monitor
class TrainingMonitor(keras.callbacks.Callback):
    """Stops on a non-finite loss, logs each epoch, early-stops, recycles dormant units
    (``recycler``, :mod:`pipeline.nn.dormant`) and checkpoints."""

    def __init__(self, state: TrainingState, config: dict, root: Path, n_stars: int,
                 recycler: DormantRecycler | None = None):
        super().__init__()
        self.state, self.root, self.n_stars, self.recycler = state, root, n_stars, recycler
        self.es_cfg, self.epochs = config["train"]["early_stopping"], config["train"]["epochs"]
        self.lr_cfg = config["train"]["reduce_lr"]
        self.plateau = config["train"]["schedule"]["type"] == "plateau"
        self._t0 = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NumericalError(
                f"non-finite training loss ({float(loss)}) at epoch {self.state.epoch + 1}, "
                f"batch {batch + 1}; the last good checkpoint (epoch {self.state.epoch}) is "
                f"kept in '{self.root}'; lower train.learning_rate or check the input flux")

    def on_epoch_end(self, epoch, logs=None):
        loss, val_loss = float(logs["loss"]), float(logs["val_loss"])
        state = self.state
        if not math.isfinite(val_loss):
            raise NumericalError(f"non-finite validation loss at epoch {epoch + 1}; the last "
                                 f"good checkpoint (epoch {state.epoch}) is kept in "
                                 f"'{self.root}'; lower train.learning_rate")
        if not all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in self.model.variables
                   if v.dtype in ("float16", "bfloat16", "float32", "float64")):
            # ReLU maps NaN to 0, so NaN weights can hide behind a finite loss.
            raise NumericalError(f"non-finite weights after epoch {epoch + 1}; the last good "
                                 f"checkpoint (epoch {state.epoch}) is kept in '{self.root}'; "
                                 "lower train.learning_rate")
        state.epoch = epoch + 1
        state.history.append({"epoch": state.epoch, "loss": loss, "val_loss": val_loss})
        update_early_stopping(state, val_loss, self.model.get_weights, self.es_cfg)
        if self.plateau:  # a cosine schedule sets the rate from the step count itself
            update_learning_rate(state, self.model.optimizer, self.lr_cfg)
        if self.recycler is not None and state.epoch < self.epochs and not state.stopped:
            n = self.recycler(self.model, state.epoch)  # before the checkpoint: resumable
            if n:
                log.info("epoch %d: recycled %d dormant units", state.epoch, n)
        save_checkpoint(self.root, self.model, state)
        seconds = time.perf_counter() - self._t0
        log.info("epoch %d/%d: loss %.5f, val_loss %.5f (best %.5f at epoch %d), lr %.3g, "
                 "%.1f s, %.0f spectra/s", state.epoch, self.epochs, loss, val_loss,
                 state.best_loss, state.best_epoch,
                 float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)), seconds,
                 self.n_stars / max(seconds, 1e-9))
        if state.stopped:
            log.info("early stopping: no improvement for %d epochs", state.wait)
            self.model.stop_training = True


# ------------------------------------------------------------------------------------ datasets
def _gather_rows(flux: np.ndarray, z: np.ndarray):
    """tf.data map function: index batch (B,) -> rows (flux (B, P), z (B, 3)) of the arrays.

    The rows are gathered from ``flux`` itself, an array or a row reader
    (``pipeline.spectra.fits.FluxRows``, which reads just those rows of the memory-mapped file,
    in file order, and returns them in batch order): ``tf.constant(flux)`` would keep a second
    copy of the flux (1.44 GB for 50000 x 7213 float32) and briefly a third.
    """
    dtypes = (tf.as_dtype(flux.dtype), tf.as_dtype(z.dtype))

    def gather(idx):
        x, y = tf.numpy_function(lambda i: (flux[i], z[i]), [idx], dtypes, stateful=False)
        x.set_shape((None, *flux.shape[1:]))
        y.set_shape((None, *z.shape[1:]))
        return x, y

    return gather


def noise_rng(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The generator of the augmentation noise of one batch: a pure function of (seed, epoch,
    batch), so a resumed run draws the same noise as an uninterrupted one."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(
        NOISE_STREAM, int(epoch), int(batch))))


def _gather_noisy_rows(rows, n_pixels: int, z: np.ndarray, noise: float, seed: int):
    """Like :func:`_gather_rows`, for (epoch, batch, index batch) triples: the flux rows plus
    ``noise`` x flux_err x N(0, 1) per pixel, drawn by :func:`noise_rng`. ``rows(idx)`` returns
    (flux, flux_err) with error 0 on bad pixels (``FluxRows.rows`` or :func:`_array_rows`)."""
    def draw(epoch, batch, idx):
        flux, err = rows(idx)
        eps = noise_rng(seed, epoch, batch).standard_normal(flux.shape, dtype=np.float32)
        return flux + np.float32(noise) * err * eps, z[idx]

    def gather(epoch, batch, idx):
        x, y = tf.numpy_function(draw, [epoch, batch, idx], (tf.float32, tf.as_dtype(z.dtype)),
                                 stateful=False)
        x.set_shape((None, n_pixels))
        y.set_shape((None, *z.shape[1:]))
        return x, y

    return gather


def _array_rows(flux: np.ndarray, flux_err: np.ndarray, bad_pixel_err: float):
    """idx -> (flux, flux_err) rows of in-memory arrays, the error 0 on bad pixels (read with
    error ``bad_pixel_err``; their flux was replaced by 1 and gets no noise)."""
    def rows(idx):
        err = np.asarray(flux_err[idx], np.float32)
        return np.asarray(flux[idx], np.float32), np.where(err < bad_pixel_err, err, 0.0)

    return rows


def training_dataset(flux: np.ndarray, z: np.ndarray, batch_size: int, seed: int,
                     first_epoch: int, epochs: int, noise: float = 0.0,
                     rows=None) -> tf.data.Dataset:
    """Batches of epochs ``first_epoch .. epochs-1`` back to back, each in its own order.

    ``model.fit(..., steps_per_epoch=ceil(N / batch_size))`` keeps one iterator across epochs,
    so epoch e sees exactly ``epoch_permutation(N, seed, e)`` whether or not the run resumed.
    Each permutation is drawn when its epoch starts (one (N,) index array alive, not one per
    epoch), and ``flux`` may be a row reader: memory does not grow with N beyond O(N) indices.
    With ``noise`` > 0 every batch gets fresh Gaussian noise (``train.noise_augmentation``),
    ``rows(idx)`` giving its (flux, flux_err).
    """
    n = len(flux)

    def permutation(epoch):
        return epoch_permutation(n, seed, int(epoch)).astype(np.int64)

    def epoch_batches(epoch):
        perm = tf.numpy_function(permutation, [epoch], tf.int64, stateful=False)
        perm.set_shape((n,))
        batches = tf.data.Dataset.from_tensor_slices(perm).batch(batch_size)
        if noise > 0:
            batches = batches.enumerate().map(lambda b, idx: (epoch, b, idx))
        return batches

    gather = (_gather_noisy_rows(rows, flux.shape[1], z, noise, seed) if noise > 0
              else _gather_rows(flux, z))
    batches = tf.data.Dataset.range(first_epoch, epochs).flat_map(epoch_batches)
    batches = batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batches.prefetch(tf.data.AUTOTUNE)


def validation_dataset(flux: np.ndarray, z: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Batches of rows in file order, gathered like :func:`training_dataset`'s (no copy)."""
    return tf.data.Dataset.range(len(flux)).batch(batch_size).map(
        _gather_rows(flux, z)).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------- main entry
def learning_rate(tcfg: dict, steps_per_epoch: int = 1):
    """The optimizer's learning rate for config ``train``: a number or a schedule.

    ``schedule.type`` 'plateau': the constant ``learning_rate``, halved on plateaus by
    ``reduce_lr``. 'cosine': a linear warm-up from ``min_factor * learning_rate`` to
    ``learning_rate`` over ``warmup_epochs``, then a cosine decay to ``min_factor *
    learning_rate`` at the last of ``epochs``; a pure function of the optimizer's step count,
    which every checkpoint saves, so a resumed run continues on the same curve.
    """
    sched, lr = tcfg["schedule"], float(tcfg["learning_rate"])
    if sched["type"] == "plateau":
        return lr
    total = max(int(tcfg["epochs"] * steps_per_epoch), 1)
    warmup = min(int(round(sched["warmup_epochs"] * steps_per_epoch)), total - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=lr * sched["min_factor"] if warmup else lr,
        decay_steps=max(total - warmup, 1), alpha=sched["min_factor"],
        warmup_target=lr if warmup else None, warmup_steps=warmup)


def compiled_model(n_pixels: int, config: dict, flux_stats=None, steps_per_epoch: int = 1):
    """The config's network, compiled with Adam and MSE (a fresh optimizer, not yet built).

    ``flux_stats`` = (mean, variance) per pixel of the training flux go into the input
    normalization layer (``model.input_normalization``).
    """
    tcfg = config["train"]
    model = build_model(n_pixels, config["model"], int(config["seed"]))
    if flux_stats is not None:
        set_input_normalization(model, *flux_stats)
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate(tcfg, steps_per_epoch),
                                      weight_decay=tcfg.get("weight_decay") or None,
                                      global_clipnorm=tcfg.get("global_clipnorm"),
                                      beta_1=tcfg["beta_1"],
                                      beta_2=tcfg["beta_2"], epsilon=tcfg["epsilon"])
    model.compile(optimizer=optimizer, loss="mse", jit_compile=tcfg.get("jit_compile", "auto"))
    return model


def check_inputs(train: Spectra, valid: Spectra,
                 names: tuple[str, str] = ("training spectra", "validation spectra")) -> None:
    """Same grid for both splits, finite flux, at least two training stars.

    ``names`` (e.g. the two file paths) say in the messages which input is at fault.
    """
    check_training_labels(train.label_array(), names[0])
    if valid.n_stars < 1:
        raise DataError(f"'{names[1]}' holds no spectra; validation needs at least one "
                        "(enlarge data.n_valid)")
    if valid.n_pixels != train.n_pixels or not np.allclose(valid.wave, train.wave, rtol=1e-10,
                                                           atol=0):
        raise GridMismatchError(f"'{names[1]}' ({valid.n_pixels} pixels) is not on the "
                                f"training grid of '{names[0]}' ({train.n_pixels} pixels); "
                                "resample them onto the same wavelength grid")
    for split, spectra in (("training", train), ("validation", valid)):
        if is_row_reader(spectra.flux):
            continue  # FluxRows replaces every non-finite flux as it reads
        if not np.isfinite(spectra.flux).all():
            row = int(np.argwhere(~np.isfinite(spectra.flux))[0, 0])
            raise DataError(f"{split} flux of row {row} is not finite; read spectra with "
                            "pipeline.spectra.fits.read_spectra, which flags bad pixels")


def run_fingerprint(config: dict, train: Spectra, valid: Spectra,
                    derived: tuple[np.ndarray, ...] = ()) -> str:
    """Hash of what determines the trained weights: a checkpoint resumes only on a match.

    ``derived``: arrays computed from the data by code rather than read from the config (the
    label scaler's mean and scale, which carry the loss weights; the input normalization),
    so that a checkpoint of another version of that code is not resumed under a new scaler.
    The flux is hashed in row chunks (the same digest as the whole array: blake2b of a byte
    string fed in pieces), so a row reader is hashed without loading it. Excluded from the
    hash: ``train.stream`` (streamed and in-memory training give the same weights).
    """
    digest = hashlib.blake2b(digest_size=16)
    keys = ("seed", "deterministic", "model", "train")
    described = {k: config.get(k) for k in keys}
    described["train"] = {k: v for k, v in (described["train"] or {}).items() if k != "stream"}
    digest.update(json.dumps(described, sort_keys=True).encode())
    for arr in derived:
        digest.update(np.ascontiguousarray(arr, np.float64))
    for spectra in (train, valid):
        flux = as_rows(spectra.flux, None)
        digest.update(str(tuple(flux.shape)).encode())
        for s in batches(len(flux), FINGERPRINT_ROWS):
            digest.update(np.ascontiguousarray(flux[s]))
        for arr in (spectra.label_array(), spectra.wave):
            arr = np.ascontiguousarray(arr)
            digest.update(str(arr.shape).encode())
            digest.update(arr)
    return digest.hexdigest()


def noise_rows(train: Spectra, config: dict):
    """idx -> (flux, flux_err) rows of the training split for the noise augmentation, or None
    without it. DataError when it is on and the split carries no flux errors."""
    if not config["train"]["noise_augmentation"]:
        return None
    if is_row_reader(train.flux):
        return train.flux.rows
    if train.flux_err is None:
        raise DataError("train.noise_augmentation needs the training flux errors (FLUX_ERR); "
                        "this split was read without them")
    return _array_rows(train.flux, train.flux_err, config["data"]["bad_pixel_err"])


def train_model(config: dict, train: Spectra, valid: Spectra, outdir: str | Path,
                callbacks=()) -> tuple[keras.Model, LabelScaler, pd.DataFrame]:
    """Train the config's network on ``train``, early-stopping on ``valid``; resumable.

    Parameters
    ----------
    config : dict
        Validated configuration (sections seed, deterministic, model, train).
    train, valid : Spectra
        Labelled spectra on one grid; the input is ``flux`` float32 (N, P) as is.
    outdir : path
        Receives ``model.keras``, ``scaler.json``, ``history.csv``, ``wave.npy`` and
        ``checkpoints/``; an existing matching checkpoint is resumed.
    callbacks : sequence of keras.callbacks.Callback
        Extra callbacks for ``model.fit`` (e.g. a LaplaceCallback).

    Returns
    -------
    (keras.Model, LabelScaler, pandas.DataFrame)
        The trained model (best epoch's weights when configured), the scaler, and the
        history with columns epoch, loss, val_loss (standardized MSE).
    """
    outdir, tcfg = Path(outdir), config["train"]
    check_inputs(train, valid)
    seed_everything(config)
    flux_train = as_rows(train.flux)  # a row reader stays on disk: batches read its rows
    weights = label_weights(flux_train, train.label_array(), tcfg["label_weights"],
                            int(config["seed"]))
    log.info("label weights of the loss (%s): %s", tcfg["label_weights"],
             np.array2string(weights, precision=3))
    scaler = LabelScaler().fit(train.label_array(), weights)
    z_train = scaler.transform(train.label_array()).astype(np.float32)
    z_valid = scaler.transform(valid.label_array()).astype(np.float32)
    if not np.isfinite(z_valid).all():
        raise DataError("a validation label is not finite; drop such rows "
                        "(config data.nan_labels: drop)")
    stats = (input_statistics(flux_train, config["model"].get("input_scale", "global"))
             if config["model"].get("input_normalization", True) else None)
    fingerprint = run_fingerprint(config, train, valid,
                                  (scaler.mean, scaler.scale, *(stats or ())))
    root = outdir / CHECKPOINTS
    steps = math.ceil(train.n_stars / tcfg["batch_size"])
    model = compiled_model(train.n_pixels, config, stats, steps)
    state = resume(root, model, fingerprint)
    if state is None:
        shutil.rmtree(root, ignore_errors=True)  # stale checkpoints must never be resumed
        model = compiled_model(train.n_pixels, config, stats, steps)
        state = TrainingState(fingerprint)
    if state.stopped or state.epoch >= tcfg["epochs"]:
        log.info("training had already finished after epoch %d", state.epoch)
    else:
        log.info("training %s (%d weights) on %d spectra of %d pixels, %d steps per epoch",
                 model.name, model.count_params(), train.n_stars, train.n_pixels, steps)
        recycler = (DormantRecycler(flux_train, int(config["seed"]))
                    if tcfg["recycle_dormant"] else None)
        model.fit(
            training_dataset(flux_train, z_train, tcfg["batch_size"], int(config["seed"]),
                             state.epoch, tcfg["epochs"], tcfg["noise_augmentation"],
                             noise_rows(train, config)),
            validation_data=validation_dataset(as_rows(valid.flux), z_valid,
                                               tcfg["batch_size"]),
            epochs=tcfg["epochs"], initial_epoch=state.epoch, steps_per_epoch=steps, shuffle=False,
            callbacks=[TrainingMonitor(state, config, root, train.n_stars, recycler),
                       *callbacks],
            verbose=1 if sys.stderr.isatty() else 0,
        )
    es = tcfg["early_stopping"]
    if es["enabled"] and es["restore_best_weights"] and state.best_epoch != state.epoch:
        model.set_weights(state.best_weights)
        refresh_normalization(model)
        log.info("restored the weights of epoch %d (val_loss %.5f)", state.best_epoch,
                 state.best_loss)
    flux_valid = as_rows(valid.flux)
    refit = None
    if tcfg["refit_last_layer"]:
        refit = refit_last_layer(model, flux_train, z_train, tcfg["batch_size"],
                                 tcfg["refit_ridge"], valid=(flux_valid, z_valid),
                                 prior=tcfg["refit_prior"])
    diagnostics = unit_diagnostics(model, flux_valid, tcfg["batch_size"])
    diagnostics["refit"] = refit
    log_diagnostics(diagnostics)
    history = pd.DataFrame(state.history, columns=["epoch", "loss", "val_loss"])
    write_outputs(outdir, model, scaler, train.wave, history, config, diagnostics)
    return model, scaler, history


def refit_last_layer(model, flux: np.ndarray, z: np.ndarray, batch_size: int,
                     ridge: float, valid=None, prior: bool = True) -> dict:
    """Move the linear output layer to the regularized least-squares minimizer, if it helps.

    The output is linear in the last Dense layer, f = W^T phi(x) + b. Adam with early stopping
    leaves (W, b) near but not at the minimum (on the default run, a mean training residual of
    0.05 sigma in [Fe/H], which then shows up as a bias on every star), while the Laplace
    approximation takes theta* to be a mode of the loss. Per label k, with Phi = [phi, 1]
    (N, d + 1), the refit solves in float64

        (Phi^T Phi + diag(lambda_k, ..., lambda_k, 0)) w_k = Phi^T z_k

    (the bias is not penalized, so the training residuals have zero mean). ``lambda_k =
    ridge N`` plus, with ``prior``, the Gaussian prior of the Laplace step at MacKay's point
    for the current weights: noise variance sigma_k^2 (the current training MSE of label k)
    over prior variance |w_k|^2 / d, i.e. lambda_k += sigma_k^2 d / |w_k|^2. Without it,
    nearly collinear features (dead or duplicate units) get weights of +-20 whose terms cancel
    and do not generalize.

    With ``valid = (flux, z)`` the refit is kept only if it lowers the validation MSE;
    otherwise the trained weights stay. Returns the training and validation MSE before and
    after and whether the refit was accepted (both losses are logged).
    """
    head = Head(model, last_layers=1)
    layer = head.layers[0]
    if layer.activation not in (keras.activations.linear, None):
        log.warning("output layer is not linear: last-layer refit skipped")
        return {"accepted": False}
    current = np.vstack([layer.kernel.numpy(), layer.bias.numpy()[None]]).astype(np.float64)
    train = _NormalEquations.of(head, flux, z, batch_size)
    gram, rhs, n, d = train.gram, train.rhs, train.n, len(current) - 1
    sigma2 = train.mse(current)
    w = np.empty_like(current)
    for k in range(z.shape[1]):
        lam = ridge * n
        if prior:
            lam += sigma2[k] * d / max(float(np.sum(current[:-1, k] ** 2)), 1e-300)
        system = gram + np.diag(np.r_[np.full(d, lam), 0.0])
        try:
            w[:, k] = np.linalg.solve(system, rhs[:, k])
        except np.linalg.LinAlgError:  # no ridge and dead units: the minimum-norm solution
            w[:, k] = np.linalg.lstsq(system, rhs[:, k], rcond=None)[0]
    report = {"train_mse_before": float(np.mean(sigma2)),
              "train_mse_after": float(np.mean(train.mse(w)))}
    accepted = True
    if valid is not None:
        held_out = _NormalEquations.of(head, valid[0], valid[1], batch_size)
        report["valid_mse_before"] = float(np.mean(held_out.mse(current)))
        report["valid_mse_after"] = float(np.mean(held_out.mse(w)))
        accepted = report["valid_mse_after"] < report["valid_mse_before"]
    report["accepted"] = accepted
    if accepted:
        layer.kernel.assign(w[:-1].astype(layer.kernel.dtype))
        layer.bias.assign(w[-1].astype(layer.bias.dtype))
    log.info("output-layer refit (%s): training MSE %.5f -> %.5f, validation MSE %s -> %s; %s",
             "prior-regularized" if prior else "least squares", report["train_mse_before"],
             report["train_mse_after"], _fmt(report.get("valid_mse_before")),
             _fmt(report.get("valid_mse_after")),
             "accepted" if accepted else "rejected, the trained weights stay")
    return report


@dataclass
class _NormalEquations:
    """Sums of the least-squares problem z ~ Phi w with Phi = [phi, 1] (N, d + 1), float64.

    ``gram`` = Phi^T Phi, ``rhs`` = Phi^T z, ``zz`` = diag(z^T z) (per label), accumulated over
    chunks of about ``REFIT_ROWS`` stars (whole batches, so the network sees the same batches
    as on the whole array) of an array or a row reader: memory holds (d + 1)^2 numbers instead
    of the N x d features, and the refit's memory does not grow with the number of stars.
    """

    gram: np.ndarray
    rhs: np.ndarray
    zz: np.ndarray
    n: int

    @classmethod
    def of(cls, head: Head, flux, z, batch_size: int) -> _NormalEquations:
        flux, z = as_rows(flux, None), np.asarray(z, np.float64)
        gram = rhs = zz = 0.0
        for s in batches(len(flux), max(1, REFIT_ROWS // batch_size) * batch_size):
            phi = head.features(flux[s], batch_size)
            design = np.hstack([phi, np.ones((len(phi), 1))])
            gram = gram + design.T @ design
            rhs = rhs + design.T @ z[s]
            zz = zz + np.sum(z[s] ** 2, axis=0)
        return cls(gram, rhs, zz, len(flux))

    def mse(self, w: np.ndarray) -> np.ndarray:
        """Mean squared residual per label of weights ``w`` (d + 1, K):
        (w_k^T G w_k - 2 w_k^T r_k + z_k^T z_k) / N, the expanded square, summed in float64."""
        quad = np.einsum("ik,ij,jk->k", w, self.gram, w)
        return np.maximum(quad - 2 * np.einsum("ik,ik->k", w, self.rhs) + self.zz, 0) / self.n


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.5f}"


def write_outputs(outdir: Path, model, scaler: LabelScaler, wave: np.ndarray,
                  history: pd.DataFrame, config: dict, diagnostics: dict | None = None) -> None:
    """The model directory, with an inference copy of ``model`` (no optimizer state).

    ``diagnostics.json`` is written before the files of :func:`write_model_dir`, whose
    ``model.keras`` (last) marks a complete directory.
    """
    if diagnostics is not None:
        write_diagnostics(outdir, diagnostics)
    export = build_model(model.input_shape[-1], config["model"], int(config["seed"]))
    export.set_weights(model.get_weights())  # includes the input normalization statistics
    refresh_normalization(export)
    write_model_dir(outdir, export, scaler, wave, history,
                    provenance(config, device=device_name()))
