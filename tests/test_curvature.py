"""GGN and exact Hessian of the head against brute-force float64 references."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.exceptions import ConfigError, NumericalError
from pipeline.laplace.curvature import Head, curvature_blocks, ggn_blocks
from tests.conftest import set_seed


def tiny_model(batchnorm: bool = False, seed: int = 2):
    """float64 network 5 -> 6 (tanh) [-> BN, Dropout] -> 4 (softplus) -> 3."""
    set_seed(seed)
    d = "float64"
    layers = [keras.Input((5,), dtype=d), keras.layers.Dense(6, "tanh", dtype=d)]
    if batchnorm:
        layers += [keras.layers.BatchNormalization(dtype=d), keras.layers.Dropout(0.3, dtype=d)]
    layers += [keras.layers.Dense(4, "softplus", dtype=d), keras.layers.Dense(3, dtype=d)]
    model = keras.Sequential(layers)
    if batchnorm:
        bn = model.layers[1]
        bn.moving_mean.assign(np.linspace(-0.3, 0.4, 6))
        bn.moving_variance.assign(np.linspace(0.5, 2.0, 6))
    return model


def per_sample_jacobians(model, x, variables) -> np.ndarray:
    """The naive reference: one GradientTape Jacobian per star, (N, 3, P) float64."""
    rows = []
    for n in range(len(x)):
        with tf.GradientTape(persistent=True) as tape:
            f = model(x[n:n + 1], training=False)[0]
            outputs = [f[k] for k in range(3)]
        rows.append([np.concatenate([g.numpy().ravel() for g in tape.gradient(out, variables)])
                     for out in outputs])
    return np.stack(rows)


@pytest.mark.parametrize("last_layers", [1, 2, 3])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_ggn_matches_per_sample_loop(rng, last_layers, batchnorm):
    model = tiny_model(batchnorm)
    x = rng.normal(size=(17, 5))
    head = Head(model, last_layers)
    head.check(x)
    dense = [la for la in model.layers if isinstance(la, keras.layers.Dense)][-last_layers:]
    variables = [v for la in dense for v in (la.kernel, la.bias)]
    assert head.names == [v.path for v in variables]
    ref_j = per_sample_jacobians(model, x, variables)
    phi = head.features(x, batch_size=7)
    jac, f = head.jacobian(phi)
    np.testing.assert_allclose(f.numpy(), model(x, training=False).numpy(), rtol=1e-12)
    np.testing.assert_allclose(jac.numpy(), ref_j, rtol=1e-10, atol=1e-13)
    # the first layer's block from the outer-product structure of its Jacobian
    assert head.outer_product_layer == (dense[0].kernel.shape[0] + 1, dense[0].kernel.shape[1])
    ggn = ggn_blocks(head, phi, batch_size=7)  # 4 streamed batches, last one short
    ref = np.einsum("nkp,nkq->kpq", ref_j, ref_j)
    assert ggn.shape == (3, head.n_params, head.n_params) and ggn.dtype == np.float64
    assert np.abs(ggn - ref).max() / np.abs(ref).max() < 1e-8


def test_ggn_for_a_subset_of_weight_tensors(rng):
    model = tiny_model()
    x = rng.normal(size=(11, 5))
    d1, d2, d3 = model.layers
    subset = [d3.kernel, d1.bias]  # any order, any layers of the head
    head = Head(model, 3, weights=[v.path for v in subset])
    assert head.names == [d1.bias.path, d3.kernel.path]  # model order
    assert head.outer_product_layer is None  # J^T J by dsyrk
    ref_j = per_sample_jacobians(model, x, [d1.bias, d3.kernel])
    ggn = ggn_blocks(head, head.features(x))
    ref = np.einsum("nkp,nkq->kpq", ref_j, ref_j)
    assert np.abs(ggn - ref).max() / np.abs(ref).max() < 1e-8
    np.testing.assert_array_equal(head.layer_index, np.repeat([0, 1], [6, 12]))
    with pytest.raises(ValueError, match="not a kernel or bias"):
        Head(model, 1, weights=[d1.kernel])
    with pytest.raises(ConfigError, match="laplace.last_layers"):
        Head(model, 4)


@pytest.mark.parametrize("last_layers", [1, 2])
def test_exact_hessian_matches_differences_of_the_gradient(rng, last_layers):
    model = tiny_model()
    x = rng.normal(size=(15, 5))
    y = model(x).numpy() + 0.3 * rng.normal(size=(15, 3))
    head = Head(model, last_layers)
    phi = head.features(x)
    blocks, report = curvature_blocks(head, phi, y, "hessian", batch_size=6, chunk_size=5,
                                      indefinite="clip")
    theta0 = head.map_values()

    @tf.function
    def label_gradient_tf(t, k):
        with tf.GradientTape() as tape:
            tape.watch(t)
            f, _ = head.forward(phi, head.params(t))
            loss = 0.5 * tf.reduce_sum((tf.gather(f, k, axis=1) - tf.gather(y, k, axis=1)) ** 2)
        return tape.gradient(loss, t)

    def label_gradient(theta, k):
        return label_gradient_tf(tf.constant(theta), tf.constant(k)).numpy()

    h = 1e-6
    raw = np.empty_like(blocks)
    for k in range(3):
        for p in range(head.n_params):
            step = np.zeros(head.n_params)
            step[p] = h
            raw[k, :, p] = (label_gradient(theta0 + step, k)
                            - label_gradient(theta0 - step, k)) / (2 * h)
    if report["n_negative"] == 0:
        np.testing.assert_allclose(blocks, raw, rtol=1e-6, atol=1e-7)
    else:  # clipped: the PSD projection of the finite-difference Hessian
        w, q = np.linalg.eigh(0.5 * (raw + np.transpose(raw, (0, 2, 1))))
        np.testing.assert_allclose(blocks, q * np.maximum(w, 0)[:, None] @ np.transpose(
            q, (0, 2, 1)), rtol=1e-5, atol=1e-6)
    if last_layers == 1:  # f is linear in the last layer: Hessian = GGN exactly
        ggn = ggn_blocks(head, phi)
        np.testing.assert_allclose(blocks, ggn, rtol=1e-12, atol=1e-12)


def test_indefinite_hessian_is_reported_and_handled(rng):
    model = tiny_model()
    x = rng.normal(size=(12, 5))
    y = model(x).numpy() + 30.0 * rng.normal(size=(12, 3))  # huge residuals: indefinite
    head = Head(model, 2)
    phi = head.features(x)
    with pytest.raises(NumericalError, match="indefinite.*laplace.indefinite"):
        curvature_blocks(head, phi, y, "hessian", indefinite="fail")
    clipped, report = curvature_blocks(head, phi, y, "hessian", indefinite="clip")
    assert report["n_negative"] > 0 and report["min_eigenvalue"] < 0
    assert report["indefinite"] == "clip"
    assert all(np.linalg.eigvalsh(c).min() > -1e-9 * np.abs(c).max() for c in clipped)
    fallback, report = curvature_blocks(head, phi, y, "hessian", indefinite="ggn")
    np.testing.assert_allclose(fallback, ggn_blocks(head, phi), rtol=1e-12)
    with pytest.raises(ConfigError, match="laplace.curvature"):
        curvature_blocks(head, phi, y, "kfac")


# ------------------------------------------------------------------ head check tolerance
def cancelling_model(m: int = 32, seed: int = 0):
    """float32 16 -> 2m (relu) -> 3 whose output terms of size ~40 cancel to an output ~1.

    The hidden units come in identical pairs (a_j = a_{j+m} bit for bit); the output weights
    are 20 + d_j and -20, so f = sum_j a_j d_j ~ 1 while sum_j |a_j w_j| ~ 2400, as in the
    least-squares refit on the dwarf-star data (weights up to 22).
    """
    rng = np.random.default_rng(seed)
    inp = keras.Input((16,))
    h = keras.layers.Dense(2 * m, "relu", name="hidden")(inp)
    model = keras.Model(inp, keras.layers.Dense(3, name="labels")(h))
    k = np.abs(rng.normal(0, 0.25, (16, m)))
    model.get_layer("hidden").set_weights([np.hstack([k, k]).astype("f4"), np.zeros(2 * m, "f4")])
    w = np.vstack([20 + rng.normal(0, 0.05, (m, 3)), np.full((m, 3), -20.0)])
    model.get_layer("labels").set_weights([w.astype("f4"), np.zeros(3, "f4")])
    return model


def test_head_check_allows_float32_rounding_of_cancelling_terms():
    model = cancelling_model()
    x = np.random.default_rng(1).uniform(0, 1, (8, 16)).astype("f4")
    ref = np.asarray(model(x), np.float64)
    # reference in float64 numpy, independent of the head code
    a = np.maximum(x.astype(np.float64) @ model.get_layer("hidden").kernel.numpy(), 0)
    kernel = model.get_layer("labels").kernel.numpy().astype(np.float64)
    f64 = a @ kernel
    terms = np.abs(a) @ np.abs(kernel)
    assert np.abs(ref).max() < 2 and 1500 < terms.max() < 4000
    # the fixed rtol = 1e-4 (relative to max(|f|, 1)) of the old check fails on this model
    scale = max(np.abs(ref).max(), 1.0)
    assert not np.allclose(f64, ref, rtol=1e-4, atol=1e-4 * scale)
    for last_layers in (1, 2):
        head = Head(model, last_layers)
        extra = (np.abs(x) @ np.abs(model.get_layer("hidden").kernel.numpy())) @ np.abs(kernel)
        expected = terms + extra * (last_layers == 2)  # |x||W1| carried through the relu
        np.testing.assert_allclose(head.rounding_scale(head.features(x)), expected, rtol=1e-6)
        head.check(x)


def test_head_check_still_rejects_a_wrong_head():
    from pipeline.exceptions import ModelFileError

    x = np.random.default_rng(1).uniform(0, 1, (8, 16)).astype("f4")
    # a kernel of the head differing by 1e-3 relative from the model's
    model = cancelling_model()
    head = Head(model, 1)
    params = head.params()
    params[0] = params[0] * (1 + 1e-3 * np.random.default_rng(2).standard_normal(params[0].shape))
    head.params = lambda theta=None: params
    with pytest.raises(ModelFileError, match="do not form a chain"):
        head.check(x)
    # a skip connection: the output is not a chain of the last Dense layers
    inp = keras.Input((16,))
    h0 = keras.layers.Dense(3, "tanh")(inp)
    out = keras.layers.Add()([keras.layers.Dense(3)(h0), h0])
    with pytest.raises(ModelFileError, match="do not form a chain"):
        Head(keras.Model(inp, out), 1).check(x)
    # an ordinary float32 network passes, and a 1e-3 perturbation of it fails
    set_seed(3)
    plain = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, "relu"),
                              keras.layers.Dense(3)])
    Head(plain, 2).check(x)
    head = Head(plain, 2)
    params = head.params()
    params[2] = params[2] * (1 + 1e-3)
    head.params = lambda theta=None: params
    with pytest.raises(ModelFileError, match="differs from the model"):
        head.check(x)
