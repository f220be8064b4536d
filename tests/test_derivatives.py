"""Input Jacobian / Hessian, Hessian diagonal and loss Hessian against float64 references."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.nn import derivatives
from pipeline.nn.derivatives import (
    forward_jacobian,
    hessian_diagonal,
    input_hessian,
    input_jacobian,
    loss_hessian,
)
from tests.conftest import set_seed


def smooth_model(n_in: int, dtype: str = "float32", batchnorm: bool = False):
    set_seed(3)
    layers = [keras.Input((n_in,), dtype=dtype), keras.layers.Dense(6, "tanh", dtype=dtype)]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization(dtype=dtype))
    layers += [keras.layers.Dense(5, "softplus", dtype=dtype), keras.layers.Dense(3, dtype=dtype)]
    return keras.Sequential(layers)


def float64_clone(model, n_in: int):
    clone = smooth_model(n_in, "float64")
    clone.set_weights([w.astype(np.float64) for w in model.get_weights()])
    return clone


def test_input_jacobian_matches_central_differences_and_tape_loop(rng):
    model = smooth_model(7)
    x = rng.normal(size=(10, 7)).astype(np.float32)
    jac = input_jacobian(model, x, batch_size=4)
    assert jac.shape == (10, 3, 7) and jac.dtype == np.float32

    m64 = float64_clone(model, 7)
    h = 1e-6
    x64 = x.astype(np.float64)
    fd = np.empty((10, 3, 7))
    for p in range(7):  # float64 central differences, all stars at once
        step = np.zeros(7)
        step[p] = h
        fd[:, :, p] = (m64(x64 + step).numpy() - m64(x64 - step).numpy()) / (2 * h)
    np.testing.assert_allclose(jac, fd, rtol=2e-5, atol=2e-6)

    loop = np.stack([  # the naive reference: one tape per star
        tf.squeeze(_tape_jacobian(model, x[n:n + 1]), 0).numpy() for n in range(10)])
    np.testing.assert_allclose(jac, loop, rtol=1e-6, atol=1e-7)


def _tape_jacobian(model, x):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=False)
    return tape.batch_jacobian(y, x)


def test_input_jacobian_traces_once_and_applies_scaler(rng):
    model = smooth_model(5)
    x = rng.normal(size=(11, 5)).astype(np.float32)
    jac = input_jacobian(model, x, batch_size=4)  # 3 batches, the last one padded
    fns = list(derivatives._JACOBIAN_FNS[model].values())
    assert len(fns) == 1 and fns[0].experimental_get_tracing_count() == 1

    class Scaler:
        scale = np.array([100.0, 0.5, 0.1])

        def jacobian_to_physical(self, j):
            return j * self.scale[:, None]

    phys = input_jacobian(model, x, batch_size=4, scaler=Scaler())
    np.testing.assert_allclose(phys, jac * Scaler.scale[:, None], rtol=1e-6)


def test_forward_jacobian_is_the_separate_passes_in_one(rng):
    """Outputs, tapped layer inputs and Jacobian of the one compiled pass equal model(x), a
    probe model of each layer input and the per-star tape Jacobian (float32 rounding), also
    for a last batch padded with zeros."""
    model = smooth_model(7)
    x = rng.normal(size=(10, 7)).astype(np.float32)
    layers = [model.layers[1], model.layers[2]]  # inputs: tanh features, softplus features
    out = forward_jacobian(model, x, batch_size=4, layers=layers)
    np.testing.assert_allclose(out.outputs, model(x, training=False).numpy(), rtol=1e-6,
                               atol=1e-7)
    for layer, features in zip(layers, out.features, strict=True):
        probe = keras.Model(model.inputs[0], layer.input)
        assert features.shape == (10, layer.input.shape[-1])
        np.testing.assert_allclose(features, probe(x, training=False).numpy(), rtol=1e-6,
                                   atol=1e-7)
    loop = np.stack([tf.squeeze(_tape_jacobian(model, x[n:n + 1]), 0).numpy()
                     for n in range(10)])
    np.testing.assert_allclose(out.jacobian, loop, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out.jacobian, input_jacobian(model, x, batch_size=4))
    # a different tap set is its own compiled function, the untapped one is left alone
    assert len(derivatives._JACOBIAN_FNS[model]) == 2


def test_xla_jacobian_pass_is_deterministic_and_matches_the_plain_one(rng):
    """config ``inference_jit``: the XLA-compiled pass gives the same bits twice and the
    plain pass's outputs, features and Jacobian to float32 rounding (a smooth model: no ReLU
    kink to fall on either side of); ``auto`` turns it on without a GPU; the plain pass is
    left cached beside it."""
    from pipeline import runtime

    model = smooth_model(7)
    x = rng.normal(size=(10, 7)).astype(np.float32)
    layers = [model.layers[1]]
    # an earlier step run in this process (runtime.configure, auto) may have left XLA on
    before = derivatives.set_jit_compile(False)
    try:
        plain = forward_jacobian(model, x, batch_size=4, layers=layers)
        assert derivatives.set_jit_compile(True) is False  # the previous setting, to restore
        xla, again = (forward_jacobian(model, x, batch_size=4, layers=layers) for _ in range(2))
        runtime.configure({"seed": 0, "deterministic": True, "inference_jit": "auto"})
        assert derivatives._JIT["compile"] is (not runtime.gpu_visible())
        runtime.configure({"seed": 0, "deterministic": True, "inference_jit": False})
        assert derivatives._JIT["compile"] is False
    finally:
        derivatives.set_jit_compile(before)
    for a, b in ((xla.outputs, again.outputs), (xla.jacobian, again.jacobian)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(xla.outputs, plain.outputs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xla.features[0], plain.features[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xla.jacobian, plain.jacobian, rtol=1e-5, atol=1e-6)
    assert len(derivatives._JACOBIAN_FNS[model]) == 2  # plain and XLA, same batch and taps


def test_input_jacobian_with_batchnorm_is_independent_of_batch_size(rng):
    model = smooth_model(6, batchnorm=True)
    bn = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    bn.moving_mean.assign(rng.normal(size=6).astype(np.float32))
    bn.moving_variance.assign(rng.uniform(0.2, 3.0, size=6).astype(np.float32))
    x = rng.normal(size=(9, 6)).astype(np.float32)
    ref = input_jacobian(model, x, batch_size=1)
    for batch in (2, 4, 9, 64):
        np.testing.assert_allclose(input_jacobian(model, x, batch_size=batch), ref,
                                   rtol=1e-6, atol=1e-7)  # float32 rounding only
    # and it is the inference-mode Jacobian (moving statistics), checked in float64
    m64 = smooth_model(6, "float64", batchnorm=True)
    m64.set_weights([w.astype(np.float64) for w in model.get_weights()])
    ref64 = _tape_jacobian(m64, x.astype(np.float64)).numpy()
    np.testing.assert_allclose(ref, ref64, rtol=1e-5, atol=1e-7)


def test_input_hessian_of_linear_model_is_exact_zeros():
    set_seed(0)
    model = keras.Sequential([keras.Input((3, 10)), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    x = tf.random.normal((4, 3, 10))
    eager = input_hessian(model, x)
    graph = tf.function(lambda v: input_hessian(model, v))(x)
    for hess in (eager, graph):
        assert hess is not None
        assert tuple(hess.shape) == (4, 3, 3, 10, 3, 10)
        assert np.all(hess.numpy() == 0.0)


def test_input_hessian_matches_differences_of_the_jacobian(rng):
    m64 = float64_clone(smooth_model(4), 4)
    x = rng.normal(size=(3, 4))
    hess = input_hessian(m64, tf.constant(x)).numpy()
    assert hess.shape == (3, 3, 4, 4)
    h = 1e-5
    for p in range(4):
        step = np.zeros(4)
        step[p] = h
        plus, minus = _tape_jacobian(m64, x + step), _tape_jacobian(m64, x - step)
        fd = (plus.numpy() - minus.numpy()) / (2 * h)
        np.testing.assert_allclose(hess[:, :, :, p], fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(hess, np.swapaxes(hess, -1, -2), atol=1e-12)


def _full_hessian(fn, x):
    x = tf.constant(x)
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            value = fn(x)
        grad = inner.gradient(value, x)
    return outer.jacobian(grad, x).numpy()


def test_hessian_diagonal_exact_and_hutchinson(rng):
    m64 = float64_clone(smooth_model(9), 9)
    fn = lambda v: tf.reduce_sum(m64(v[None], training=False)[0] * [1.0, -2.0, 0.5])  # noqa: E731
    x = rng.normal(size=9)
    full = _full_hessian(fn, x)
    exact = hessian_diagonal(fn, x, method="exact", chunk_size=4)
    np.testing.assert_allclose(exact.diagonal, np.diag(full), rtol=1e-10, atol=1e-13)
    assert np.all(exact.standard_error == 0)

    hutch = hessian_diagonal(fn, x, method="hutchinson", n_samples=4000, seed=1, chunk_size=500)
    # the estimator is v_i (H v)_i = H_ii + sum_{j != i} H_ij v_i v_j: its exact std is known
    true_se = np.sqrt((full**2).sum(1) - np.diag(full) ** 2) / np.sqrt(4000)
    np.testing.assert_allclose(hutch.standard_error, true_se, rtol=0.1)
    assert np.all(np.abs(hutch.diagonal - np.diag(full)) < 4.5 * true_se)
    with pytest.raises(ValueError, match="exact"):
        hessian_diagonal(fn, x, method="full")


def test_loss_hessian_matches_differences_of_the_gradient(rng):
    m64 = float64_clone(smooth_model(4), 4)
    x = rng.normal(size=(20, 4))
    y = rng.normal(size=(20, 3))
    lam = np.array([1.0, 4.0, 0.25])
    weights = [m64.layers[1].kernel, m64.layers[2].bias]
    hess = loss_hessian(m64, x, y, weights, noise_precision=lam)
    p = sum(int(np.prod(w.shape)) for w in weights)
    assert hess.shape == (p, p) and hess.dtype == np.float64

    def gradient():
        with tf.GradientTape() as tape:
            f = m64(x, training=False)
            loss = 0.5 * tf.reduce_sum(lam * (f - y) ** 2)
        return np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, weights)])

    h = 1e-6
    fd = np.empty((p, p))
    col = 0
    for w in weights:
        base = w.numpy()
        for i in range(base.size):
            grads = []
            for sign in (1, -1):
                bumped = base.ravel().copy()
                bumped[i] += sign * h
                w.assign(bumped.reshape(base.shape))
                grads.append(gradient())
            fd[:, col] = (grads[0] - grads[1]) / (2 * h)
            w.assign(base)
            col += 1
    np.testing.assert_allclose(hess, fd, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(hess, hess.T, atol=1e-10)
