"""Reliability under numerical trouble (issue 9).

* A non-finite loss or weights during training stop with NumericalError and keep the last good
  checkpoint: tests/test_train.py::test_nonfinite_values_keep_last_good_checkpoint (not
  repeated here).
* A posterior precision that is not positive definite gets the smallest geometric jitter that
  works, with a logged report, or fails naming laplace.jitter_max (below).
* Not here yet: an indefinite exact Hessian through the laplace step, and FLAG bit 0 for stars
  far outside the training labels. The FLAG criterion looks at the *predicted* labels only,
  and the small networks tried here map far-away spectra back inside the training range, so
  such a test fails; see docs/troubleshooting.md and the reliability report.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.exceptions import NumericalError
from pipeline.laplace import cholesky_with_jitter


# ------------------------------------------------------------------- not positive definite
def test_jitter_is_the_smallest_geometric_step_and_is_reported(caplog, rng):
    g = rng.normal(size=(6, 3))
    scale = np.mean(np.diag(g @ g.T))
    a = g @ g.T - 3e-6 * scale * np.eye(6)  # slightly indefinite: needs jitter 1e-5 x scale
    caplog.set_level(logging.WARNING, logger="pipeline.laplace")
    chol, added = cholesky_with_jitter(a, jitter_initial=1e-12, jitter_max=1e-2,
                                       jitter_factor=10.0)
    a_scale = np.mean(np.diag(a))
    assert added == pytest.approx(1e-5 * a_scale, rel=1e-9)
    assert _cholesky_fails(a + 1e-6 * a_scale * np.eye(6))  # the step before was too small
    np.testing.assert_allclose(chol @ chol.T, a + added * np.eye(6), rtol=0,
                               atol=1e-12 * a_scale)
    assert "not positive definite: added jitter" in caplog.text


def _cholesky_fails(a) -> bool:
    import scipy.linalg as sl

    try:
        sl.cholesky(a, lower=True)
    except sl.LinAlgError:
        return True
    return False


def test_negative_definite_precision_fails_naming_the_key():
    with pytest.raises(NumericalError, match="laplace.jitter_max"):
        cholesky_with_jitter(-np.eye(4), jitter_initial=1e-10, jitter_max=1e-2)
