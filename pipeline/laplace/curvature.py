"""Curvature of the training loss with respect to the weights of the last k Dense layers.

Notation (docs/laplace.md): f(x; theta) -> n_out standardized labels, theta_L = the kernels
and biases of the last k ``keras.layers.Dense`` layers (or any subset of those tensors), P_L
their total size. The training loss with per-label noise precisions beta_k = sigma_k^-2 is

    L(theta_L) = 1/2 sum_n sum_k beta_k (f_k(x_n) - y_nk)^2 = sum_k beta_k L_k.

Curvatures are returned as per-label blocks C_k (n_out, P_L, P_L) so that any noise level
combines them without recomputation, C(beta) = sum_k beta_k C_k:

* GGN:      G_k = sum_n J_nk^T J_nk,            J_nk = d f_k(x_n) / d theta_L (P_L,)
* Hessian:  H_k = G_k + sum_n r_nk d^2 f_k(x_n) / d theta_L^2,   r_nk = f_k(x_n) - y_nk

**Head only.** The activations phi_n entering the first head layer do not depend on theta_L,
so they are computed once (:meth:`Head.features`) and every curvature runs on the small head
network in float64. Per-sample Jacobians use the outer-product structure of a Dense layer,
z = a W + b: d f_k / d W = a^T delta_k, d f_k / d b = delta_k with delta_k = d f_k / d z,
and delta_k for every star of a batch comes from one backward pass of sum_n f_k(x_n) (stars
are independent in inference mode). No loop over stars; memory O(batch * P_L + n_out * P_L^2).
"""

from __future__ import annotations

import inspect
import logging

import keras
import numpy as np
import tensorflow as tf
from scipy.linalg import blas

from pipeline.exceptions import ConfigError, DataError, ModelFileError, NumericalError
from pipeline.laplace.kronecker import pair_products, unpack_pair_gram
from pipeline.streaming import batches

log = logging.getLogger(__name__)

CURVATURES = ("ggn", "hessian")
INDEFINITE_ACTIONS = ("fail", "clip", "ggn")
DTYPE = tf.float64


class Head:
    """The last ``last_layers`` Dense layers of ``model`` (and what lies between and after
    them) as a float64 function of the subset weights.

    Parameters
    ----------
    model : Keras model whose last k Dense layers form a chain up to the output.
    last_layers : k >= 1 (config ``laplace.last_layers``).
    weights : optional subset of the head's kernels/biases (variables or their ``path``
        names); default all of them.
    """

    def __init__(self, model, last_layers: int = 2, weights=None):
        layers = list(model.layers)
        dense = [i for i, layer in enumerate(layers) if isinstance(layer, keras.layers.Dense)]
        if not 1 <= last_layers <= len(dense):
            raise ConfigError(
                f"config key 'laplace.last_layers' = {last_layers}: the model has {len(dense)} "
                f"Dense layers; choose 1 to {len(dense)}")
        self.model = model
        self.layers = layers[dense[-last_layers]:]
        dense_layers = [la for la in self.layers if isinstance(la, keras.layers.Dense)]
        # (variable, index of its Dense layer in the head, 'kernel' | 'bias')
        self.slots = [(v, i, kind) for i, la in enumerate(dense_layers)
                      for v, kind in zip(_dense_vars(la), ("kernel", "bias"), strict=False)]
        self.all_variables = [v for v, _, _ in self.slots]
        self.variables = self._select(weights)
        self.names = [v.path for v in self.variables]
        self.shapes = [tuple(v.shape) for v in self.variables]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.n_params = int(sum(self.sizes))
        self._selected = {id(v) for v in self.variables}
        self._body = None
        self._jac_fns = {}  # outer_kernel -> compiled Jacobian (_jacobian_fn)

    def _select(self, weights):
        if weights is None:
            return list(self.all_variables)
        by_name = {v.path: v for v in self.all_variables}
        chosen = []
        for w in weights:
            key = w if isinstance(w, str) else getattr(w, "path", None)
            if key not in by_name:
                raise ValueError(f"weight {key!r} is not a kernel or bias of the head; valid: "
                                 f"{', '.join(by_name)}")
            chosen.append(by_name[key])
        order = {v.path: i for i, v in enumerate(self.all_variables)}  # keep model order
        unique = {v.path: v for v in chosen}
        return sorted(unique.values(), key=lambda v: order[v.path])

    # ------------------------------------------------------------------------- parameters
    @property
    def outer_product_layer(self) -> tuple[int, int] | None:
        """(m, d_out) when the subset weights start with the kernel (d_in, d_out) and the bias
        of the head's first Dense layer, whose Jacobian is the outer product a~ (x) g of
        a~ = (phi, 1) (m = d_in + 1 entries) and g = d f / d z (``pipeline.laplace.kronecker``);
        else None."""
        first = [(id(v), owner, kind) for v, owner, kind in self.slots[:2]]
        chosen = [(id(v), 0, kind) for v, kind in zip(self.variables[:2], ("kernel", "bias"),
                                                      strict=False)]
        if first != chosen:
            return None
        n_in, n_out = self.shapes[0]
        return n_in + 1, n_out

    @property
    def layer_index(self) -> np.ndarray:
        """(P_L,) index of the Dense layer each subset weight belongs to (for a layer prior)."""
        owner = {id(v): i for v, i, _ in self.slots}
        ids = [owner[id(v)] for v in self.variables]
        _, compact = np.unique(ids, return_inverse=True)
        return np.repeat(compact, self.sizes)

    def map_values(self) -> np.ndarray:
        """theta_L* (P_L,) float64: the subset weights, each flattened row-major, concatenated."""
        return np.concatenate([np.asarray(v.numpy(), np.float64).ravel() for v in self.variables])

    def params(self, theta=None) -> list[tf.Tensor]:
        """All head kernels/biases as float64 tensors; subset ones from ``theta`` if given."""
        if theta is None:
            return [tf.constant(np.asarray(v.numpy(), np.float64)) for v in self.all_variables]
        theta = tf.convert_to_tensor(theta, DTYPE)
        pieces = iter(tf.split(theta, self.sizes))
        return [tf.reshape(next(pieces), v.shape) if id(v) in self._selected
                else tf.constant(np.asarray(v.numpy(), np.float64)) for v in self.all_variables]

    # ---------------------------------------------------------------------------- forward
    @property
    def first_layer(self):
        """The first head layer, whose input is phi; None when phi is the model's input."""
        return None if self.layers[0] is self.model.layers[0] else self.layers[0]

    def features(self, x, batch_size: int = 256) -> np.ndarray:
        """phi = body(x) (N, d) float64: activations entering the head (inference mode)."""
        if self._body is None and self.first_layer is not None:
            self._body = keras.Model(self.model.inputs[0], self.first_layer.input)
        x = np.asarray(x)
        if self.first_layer is None:
            return x.reshape(len(x), -1).astype(np.float64)
        out = [np.asarray(self._body(x[s:s + batch_size], training=False), np.float64)
               for s in range(0, len(x), batch_size)]
        return np.concatenate(out)

    def forward(self, phi, params, watch=None):
        """f (B, n_out) float64 from phi (B, d); ``watch(z)`` sees each Dense pre-activation.

        Returns f and the list of (input a, pre-activation z) of every Dense layer.
        """
        h = tf.convert_to_tensor(phi, DTYPE)
        params = iter(params)
        taps = []
        for layer in self.layers:
            if isinstance(layer, keras.layers.Dense):
                a = h
                z = tf.matmul(a, next(params))
                if layer.use_bias:
                    z = z + next(params)
                if watch is not None:
                    watch(z)
                taps.append((a, z))
                h = layer.activation(z)
            elif isinstance(layer, keras.layers.BatchNormalization):
                h = _batchnorm_inference(layer, h)
            elif not layer.weights:
                h = layer.call(h, training=False) if _has_training(layer) else layer.call(h)
            else:
                raise ModelFileError(
                    f"layer '{layer.name}' ({type(layer).__name__}) inside the last Dense "
                    "layers has weights the Laplace head cannot handle; lower "
                    "laplace.last_layers so the head starts after it")
        return h, taps

    def rounding_scale(self, phi, params=None) -> np.ndarray:
        """(B, n_out) float64: sum of |terms| behind each output, the scale of its rounding.

        Walks the head like :meth:`forward`, carrying for every activation h a magnitude
        m >= 0: a Dense layer z = a W + b adds ``(|a| + m_a) @ |W| + |b|`` (the absolute
        values of the products it sums, plus the earlier magnitudes it propagates), an
        activation passes m on (its slope is at most about 1), a BatchNormalization scales
        ``m + |h| + |mean|`` by |gamma| / sqrt(var + eps) and adds |beta|. A float32 network
        evaluating the same chain differs from the float64 head by a few float32 epsilons
        times m, however much the terms cancel in the output.
        """
        params = iter(self.params() if params is None else params)
        h = tf.convert_to_tensor(phi, DTYPE)
        mag = tf.zeros_like(h)
        for layer in self.layers:
            if isinstance(layer, keras.layers.Dense):
                kernel = next(params)
                z = tf.matmul(h, kernel)
                mag = tf.matmul(tf.abs(h) + mag, tf.abs(kernel))
                if layer.use_bias:
                    bias = next(params)
                    z, mag = z + bias, mag + tf.abs(bias)
                h = layer.activation(z)
            elif isinstance(layer, keras.layers.BatchNormalization):
                as64 = lambda v: tf.cast(tf.convert_to_tensor(v), DTYPE)  # noqa: E731
                scale = 1.0 / tf.sqrt(as64(layer.moving_variance) + layer.epsilon)
                if layer.scale:
                    scale = scale * as64(layer.gamma)
                mag = tf.abs(scale) * (mag + tf.abs(h) + tf.abs(as64(layer.moving_mean)))
                if layer.center:
                    mag = mag + tf.abs(as64(layer.beta))
                h = _batchnorm_inference(layer, h)
            else:
                call = (lambda t, la=layer: la.call(t, training=False)) if _has_training(layer) \
                    else layer.call
                out = call(h)
                if tuple(out.shape) != tuple(h.shape):  # reshape, flatten: move m alike
                    mag = call(mag)
                h = out
        return mag.numpy()

    def check(self, x, batch_size: int = 256, factor: float = 64.0, floor: float = 1e-6) -> None:
        """Verify head(body(x)) reproduces model(x) (the layers after the split form a chain).

        The model runs in its own precision (float32), the head in float64, so they differ by
        rounding. The tolerance per star and output is ``factor * eps(model dtype) *
        (m + |f|) + floor`` with m from :meth:`rounding_scale`, the sum of the absolute
        values of the terms added along the chain: an output layer whose terms of size 1000
        cancel to 1 is judged against the rounding of 1000, not of 1. A wrong chain (a branch
        the head misses, a different weight) differs by far more.
        """
        x = np.asarray(x)[:8]
        raw = np.asarray(self.model(x, training=False))
        ref = raw.astype(np.float64)
        eps = float(np.finfo(raw.dtype if raw.dtype.kind == "f" else np.float32).eps)
        phi = self.features(x, batch_size)
        params = self.params()
        try:
            out = np.asarray(self.forward(phi, params)[0], np.float64)
            mag = self.rounding_scale(phi, params)
        except ModelFileError:
            raise
        except Exception as exc:  # a layer fed one tensor where the graph gives it several
            raise ModelFileError(
                "the last Dense layers of the model do not form a chain up to the output "
                f"({type(exc).__name__}: {exc}); choose a smaller laplace.last_layers") from None
        if out.shape != ref.shape:
            raise ModelFileError(
                "the last Dense layers of the model do not form a chain up to the output "
                f"(head output shape {out.shape}, model {ref.shape}); choose a smaller "
                "laplace.last_layers")
        tol = factor * eps * (mag + np.abs(ref)) + floor
        diff = np.abs(out - ref)
        if not np.all(diff <= tol):
            worst = np.unravel_index(np.argmax(diff / tol), diff.shape)
            raise ModelFileError(
                "the last Dense layers of the model do not form a chain up to the output "
                f"(head output differs from the model by {diff[worst]:.3g}, more than the "
                f"{tol[worst]:.3g} that float rounding of its terms (sum of |terms| "
                f"{mag[worst]:.3g}) allows); choose a smaller laplace.last_layers")

    # -------------------------------------------------------------------------- Jacobians
    def jacobian(self, phi, theta=None, outer_kernel: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
        """Per-sample J (B, n_out, P_L) = d f / d theta_L and f (B, n_out), float64.

        ``outer_kernel=False`` (only with :attr:`outer_product_layer`) leaves out the block of
        the first layer's kernel, a~ (x) g_k, which its bias block g_k and phi determine:
        J is then (B, n_out, P_L - m d_out + d_out), the bias block first."""
        if not outer_kernel and self.outer_product_layer is None:
            raise ValueError("outer_kernel=False needs the head's weights to start with its "
                             "first Dense layer's kernel and bias (outer_product_layer)")
        params = self.params(theta)
        fn = _jacobian_fn(self, outer_kernel)
        return fn(tf.convert_to_tensor(phi, DTYPE), params)


def _dense_vars(layer) -> list:
    return [layer.kernel] + ([layer.bias] if layer.use_bias else [])


def _has_training(layer) -> bool:
    return "training" in inspect.signature(layer.call).parameters


def _batchnorm_inference(layer, h):
    """BatchNormalization with its moving statistics, in float64 (per-sample affine map)."""
    as64 = lambda v: tf.cast(tf.convert_to_tensor(v), DTYPE)  # noqa: E731
    out = (h - as64(layer.moving_mean)) / tf.sqrt(as64(layer.moving_variance) + layer.epsilon)
    if layer.scale:
        out = out * as64(layer.gamma)
    if layer.center:
        out = out + as64(layer.beta)
    return out


def _jacobian_fn(head: Head, outer_kernel: bool = True):
    """Compiled (phi, params) -> (J, f) for this head (cached on the Head), without the first
    layer's kernel block unless ``outer_kernel`` (:meth:`Head.jacobian`)."""
    if outer_kernel in head._jac_fns:
        return head._jac_fns[outer_kernel]
    slots = [(owner, kind) for v, owner, kind in head.slots if id(v) in head._selected]
    if not outer_kernel:
        slots = slots[1:]  # the first layer's kernel: a~ (x) g_k, built by whoever needs it

    @tf.function(reduce_retracing=True)
    def fn(phi, params):
        with tf.GradientTape(persistent=True) as tape:
            f, taps = head.forward(phi, params, watch=tape.watch)
            sums = [tf.reduce_sum(f[:, k]) for k in range(f.shape[-1])]
        rows = []
        for s in sums:  # one backward pass per label, all stars at once
            deltas = tape.gradient(s, [z for _, z in taps], unconnected_gradients="zero")
            blocks = []
            for owner, kind in slots:
                a, delta = taps[owner][0], deltas[owner]
                if kind == "kernel":
                    blocks.append(tf.reshape(a[:, :, None] * delta[:, None, :],
                                             [tf.shape(a)[0], -1]))
                else:
                    blocks.append(delta)
            rows.append(tf.concat(blocks, axis=1))
        return tf.stack(rows, axis=1), f

    head._jac_fns[outer_kernel] = fn
    return fn


# ------------------------------------------------------------------------------ curvature
def ggn_blocks(head: Head, phi, batch_size: int = 256) -> np.ndarray:
    """Per-label GGN blocks G_k = sum_n J_nk^T J_nk, (n_out, P_L, P_L) float64.

    Streams batches of stars. On a GPU each batch is one batched matrix product. On the CPU,
    when the weights start with the head's first Dense layer (``Head.outer_product_layer``),
    its block comes from the outer-product structure of its Jacobian (:func:`_outer_ggn`),
    about half the products; otherwise each label's block is accumulated in place by BLAS
    ``dsyrk`` (G += J^T J on one triangle: half the products of a general matrix product, no
    (P_L, P_L) temporary per batch), and the other triangle is filled at the end.
    """
    if tf.config.list_physical_devices("GPU"):
        total = 0.0
        for s in batches(len(phi), batch_size):
            jac, _ = head.jacobian(phi[s])
            total = total + tf.einsum("bkp,bkq->kpq", jac, jac)
        return np.asarray(total)
    if head.outer_product_layer is not None:
        return _outer_ggn(head, phi, batch_size)
    total = None
    for s in batches(len(phi), batch_size):
        jac = np.asarray(head.jacobian(phi[s])[0], np.float64)  # (B, K, P_L)
        if total is None:  # Fortran order: dsyrk updates each block in place
            total = [np.zeros((jac.shape[2],) * 2, order="F") for _ in range(jac.shape[1])]
        for k, block in enumerate(total):  # trans=1: block + J_k^T J_k, upper triangle only
            total[k] = blas.dsyrk(1.0, jac[:, k, :], beta=1.0, c=block, trans=1, overwrite_c=1)
    if total is None:
        raise DataError("ggn_blocks: no stars")
    return np.stack([np.triu(g) + np.triu(g, 1).T for g in total])


def _outer_ggn(head: Head, phi, batch_size: int) -> np.ndarray:
    """:func:`ggn_blocks` of a head whose first m d_out weights are its first Dense layer's.

    There J_k = a~ (x) g_k (``pipeline.laplace.kronecker``), so that layer's block is
    sum_n (a~_n a~_n^T) (x) (g_nk g_nk^T): entry ((i, j), (i', j')) is
    sum_n (a~_ni a~_ni') (g_nkj g_nkj'): for every label at once, one matrix product of the
    pair products i <= i' and j <= j' (``kronecker.pair_products``), about (m d_out)^2 / 4
    multiply-adds a star and label against the (m d_out)^2 / 2 of J^T J. The rows of the
    later weights, r_k^T J_k, are one product each.
    """
    m, d = head.outer_product_layer
    first = m * d
    pairs = tails = None
    for s in batches(len(phi), batch_size):
        jac = np.asarray(head.jacobian(phi[s])[0], np.float64)  # (B, K, P_L)
        a = np.concatenate([np.asarray(phi[s], np.float64), np.ones((len(jac), 1))], axis=1)
        # g_k is J_k's bias block (a~ = 1 there)
        g = [pair_products(jac[:, k, first - d:first]) for k in range(jac.shape[1])]
        batch_pairs = pair_products(a).T @ np.concatenate(g, axis=1)
        batch_tails = np.stack([jac[:, k, first:].T @ jac[:, k, :] for k in range(len(g))])
        pairs = batch_pairs if pairs is None else pairs + batch_pairs
        tails = batch_tails if tails is None else tails + batch_tails
    if pairs is None:
        raise DataError("ggn_blocks: no stars")
    blocks = np.empty((len(tails), head.n_params, head.n_params))
    for block, packed, tail in zip(blocks, np.split(pairs, len(tails), axis=1), tails,
                                   strict=True):
        block[:first, :first] = unpack_pair_gram(packed, m, d)
        block[first:] = tail
        block[:first, first:] = tail[:, :first].T
    return blocks


def residual_blocks(head: Head, phi, y, batch_size: int = 256,
                    chunk_size: int = 256) -> np.ndarray:
    """Per-label R_k = sum_n r_nk d^2 f_k(x_n)/d theta^2, (n_out, P_L, P_L) float64.

    Exact, by forward-over-reverse Hessian-vector products against ``chunk_size`` basis
    vectors at a time (``tf.vectorized_map``), streaming batches of stars.
    """
    theta = tf.constant(head.map_values())
    p = head.n_params
    y = np.asarray(y, np.float64)
    n_out = y.shape[1]

    @tf.function(reduce_retracing=True)
    def hvps(phi_b, r_b, tangents):
        def one(tangent):
            with tf.autodiff.ForwardAccumulator(theta, tangent) as acc:
                with tf.GradientTape(persistent=True) as tape:
                    tape.watch(theta)
                    f, _ = head.forward(phi_b, head.params(theta))
                    sums = [tf.reduce_sum(r_b[:, k] * f[:, k]) for k in range(n_out)]
                grads = [tape.gradient(s_k, theta) for s_k in sums]
            return tf.stack([acc.jvp(g, unconnected_gradients="zero") for g in grads])
        return tf.vectorized_map(one, tangents)  # (c, n_out, P)

    out = np.zeros((n_out, p, p))
    for s in batches(len(phi), batch_size):
        phi_b = tf.constant(phi[s])
        f, _ = head.forward(phi_b, head.params())
        r_b = f - y[s]  # residuals are constants of the second-derivative term
        for c in batches(p, chunk_size):
            tangents = tf.constant(np.eye(p)[c])
            out[:, :, c] += np.transpose(hvps(phi_b, r_b, tangents).numpy(), (1, 2, 0))
    return out


def curvature_blocks(head: Head, phi, y, curvature: str = "ggn", batch_size: int = 256,
                     indefinite: str = "clip", chunk_size: int = 256) -> tuple[np.ndarray, dict]:
    """Per-label curvature blocks C_k (n_out, P_L, P_L) and a report of what was done.

    For ``curvature='hessian'`` every block H_k must be positive semi-definite for
    C(beta) = sum_k beta_k H_k to be PSD at every noise level the evidence fit may visit
    (take beta = e_k). An indefinite block is reported (smallest eigenvalue, count of negative
    ones) and handled by ``indefinite``: 'fail' raises NumericalError, 'clip' projects each
    block onto the nearest PSD matrix (negative eigenvalues set to 0, Frobenius-nearest),
    'ggn' uses the GGN blocks instead.
    """
    if curvature not in CURVATURES:
        raise ConfigError(f"config key 'laplace.curvature' = {curvature!r}; valid: "
                          f"{', '.join(CURVATURES)}")
    if indefinite not in INDEFINITE_ACTIONS:
        raise ConfigError(f"config key 'laplace.indefinite' = {indefinite!r}; valid: "
                          f"{', '.join(INDEFINITE_ACTIONS)}")
    ggn = ggn_blocks(head, phi, batch_size)
    report = {"curvature": curvature, "indefinite": "none", "min_eigenvalue": np.nan,
              "n_negative": 0}
    if curvature == "ggn":
        return ggn, report
    hess = ggn + residual_blocks(head, phi, y, batch_size, chunk_size)
    hess = 0.5 * (hess + np.transpose(hess, (0, 2, 1)))
    eig = [np.linalg.eigh(h) for h in hess]
    tol = [1e-10 * max(np.abs(w).max(), 1e-300) for w, _ in eig]
    negative = [int(np.sum(w < -t)) for (w, _), t in zip(eig, tol, strict=True)]
    report["min_eigenvalue"] = float(min(w.min() for w, _ in eig))
    report["n_negative"] = int(sum(negative))
    if report["n_negative"] == 0:
        return hess, report
    msg = (f"the exact Hessian is indefinite: {report['n_negative']} negative eigenvalues "
           f"(per label {negative}), smallest {report['min_eigenvalue']:.4g}")
    report["indefinite"] = indefinite
    if indefinite == "fail":
        raise NumericalError(f"{msg}; set laplace.indefinite to 'clip' or 'ggn', or use "
                             "laplace.curvature: ggn")
    if indefinite == "ggn":
        log.warning("%s: using the GGN instead (laplace.indefinite = ggn)", msg)
        return ggn, report
    log.warning("%s: clipping negative eigenvalues to 0 (laplace.indefinite = clip)", msg)
    return np.stack([(q * np.maximum(w, 0.0)) @ q.T for w, q in eig]), report
