"""Predictive covariance J Sigma J^T through the outer-product Jacobian of the head's first layer.

The head's first Dense layer maps its input a (the head features phi, d_in) to z = a W + b,
so the Jacobian of output k with respect to its kernel and bias is an outer product,

    d f_k / d W_ij = a_i g_kj,   d f_k / d b_j = g_kj,   g_k = d f_k / d z   (d_out,),

that is J_k = a~ (x) g_k on those m d_out weights, with a~ = (a, 1) (m = d_in + 1 entries, the
kernel row-major and then the bias, the head's weight order). Split Sigma = A^-1 into the
block S of these weights, the cross block C with the r_k = d f_k / d(later weights) (R of
them) and the block Q of the later weights. Then, exactly,

    J_k Sigma J_l^T = g_k^T B g_l + g_k^T X r_l + g_l^T X r_k + r_k^T Q r_l,
    B = sum_{i,i'} a~_i a~_i' S[i, :, i', :]   (d_out, d_out)
    X = sum_i a~_i C[i, :, :]                   (d_out, R)

B, symmetric, takes one matrix product per batch of stars: the products a~_i a~_i' (i <= i',
m(m+1)/2 of them) times the blocks of S packed the same way, their columns packed j <= j'.
That is about (m d_out)^2 / 4 multiply-adds a star where the triangular solves L^-1 J_k^T cost
K (m d_out + R)^2 / 2 (K outputs): 5.5 times fewer for the reference head (129 x 32
first-layer weights, 99 after them, 3 labels), in a dense product that runs nearer the
machine's peak than a triangular solve. Sigma is formed once from the Cholesky factor (LAPACK
potri) and kept (8 P_L^2 bytes, as much as the factor itself).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sl


def with_bias_input(phi: np.ndarray) -> np.ndarray:
    """a~ = (phi, 1) (N, d_in + 1): the first layer's input with the 1 its bias multiplies,
    in the head's weight order (kernel rows, then the bias)."""
    return np.concatenate([phi, np.ones((len(phi), 1))], axis=1)


class KroneckerCovariance:
    """J Sigma J^T of the head's Jacobians, from Sigma's blocks (module docstring).

    ``cholesky``: L (P_L, P_L) lower, A = L L^T; ``n_in``: m = d_in + 1 (kernel rows and the
    bias); ``n_out``: d_out of the first layer, whose m d_out weights come first."""

    def __init__(self, cholesky: np.ndarray, n_in: int, n_out: int):
        # potri: the lower triangle of Sigma, read below only there (row >= column)
        inv, info = sl.lapack.dpotri(cholesky, lower=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"potri failed (info {info})")
        self.m, self.d = n_in, n_out
        first = n_in * n_out
        i, i2 = (a[:, None] for a in np.triu_indices(n_in))  # pairs i <= i'
        j, j2 = np.triu_indices(n_out)  # packed columns j <= j'
        low = inv[:first, :first].reshape(n_in, n_out, n_in, n_out)
        # S[i, j, i', j'] + S[i', j, i, j'] for i < i', S[i, j, i, j'] for i = i', from the
        # lower triangle: weight (i', .) comes after (i, .) for i < i', and (i, j') after
        # (i, j) for j <= j'
        self.packed = low[i2, j2, i, j] + np.where(i < i2, low[i2, j, i, j2], 0.0)
        self.columns = j, j2
        self.cross = np.ascontiguousarray(inv[first:, :first].T).reshape(n_in, -1)  # (m, d R)
        rest = np.tril(inv[first:, first:])
        self.rest = rest + np.tril(rest, -1).T  # (R, R)

    def covariance(self, phi: np.ndarray, jacobian: np.ndarray) -> np.ndarray:
        """(N, K, K) J Sigma J^T of stars with head features ``phi`` (N, d_in) and head
        Jacobians ``jacobian`` (N, K, d + R) without the first layer's kernel block
        (``Head.jacobian(..., outer_kernel=False)``): g_k = d f_k / d b, then r_k."""
        n = len(jacobian)
        a = with_bias_input(phi)  # a~ (N, m)
        g = jacobian[:, :, :self.d]  # (N, K, d): the bias block d f_k / d b
        r = jacobian[:, :, self.d:]  # (N, K, R)
        upper = pair_products(a) @ self.packed
        b = np.empty((n, self.d, self.d))
        b[:, self.columns[0], self.columns[1]] = upper
        b[:, self.columns[1], self.columns[0]] = upper
        cov = g @ b @ np.swapaxes(g, 1, 2)
        if r.shape[2]:
            x = (a @ self.cross).reshape(n, self.d, -1)  # (N, d, R)
            mixed = (g @ x) @ np.swapaxes(r, 1, 2)  # g_k^T X r_l
            rest = (r.reshape(-1, r.shape[2]) @ self.rest).reshape(r.shape)  # one product
            cov += mixed + np.swapaxes(mixed, 1, 2) + rest @ np.swapaxes(r, 1, 2)
        return cov


def pair_index(n: int) -> np.ndarray:
    """(n, n) position of the pair (min(i, i'), max(i, i')) among ``numpy.triu_indices(n)``."""
    index = np.empty((n, n), int)
    i, i2 = np.triu_indices(n)
    index[i, i2] = index[i2, i] = np.arange(len(i))
    return index


def pair_products(x: np.ndarray) -> np.ndarray:
    """(N, n(n+1)/2) the products x_i x_i' of each row of ``x`` (N, n) over the pairs i <= i'
    in the order of ``numpy.triu_indices(n)``."""
    i, i2 = np.triu_indices(x.shape[1])
    return x[:, i] * x[:, i2]


def unpack_pair_gram(packed: np.ndarray, m: int, d: int) -> np.ndarray:
    """The (m d, m d) matrix sum_n (a_n (x) g_n)(a_n (x) g_n)^T, row-major index i d + j (the
    head's weight order), from ``packed`` = pair_products(a)^T pair_products(g)
    (m(m+1)/2, d(d+1)/2), whose entries it repeats by symmetry."""
    return packed[pair_index(m)[:, None, :, None], pair_index(d)[None, :, None, :]].reshape(
        m * d, m * d)


def multiply_adds(n_in: int, n_out: int, n_rest: int, n_labels: int) -> float:
    """Multiply-adds a star of :meth:`KroneckerCovariance.covariance` (its matrix products)."""
    return (n_in * (n_in + 1) / 2 * n_out * (n_out + 1) / 2 + n_in * n_out * n_rest
            + n_labels * (n_out * n_rest + n_rest**2))
