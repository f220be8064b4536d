"""Derivatives of a network with respect to its inputs and weights.

* :func:`forward_jacobian` -- the outputs f(x_n), the inputs of chosen layers and the input
  Jacobian from one compiled pass per batch (the forward pass the Jacobian needs anyway gives
  the predictions and features for free); :func:`input_jacobian` is its Jacobian alone.
* :func:`input_jacobian` -- D_n = d f(x_n) / d x_n, shape (N, n_out, P), batched: one compiled
  ``tf.function`` per (model, batch shape), the last batch padded so only one trace happens,
  and the model always in inference mode (BatchNorm in training mode couples the stars of a
  batch). Per-sample gradients come from one VJP per output of sum_n f_k(x_n): in inference
  mode star n only influences f(x_n), so d/dx_n sum_m f_k(x_m) = d f_k(x_n) / d x_n.
* :func:`input_hessian` -- per-sample d^2 f_k / dx dx, shape (N, n_out, *in, *in); exact zeros
  (never None, never an exception) where f is linear in x.
* :func:`hessian_diagonal` -- diag of the Hessian of a scalar function without forming the
  matrix: exact by chunked forward-over-reverse Hessian-vector products, or Hutchinson's
  estimator E[v * Hv] (Rademacher v) with its standard error.
* :func:`loss_hessian` -- the exact Hessian of the squared-error training loss with respect to
  chosen weight variables (float64 when the model is float64).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

ZERO = tf.UnconnectedGradients.ZERO
HESSIAN_DIAGONAL_METHODS = ("exact", "hutchinson")

# model -> {(batch_size, feature_shape, dtype, tapped layers, jit): compiled function}
_JACOBIAN_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_JIT = {"compile": False}  # XLA for the Jacobian pass; steps set it (runtime.configure)


def set_jit_compile(on: bool) -> bool:
    """XLA-compile the Jacobian pass of :func:`forward_jacobian` from now on (config
    ``inference_jit``; ``pipeline.runtime.configure`` sets it for every step); returns the
    previous setting, for a caller that restores it."""
    previous, _JIT["compile"] = _JIT["compile"], bool(on)
    return previous


class ForwardJacobian(NamedTuple):
    """One pass over a batch: outputs f(x) (N, n_out), the inputs of chosen layers (each
    (N, d_i)) and the input Jacobian d f / d x (N, n_out, *in)."""

    outputs: np.ndarray
    features: list
    jacobian: np.ndarray


# ----------------------------------------------------------------------------- input Jacobian
def _batch_jacobian_fn(model, batch_size: int, feature_shape: tuple, dtype: tf.DType,
                       layers: tuple = ()):
    """The compiled (B, *in) -> (f (B, n_out), inputs of ``layers``..., Jacobian
    (B, n_out, *in)) of ``model``, cached per batch shape and tapped layers."""
    cache = _JACOBIAN_FNS.setdefault(model, {})
    jit = _JIT["compile"]
    key = (batch_size, feature_shape, dtype.name, tuple(layer.name for layer in layers), jit)
    if key not in cache:
        spec = tf.TensorSpec((batch_size, *feature_shape), dtype)
        # the tapped activations are intermediate tensors of the same graph: one forward
        # pass gives the outputs, the features and the tape the Jacobian is read from
        probe = model if not layers else keras.Model(
            model.inputs[0], [model.outputs[0], *(layer.input for layer in layers)])

        @tf.function(input_signature=[spec], jit_compile=jit)
        def jacobian(x):
            # One forward pass, then the K vector-Jacobian products with one-hot cotangents
            # e_k vectorized into a single backward pass (pfor): close to the floor of one
            # forward plus K backward passes, 30% faster than K separate tape.gradient calls.
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = probe(x, training=False)
                y, taps = (out, []) if not layers else (out[0], list(out[1:]))
            n_out = y.shape[-1]
            cotangents = tf.transpose(tf.eye(n_out, batch_shape=[batch_size], dtype=y.dtype),
                                      [1, 0, 2])  # (K, B, K): e_k for every star
            grads = tf.vectorized_map(
                lambda v: tape.gradient(y, x, output_gradients=v,
                                        unconnected_gradients=ZERO), cotangents)
            return y, taps, tf.transpose(grads, [1, 0, *range(2, len(feature_shape) + 2)])

        cache[key] = jacobian
    return cache[key]


def _input_dtype(model) -> tf.DType:
    """The dtype of the model's input layer (a float64 network gets float64 flux), else the
    model's compute dtype."""
    inputs = getattr(model, "inputs", None)
    if inputs:
        return tf.as_dtype(inputs[0].dtype)
    return tf.as_dtype(getattr(model, "input_dtype", None) or "float32")


def forward_jacobian(model, x, batch_size: int = 256, scaler=None,
                     layers=()) -> ForwardJacobian:
    """Outputs, the inputs of ``layers`` and the input Jacobian D_n = d f(x_n) / d x_n of
    every star, from one compiled forward and backward pass per batch.

    Parameters
    ----------
    model : functional Keras model mapping (B, *in) to (B, n_out); run with ``training=False``.
    x : (N, *in) inputs (flux), cast to the model's input dtype.
    batch_size : stars per compiled call; the last batch is zero-padded to this size so the
        function is traced once (inference mode keeps the padding rows independent).
    scaler : optional ``LabelScaler``; if given the Jacobian is returned in physical label units
        (``scaler.jacobian_to_physical``), else in the model's standardized units. The outputs
        stay standardized.
    layers : layers of ``model`` whose inputs are returned (e.g. the first layer of the
        Laplace head, the last Dense layer), computed in the same forward pass.

    Returns
    -------
    ForwardJacobian: outputs (N, n_out) and features in the model's dtype, the Jacobian
    (N, n_out, *in) float32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    x = np.asarray(x)
    x = x.astype(_input_dtype(model).as_numpy_dtype, copy=False)
    n = x.shape[0]
    batch = min(batch_size, max(n, 1))
    layers = tuple(layers)
    fn = _batch_jacobian_fn(model, batch, tuple(x.shape[1:]), tf.as_dtype(x.dtype), layers)
    outputs, features, jacobians = [], [[] for _ in layers], []
    for start in range(0, n, batch):
        chunk = x[start:start + batch]
        n_real = chunk.shape[0]
        if n_real < batch:
            pad = np.zeros((batch - n_real, *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        y, taps, jac = fn(tf.constant(chunk))
        outputs.append(y.numpy()[:n_real])
        for store, tap in zip(features, taps, strict=True):
            store.append(tap.numpy()[:n_real])
        jacobians.append(jac.numpy()[:n_real].astype(np.float32, copy=False))
    if not jacobians:
        return ForwardJacobian(np.zeros((0, 0)), [np.zeros((0, 0)) for _ in layers],
                               np.zeros((0, 0, *x.shape[1:]), np.float32))
    jac = np.concatenate(jacobians)
    if scaler is not None:
        jac = np.asarray(scaler.jacobian_to_physical(jac), np.float32)
    return ForwardJacobian(np.concatenate(outputs), [np.concatenate(f) for f in features], jac)


def input_jacobian(model, x, batch_size: int = 256, scaler=None) -> np.ndarray:
    """Per-star input Jacobian D_n = d f(x_n) / d x_n, (N, n_out, *in) float32.

    ``forward_jacobian(...).jacobian``: batched, the last batch zero-padded to ``batch_size``
    (one trace); physical label units when a ``scaler`` is given, else standardized.
    """
    return forward_jacobian(model, x, batch_size, scaler).jacobian


# ------------------------------------------------------------------------------ input Hessian
def input_hessian(model, x) -> tf.Tensor:
    """Per-sample input Hessian d^2 f_k(x_n) / dx_n dx_n.

    Works eagerly and inside ``tf.function``. Gradients that do not depend on x (a model linear
    in its inputs, a ReLU network almost everywhere) come back as exact zeros of the right shape:
    both tapes use ``unconnected_gradients=ZERO`` where ``tf.hessians`` would raise and nested
    tapes would return None.

    Parameters
    ----------
    model : callable (Keras model) mapping (N, *in) to (N, n_out); called with training=False.
    x : (N, *in) tensor.

    Returns
    -------
    (N, n_out, *in, *in) tensor in the dtype of x.
    """
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape(persistent=True) as inner:
            inner.watch(x)
            y = model(x, training=False)
            sums = [tf.reduce_sum(y[:, k]) for k in range(y.shape[-1])]
        # per-sample gradients (inference mode: star n only affects f(x_n))
        grads = tf.stack([inner.gradient(s, x, unconnected_gradients=ZERO) for s in sums], 1)
    hess = outer.batch_jacobian(grads, x, unconnected_gradients=ZERO)
    # batch_jacobian can lose the static shape when the gradient is constant in x
    return tf.reshape(hess, tf.concat([tf.shape(grads), tf.shape(x)[1:]], 0))


# --------------------------------------------------------------------------- Hessian diagonal
class HessianDiagonal(NamedTuple):
    """Diagonal of a Hessian and its 1-sigma standard error (zeros for the exact method)."""

    diagonal: np.ndarray
    standard_error: np.ndarray


def _hvp_rows(fn, x: tf.Tensor, tangents: tf.Tensor) -> tf.Tensor:
    """Rows H(x) v_r for tangents (R, d): forward-over-reverse, vectorized over the tangents.

    The reverse pass gives grad fn(x); its directional derivative along v (forward mode,
    ``ForwardAccumulator``) is H v. ``tf.vectorized_map`` evaluates a chunk of tangents at once.
    """

    def hvp(tangent):
        with tf.autodiff.ForwardAccumulator(x, tangent) as acc:
            with tf.GradientTape() as tape:
                tape.watch(x)
                value = fn(x)
            grad = tape.gradient(value, x, unconnected_gradients=ZERO)
        return acc.jvp(grad, unconnected_gradients=ZERO)

    return tf.vectorized_map(hvp, tangents)


def hessian_diagonal(fn, x, method: str = "exact", n_samples: int = 100, seed: int = 0,
                     chunk_size: int = 64) -> HessianDiagonal:
    """Diagonal of the Hessian of a scalar function fn(x), without forming the matrix.

    ``exact``: H_ii = e_i^T H e_i from Hessian-vector products, ``chunk_size`` basis vectors
    at a time (forward-over-reverse with ``tf.autodiff.ForwardAccumulator``): memory
    O(chunk_size * d), d = x.size.
    ``hutchinson``: diag(H) = E[v * (H v)] for Rademacher v (exact in expectation); the mean of
    ``n_samples`` draws is returned with its standard error std / sqrt(n_samples).

    Parameters
    ----------
    fn : callable mapping a tensor of x's shape to a scalar (must be vectorizable).
    x : tensor or array, any shape.
    method : 'exact' or 'hutchinson'.
    n_samples, seed : Hutchinson probes and their seed.
    chunk_size : Hessian-vector products evaluated together.

    Returns
    -------
    HessianDiagonal(diagonal, standard_error), both numpy arrays of x's shape.
    """
    if method not in HESSIAN_DIAGONAL_METHODS:
        raise ValueError(f"method must be one of {HESSIAN_DIAGONAL_METHODS}, got {method!r}")
    x = tf.convert_to_tensor(x)
    shape = x.shape
    d = int(np.prod(shape))
    flat_fn = lambda flat: fn(tf.reshape(flat, shape))  # noqa: E731
    flat_x = tf.reshape(x, [d])
    dtype = x.dtype.as_numpy_dtype
    if method == "exact":
        diag = np.empty(d, dtype)
        for start in range(0, d, chunk_size):
            idx = np.arange(start, min(start + chunk_size, d))
            basis = np.zeros((idx.size, d), dtype)
            basis[np.arange(idx.size), idx] = 1
            rows = _hvp_rows(flat_fn, flat_x, tf.constant(basis)).numpy()
            diag[idx] = rows[np.arange(idx.size), idx]
        return HessianDiagonal(diag.reshape(shape), np.zeros(shape, dtype))
    if n_samples < 2:
        raise ValueError(f"hutchinson needs n_samples >= 2 for an error bar, got {n_samples}")
    probes = np.random.default_rng(seed).choice(np.array([-1, 1], dtype), size=(n_samples, d))
    draws = np.concatenate([
        probes[s:s + chunk_size] * _hvp_rows(flat_fn, flat_x, tf.constant(probes[s:s + chunk_size]))
        .numpy() for s in range(0, n_samples, chunk_size)
    ])
    mean = draws.mean(axis=0)
    stderr = draws.std(axis=0, ddof=1) / np.sqrt(n_samples)
    return HessianDiagonal(mean.reshape(shape), stderr.reshape(shape))


# ------------------------------------------------------------------------------ loss Hessian
def loss_hessian(model, x, y, weights, noise_precision=None) -> np.ndarray:
    """Exact Hessian of L = 1/2 sum_n sum_k lambda_k (f_k(x_n) - y_nk)^2 w.r.t. ``weights``.

    Parameters
    ----------
    model : Keras model (B, *in) -> (B, n_out), called with training=False.
    x, y : inputs (N, *in) and standardized targets (N, n_out).
    weights : list of the model's variables; the Hessian is over their concatenated, row-major
        flattened values (P = total size), in the order given.
    noise_precision : (n_out,) lambda_k = sigma_k^-2 (default ones).

    Returns
    -------
    (P, P) numpy array in the model's dtype (float64 for a float64 model).
    """
    weights = list(weights)
    dtype = tf.as_dtype(weights[0].dtype)  # the model's own dtype policy may say float32
    x = tf.cast(tf.convert_to_tensor(x), dtype)
    y = tf.cast(tf.convert_to_tensor(y), x.dtype)
    lam = tf.ones([y.shape[-1]], x.dtype) if noise_precision is None else tf.cast(
        noise_precision, x.dtype)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            f = tf.cast(model(x, training=False), x.dtype)
            loss = 0.5 * tf.reduce_sum(lam * tf.square(f - y))
        grads = inner.gradient(loss, weights, unconnected_gradients=ZERO)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
    blocks = outer.jacobian(flat, weights, unconnected_gradients=ZERO)
    p = int(flat.shape[0])
    return np.concatenate([tf.reshape(b, [p, -1]).numpy() for b in blocks], axis=1)
