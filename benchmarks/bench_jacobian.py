"""Batched input Jacobians d f / d x against the per-star loop and against their floor.

On the reference network (P = 7213 -> 2048, 1024, 512, 256, 128, 32 -> 3, 17.6 M weights):

* **per-star loop** -- what StarNet / astroNN users write: for every star one eager
  ``tf.GradientTape`` and one ``tape.gradient`` per label. Timed on a few stars, reported per
  star; ``pipeline.nn.derivatives.input_jacobian`` must be at least ``LOOP_TARGET`` times faster.
* **floor** -- one forward pass and three vector-Jacobian products (one per label), each costing
  about one forward pass on a dense network (the backward matmuls with respect to the inputs have
  the forward shapes; weight gradients are not needed). The floor is 4 x a compiled forward pass
  (``tf.function``, inference mode) on the same batch; the Jacobian may cost at most
  ``FLOOR_TARGET`` times that.

Throughput rows (spectra/s) at the config default ``jacobian.batch_size`` and at 256 show the
effect of the batch size.
"""

from __future__ import annotations

import os

import numpy as np

from benchmarks.common import best_time, row

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REFERENCE_HIDDEN = (2048, 1024, 512, 256, 128, 32)
N_PIXELS = 7213
LOOP_TARGET = 10.0
FLOOR_TARGET = 1.3


def reference_model(n_pixels: int = N_PIXELS, hidden=REFERENCE_HIDDEN, seed: int = 0):
    """The dense network of ``pipeline.nn.model.build_model`` (untrained weights: speed only)."""
    from pipeline.nn.model import build_model

    return build_model(n_pixels, {"type": "dense", "hidden": list(hidden)}, seed)


def flux_batch(n: int, n_pixels: int, seed: int = 0) -> np.ndarray:
    """Continuum-normalized-looking float32 flux (N, P): 1 minus small positive noise."""
    rng = np.random.default_rng(seed)
    return (1.0 - 0.1 * rng.random((n, n_pixels))).astype(np.float32)


def per_star_loop(model, x: np.ndarray) -> np.ndarray:
    """The naive baseline: per star, one eager GradientTape and one gradient per label.

    This is the faster of the two loops users write (``tape.jacobian`` per star retraces its
    pfor function and measured about 4x slower still), so the speed-up quoted is conservative.
    """
    import tensorflow as tf

    out = []
    for i in range(x.shape[0]):
        xi = tf.constant(x[i:i + 1])
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(xi)
            y = model(xi, training=False)
            outputs = [y[0, k] for k in range(y.shape[-1])]
        out.append(np.stack([tape.gradient(f, xi)[0].numpy() for f in outputs]))
        del tape
    return np.stack(out)


def compiled_forward(model, batch_size: int, n_pixels: int):
    """A ``tf.function`` of the inference-mode forward pass for batches of ``batch_size``."""
    import tensorflow as tf

    spec = tf.TensorSpec((batch_size, n_pixels), tf.float32)
    return tf.function(lambda x: model(x, training=False), input_signature=[spec])


def forward_all(forward, x: np.ndarray, batch_size: int) -> None:
    """Forward passes over all of ``x`` in the same batching as ``input_jacobian`` (padded)."""
    import tensorflow as tf

    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size]
        if chunk.shape[0] < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - chunk.shape[0],
                                                     x.shape[1]), x.dtype)])
        forward(tf.constant(chunk)).numpy()


def run(quick: bool, n_pixels: int = N_PIXELS, hidden=REFERENCE_HIDDEN,
        n_stars: int | None = None, n_loop: int | None = None,
        batch_sizes: tuple[int, ...] | None = None) -> list[dict]:
    """Benchmark rows; the keyword arguments shrink the problem for tests."""
    from pipeline.nn.derivatives import input_jacobian

    n_stars = n_stars or (768 if quick else 2048)
    n_loop = n_loop or (8 if quick else 48)
    batch_sizes = batch_sizes or ((256,) if quick else (64, 256))
    model = reference_model(n_pixels, hidden)
    x = flux_batch(n_stars, n_pixels)
    repeat = 4
    tag = f"P={n_pixels}, hidden {'-'.join(map(str, hidden))}"

    per_star_loop(model, x[:2])  # warm-up: first eager calls build the layers' kernels
    t_loop = best_time(lambda: per_star_loop(model, x[:n_loop]), repeat=1) / n_loop
    big = max(batch_sizes)
    got = input_jacobian(model, x[:n_loop], batch_size=big)  # warm-up trace, correctness check
    want = per_star_loop(model, x[:n_loop])
    err = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
    if not err < 1e-4:
        raise RuntimeError(f"input_jacobian differs from the per-star loop by {err:.2g}")

    forward = compiled_forward(model, big, n_pixels)
    forward_all(forward, x[:big], big)  # trace
    rows = []
    t_batched, t_forward = {}, np.inf
    for b in batch_sizes:
        input_jacobian(model, x[:b], batch_size=b)  # trace for this batch shape
    for _ in range(repeat):  # interleaved, so that both see the same load of a shared machine
        for b in batch_sizes:
            t = best_time(lambda b=b: input_jacobian(model, x, batch_size=b), 1)
            t_batched[b] = min(t_batched.get(b, np.inf), t)
        t_forward = min(t_forward, best_time(lambda: forward_all(forward, x, big), 1))
    for b in batch_sizes:
        rows.append(row(f"input_jacobian throughput, batch {b}, {tag}", n_stars / t_batched[b],
                        1.0 / t_loop, "spectra/s", t_loop * n_stars / t_batched[b],
                        "report", None))
    t_star = t_batched[big] / n_stars
    speedup = t_loop / t_star
    rows.append(row(f"input_jacobian vs per-star GradientTape loop, batch {big}, {tag}",
                    t_star, t_loop, "s/star", speedup, f">= {LOOP_TARGET:g}x faster",
                    bool(speedup >= LOOP_TARGET)))
    floor = 4.0 * t_forward
    ratio = t_batched[big] / floor
    rows.append(row(f"input_jacobian vs floor 4 x compiled forward, batch {big}, {tag}",
                    t_batched[big], floor, "s", ratio, f"<= {FLOOR_TARGET:g}x floor",
                    bool(ratio <= FLOOR_TARGET)))
    return rows + xla_rows(model, x, big, tag)


def xla_rows(model, x: np.ndarray, batch: int, tag: str, repeat: int = 3) -> list[dict]:
    """The XLA-compiled Jacobian pass (config ``inference_jit``) against the plain one: time,
    bits of two XLA runs (target: identical), and per star the largest difference from the
    plain pass relative to the star's largest Jacobian entry: its median (float32 rounding of
    a reordered computation) and the fraction of stars above 1e-4 (a ReLU input within
    rounding of 0: the two passes may take different sides of the kink, where the Jacobian
    jumps; both sides are valid derivatives)."""
    from pipeline.nn.derivatives import input_jacobian, set_jit_compile

    plain = input_jacobian(model, x, batch_size=batch)
    set_jit_compile(True)
    try:
        first = input_jacobian(model, x, batch_size=batch)  # traces and compiles
        again = input_jacobian(model, x, batch_size=batch)
        t_xla = t_plain = np.inf
        for _ in range(repeat):  # interleaved, as above
            t_xla = min(t_xla, best_time(lambda: input_jacobian(model, x, batch_size=batch), 1))
            set_jit_compile(False)
            t_plain = min(t_plain, best_time(lambda: input_jacobian(model, x, batch_size=batch),
                                             1))
            set_jit_compile(True)
    finally:
        set_jit_compile(False)
    twice = float(np.max(np.abs(first - again)))
    # per star, relative to its largest entry: float32 rounding (1e-6), except where a ReLU's
    # input lies within rounding of 0 and the two passes take different sides of the kink
    per_star = (np.abs(first - plain).reshape(len(x), -1).max(axis=1)
                / np.maximum(np.abs(plain).reshape(len(x), -1).max(axis=1), 1e-30))
    rel = float(np.median(per_star))
    kinks = float(np.mean(per_star > 1e-4))
    return [
        row(f"input_jacobian XLA-compiled vs plain, batch {batch}, {tag}", t_xla, t_plain, "s",
            t_xla / t_plain, "report (< 1 means XLA helps)", None),
        row(f"input_jacobian XLA-compiled run twice: max abs difference, batch {batch}, {tag}",
            twice, None, "abs", None, "== 0 (deterministic)", twice == 0.0),
        row(f"input_jacobian XLA-compiled vs plain: median over stars of max difference / largest "
            f"abs entry, batch {batch}, {tag}", rel, None, "rel", None, "<= 1e-4", rel <= 1e-4),
        row(f"input_jacobian XLA-compiled vs plain: stars differing by more than 1e-4 of their "
            f"largest entry (a ReLU input within rounding of 0), batch {batch}, {tag}",
            100 * kinks, None, "% of stars", None, "report", None),
    ]
