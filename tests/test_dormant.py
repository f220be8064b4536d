"""Recycling of dormant ReLU units: output unchanged, units alive, Adam moments reset,
resumable."""

from __future__ import annotations

import numpy as np
import pytest

import pipeline.nn.training as train_mod
from pipeline.nn.dormant import DormantRecycler, dense_pairs
from tests.test_train import _Interrupt, _StopAfter, make_spectra, tiny_config, weights_equal


@pytest.fixture(scope="module")
def toy():
    return make_spectra(256, 40, seed=1), make_spectra(64, 40, seed=2)


def _kill_units(layer, units):
    kernel, bias = (v.numpy() for v in layer.weights)
    bias[units] = -1e3  # below any input: zero on every star
    layer.set_weights([kernel, bias])


def test_recycling_revives_units_and_leaves_the_output_unchanged(toy, tmp_path):
    train, valid = toy
    cfg = tiny_config(epochs=1)
    model, _, _ = train_mod.train_model(cfg, train, valid, tmp_path)
    (first, nxt), (second, out) = dense_pairs(model)
    _kill_units(first, [3, 7])
    _kill_units(second, [0])
    recycler = DormantRecycler(train.flux, seed=5)
    assert [np.flatnonzero(d).tolist() for d in recycler.dormant(model, dense_pairs(model))] \
        == [[3, 7], [0]]
    before = model.predict(valid.flux, verbose=0)
    opt = model.optimizer
    for v in (first.kernel, nxt.kernel):  # moments to be reset must be non-zero first
        assert np.abs(opt._momentums[opt._get_variable_index(v)].numpy()).max() > 0
    assert recycler(model, epoch=1) == 3
    np.testing.assert_allclose(model.predict(valid.flux, verbose=0), before, rtol=1e-6,
                               atol=1e-7)
    assert not any(d.any() for d in recycler.dormant(model, dense_pairs(model)))
    (_, on_first), (_, on_second) = recycler.probe(model, dense_pairs(model))
    for on in (on_first[:, [3, 7]], on_second[:, [0]]):  # each fires on half the probe stars
        np.testing.assert_allclose((on > 0).mean(axis=0), 0.5, atol=0.01)
    # outgoing rows zero (column 0 of nxt, itself recycled, has fresh incoming weights)
    assert np.all(nxt.kernel.numpy()[[3, 7], 1:] == 0) and np.all(out.kernel.numpy()[0] == 0)
    std = first.kernel.numpy()[:, [3, 7]].std()
    assert 0.5 < std / np.sqrt(2 / first.kernel.shape[0]) < 1.5  # he_normal scale
    for v, index in ((first.kernel, (slice(None), [3, 7])), (nxt.kernel, [3, 7]),
                     (out.kernel, [0])):
        for moments in (opt._momentums, opt._velocities):
            assert np.all(moments[opt._get_variable_index(v)].numpy()[index] == 0)


def test_training_with_recycling_resumes_identically(toy, tmp_path, caplog):
    train, valid = toy
    cfg = tiny_config(epochs=6, recycle_dormant=True, learning_rate=3e-2,
                      early_stopping={"patience": 20})
    caplog.set_level("INFO", logger="pipeline.nn.training")
    ref, _, ref_hist = train_mod.train_model(cfg, train, valid, tmp_path / "ref")
    assert "dormant units" in caplog.text, "the case must recycle (a high learning rate)"
    with pytest.raises(_Interrupt):
        train_mod.train_model(cfg, train, valid, tmp_path / "run", callbacks=[_StopAfter(3)])
    model, _, hist = train_mod.train_model(cfg, train, valid, tmp_path / "run")
    assert weights_equal(model, ref)
    assert hist.equals(ref_hist)
