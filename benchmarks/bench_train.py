"""Training input pipeline overhead and XLA on the reference network.

Rows:

* ``training input pipeline overhead``: one epoch of ``model.fit`` fed by
  ``pipeline.nn.training.training_dataset`` (per-epoch permutation, rows gathered from the numpy
  arrays, prefetch)
  against the baseline of the same compiled train step called on the same batches already in
  memory as tensors. Ratio = fit epoch time / bare step time; a pipeline that does not starve
  the model stays close to 1 (target < 1.15).
* ``train step with jit_compile=True``: the fit epoch with an XLA-compiled step against the
  default (Keras 'auto': no XLA on CPU-only machines). Informational: it decides the
  ``train.jit_compile`` default for CPUs (docs/training.md). Op determinism is off in this
  process (Keras refuses XLA while it is on), so both runs are compared on equal terms.
* ``XLA train step run twice``: the largest weight difference between two XLA runs of the same
  seed and batches (0: deterministic; tests/test_streaming_train.py checks it on a tiny net).

Both use the reference network (P = 7213 -> 2048-1024-512-256-128-32 -> 3, 17.6 M weights),
Adam and batch 64 as in the paper configuration; times are the best of the measured epochs
(the first epoch, which traces the step, is not timed).
"""

from __future__ import annotations

import math
import time

import numpy as np

N_PIXELS = 7213
BATCH = 64
TARGET = 1.15


def _config(jit_compile="auto") -> dict:
    from pipeline.config import validate

    return validate({"seed": 0, "train": {"batch_size": BATCH, "jit_compile": jit_compile}})


def _data(n_stars: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    flux = (1.0 - 0.1 * rng.random((n_stars, N_PIXELS))).astype(np.float32)
    return flux, rng.standard_normal((n_stars, 3)).astype(np.float32)


class _EpochTimer:
    """Wall time of each epoch of ``model.fit`` (a keras callback, built lazily)."""

    def __new__(cls):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.times = []

            def on_epoch_begin(self, epoch, logs=None):
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.times.append(time.perf_counter() - self.t0)

        return Timer()


def fit_epoch_time(flux, z, epochs: int, jit_compile="auto"):
    """Best epoch time of ``model.fit`` on the tf.data pipeline (epoch 1, tracing, excluded)."""
    from pipeline.nn.training import compiled_model, training_dataset

    model = compiled_model(N_PIXELS, _config(jit_compile))
    timer = _EpochTimer()
    model.fit(training_dataset(flux, z, BATCH, 0, 0, epochs), epochs=epochs,
              steps_per_epoch=math.ceil(len(flux) / BATCH), shuffle=False, verbose=0,
              callbacks=[timer])
    return min(timer.times[1:]), model


def bare_step_time(model, flux, z, repeat: int) -> float:
    """Best time of one pass of the compiled train step over in-memory tensor batches."""
    import tensorflow as tf

    order = np.random.default_rng([0, 99]).permutation(len(flux))
    batches = [(tf.constant(flux[idx]), tf.constant(z[idx]))
               for idx in np.array_split(order, math.ceil(len(flux) / BATCH))]
    step = tf.function(model.train_step, reduce_retracing=True)
    step(batches[0])  # trace
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        for batch in batches:
            logs = step(batch)
        float(logs["loss"])  # wait for the last step
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool = False) -> list[dict]:
    """Benchmark rows (see module docstring); ``quick`` uses 640 instead of 3200 stars."""
    n_stars = 640 if quick else 3200
    epochs = 3 if quick else 4
    flux, z = _data(n_stars)
    tag = f"reference network, {n_stars} stars, batch {BATCH}"

    fit_time, model = fit_epoch_time(flux, z, epochs)
    bare = bare_step_time(model, flux, z, repeat=epochs - 1)
    xla_time, xla = fit_epoch_time(flux, z, epochs, jit_compile=True)
    _, xla_again = fit_epoch_time(flux, z, epochs, jit_compile=True)
    spread = max(float(np.max(np.abs(a - b))) for a, b in zip(
        xla.get_weights(), xla_again.get_weights(), strict=True))
    overhead = fit_time / bare
    return [
        {"benchmark": f"training input pipeline overhead ({tag})", "value": fit_time,
         "baseline": bare, "unit": "s/epoch", "ratio": overhead, "target": f"< {TARGET}",
         "ok": overhead < TARGET},
        {"benchmark": f"training throughput, tf.data + model.fit ({tag})",
         "value": n_stars / fit_time, "baseline": None, "unit": "spectra/s", "ratio": None,
         "target": "~200 on 2 cores (earlier measurement)"},
        {"benchmark": f"train step with jit_compile=True vs default ({tag})", "value": xla_time,
         "baseline": fit_time, "unit": "s/epoch", "ratio": xla_time / fit_time,
         "target": "informational (< 1 means XLA helps)"},
        {"benchmark": f"XLA train step run twice, same seed: max abs weight difference ({tag}, "
                      f"{epochs} epochs)", "value": spread, "baseline": None, "unit": "abs",
         "ratio": None, "target": "== 0 (deterministic)", "ok": spread == 0.0},
    ]


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    from benchmarks.run import table

    print(table(run(quick="--quick" in sys.argv)))
