"""Training streamed from the memory-mapped FITS equals training on the flux read into memory.

References: ``read_spectra`` (the in-memory reader, itself tested in test_io.py) for the values
of every row a ``FluxRows`` returns, and an uninterrupted in-memory run for the weights, history
and resume of a streamed run (same seed: bit-identical).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import pipeline.nn.training as train_mod
from pipeline.exceptions import DataError
from pipeline.spectra.dataset import is_row_reader
from pipeline.spectra.fits import FluxRows, open_spectra, read_spectra, write_spectra
from tests.test_train import make_spectra, tiny_config, weights_equal


def _damaged(spectra, seed: int):
    """Bad pixels of every kind and two NaN labels, so that both readers must clean them."""
    rng = np.random.default_rng(seed)
    n, p = spectra.flux.shape
    spectra.flux[rng.integers(0, n, 30), rng.integers(0, p, 30)] = np.nan
    spectra.flux_err[rng.integers(0, n, 30), rng.integers(0, p, 30)] = 0.0
    spectra.mask = np.zeros((n, p), np.int32)
    spectra.mask[rng.integers(0, n, 30), rng.integers(0, p, 30)] = 4
    spectra.labels["LOGG"][[3, 17]] = np.nan
    return spectra


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    write_spectra(root / "train.fits", _damaged(make_spectra(300, 40, seed=1), 1))
    write_spectra(root / "valid.fits", _damaged(make_spectra(100, 40, seed=2), 2))
    return root / "train.fits", root / "valid.fits"


def _both(path):
    kwargs = {"require_labels": True, "nan_labels": "drop"}
    return read_spectra(path, **kwargs), open_spectra(path, chunk_size=64, **kwargs)


def test_flux_rows_equal_read_spectra_in_any_order(files):
    whole, streamed = _both(files[0])
    assert is_row_reader(streamed.flux) and streamed.flux_err is None
    assert streamed.flux.shape == whole.flux.shape == (298, 40)  # two NaN-label rows dropped
    np.testing.assert_array_equal(streamed.star_id, whole.star_id)
    assert streamed.meta["N_BADPIX"] == whole.meta["N_BADPIX"] > 0
    rng = np.random.default_rng(0)
    for key in (rng.permutation(298)[:64], np.array([5, 5, 0, 297]), slice(10, 90), 7,
                np.arange(298)):
        np.testing.assert_array_equal(streamed.flux[key], whole.flux[key])
    assert np.isfinite(streamed.flux[:]).all()


def test_open_spectra_runs_read_spectras_checks(tmp_path):
    spectra = make_spectra(200, 40, seed=3)
    spectra.flux[150] = np.nan  # entirely bad, in the third slice of 64 rows
    write_spectra(tmp_path / "bad.fits", spectra)
    with pytest.raises(DataError, match=r"bad.fits'.*STAR_ID 's3-150'.*entirely NaN"):
        open_spectra(tmp_path / "bad.fits", chunk_size=64)


def test_streamed_training_equals_in_memory_training(files, tmp_path):
    """Same seed: bit-identical weights and history, input normalization and refit included."""
    (train, train_s), (valid, valid_s) = _both(files[0]), _both(files[1])
    cfg = tiny_config(epochs=2, model={"input_normalization": True})
    ref, _, ref_hist = train_mod.train_model(cfg, train, valid, tmp_path / "memory")
    got, _, hist = train_mod.train_model(cfg, train_s, valid_s, tmp_path / "stream")
    assert weights_equal(got, ref)
    assert hist.equals(ref_hist)
    assert train_mod.run_fingerprint(cfg, train, valid) == train_mod.run_fingerprint(
        cfg, train_s, valid_s)


class _RowsRead:
    """Records how many rows each read of a FluxRows asks for."""

    def __init__(self, monkeypatch):
        self.sizes = []
        original = FluxRows.__getitem__

        def spy(rows, key):
            out = original(rows, key)
            self.sizes.append(len(out) if np.ndim(out) == 2 else 1)
            return out

        monkeypatch.setattr(FluxRows, "__getitem__", spy)


def test_streamed_epoch_reads_batches_in_the_epoch_order(files, monkeypatch):
    """model.fit reads one batch of rows at a time: memory does not grow with N."""
    spectra = open_spectra(files[0], require_labels=True)
    n, batch = len(spectra.flux), 32
    z = np.arange(n, dtype=np.float32)[:, None]  # a row's target is its index
    seen = _RowsRead(monkeypatch)
    ds = train_mod.training_dataset(spectra.flux, z, batch, seed=4, first_epoch=1, epochs=3)
    order = np.concatenate([y.numpy()[:, 0] for _, y in ds]).astype(int)
    expected = [np.random.default_rng([4, e]).permutation(n) for e in (1, 2)]
    np.testing.assert_array_equal(order, np.concatenate(expected))
    assert max(seen.sizes) == batch and len(seen.sizes) == 2 * -(-n // batch)


class _Interrupt(Exception):
    pass


class _StopAfter(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise _Interrupt


def test_streamed_run_resumes_to_the_in_memory_result(files, tmp_path):
    (train, train_s), (valid, valid_s) = _both(files[0]), _both(files[1])
    cfg = tiny_config(epochs=3, early_stopping={"patience": 10})
    ref, _, ref_hist = train_mod.train_model(cfg, train, valid, tmp_path / "memory")
    with pytest.raises(_Interrupt):
        train_mod.train_model(cfg, train_s, valid_s, tmp_path / "run", callbacks=[_StopAfter()])
    model, _, hist = train_mod.train_model(cfg, train_s, valid_s, tmp_path / "run")
    assert weights_equal(model, ref)
    assert hist.equals(ref_hist)


@pytest.fixture
def op_determinism_off():
    """XLA needs op determinism off (Keras refuses it otherwise); restore the process state."""
    from tensorflow.python.framework import config as tf_config

    was = tf_config.is_op_determinism_enabled()
    tf_config.disable_op_determinism()
    yield
    if was:
        tf_config.enable_op_determinism()


def test_xla_train_step_is_deterministic(op_determinism_off, tmp_path):
    """Same seed, XLA-compiled train step: bit-identical weights twice (the bench_train row
    'XLA train step vs plain' reports the time)."""
    train, valid = make_spectra(256, 40, seed=1), make_spectra(64, 40, seed=2)
    cfg = tiny_config(epochs=2, jit_compile=True)
    cfg["deterministic"] = False
    m1, _, h1 = train_mod.train_model(cfg, train, valid, tmp_path / "a")
    assert m1.jit_compile is True, "the step must really be XLA-compiled"
    m2, _, h2 = train_mod.train_model(cfg, train, valid, tmp_path / "b")
    assert weights_equal(m1, m2)
    assert h1.equals(h2)


def test_noise_augmentation_batches_equal_a_direct_draw(files):
    """Every augmented batch is flux + a flux_err eps with eps from noise_rng(seed, epoch, batch)
    (reference: the rows of read_spectra and a direct draw), no noise on bad pixels, the same
    batches from the memory-mapped file and from memory, and the same after a resume."""
    (whole, streamed), a, seed, bs = _both(files[0]), 0.7, 5, 64
    z = whole.label_array().astype(np.float32)
    cfg = tiny_config(noise_augmentation=a)
    memory = train_mod.training_dataset(whole.flux, z, bs, seed, 0, 2, a,
                                        train_mod.noise_rows(whole, cfg))
    stream = train_mod.training_dataset(streamed.flux, z, bs, seed, 1, 2, a,
                                        train_mod.noise_rows(streamed, cfg))
    n_batches = -(-len(z) // bs)
    got = [(x.numpy(), y.numpy()) for x, y in memory]
    assert len(got) == 2 * n_batches
    bad = whole.flux_err >= cfg["data"]["bad_pixel_err"]
    assert bad.any()
    for k, (x, y) in enumerate(got):
        epoch, b = divmod(k, n_batches)
        idx = train_mod.epoch_permutation(len(z), seed, epoch)[b * bs:(b + 1) * bs]
        eps = train_mod.noise_rng(seed, epoch, b).standard_normal(x.shape, dtype=np.float32)
        err = np.where(bad[idx], 0.0, whole.flux_err[idx]).astype(np.float32)
        np.testing.assert_array_equal(x, whole.flux[idx] + np.float32(a) * err * eps)
        np.testing.assert_array_equal(y, z[idx])
        assert np.array_equal(x[bad[idx]], whole.flux[idx][bad[idx]])  # 1, untouched
    for (x, _), (xs, _) in zip(got[n_batches:], stream, strict=True):  # resumed at epoch 1
        np.testing.assert_array_equal(xs, x)
    pulls = (got[0][0] - whole.flux[train_mod.epoch_permutation(len(z), seed, 0)[:bs]])
    pulls = pulls[~bad[train_mod.epoch_permutation(len(z), seed, 0)[:bs]]]
    assert np.std(pulls) > 0  # noise was added at all


def test_noise_augmentation_off_leaves_the_batches_clean(files):
    whole, _ = _both(files[0])
    z = whole.label_array().astype(np.float32)
    x, _ = next(iter(train_mod.training_dataset(whole.flux, z, 64, 5, 0, 1)))
    idx = train_mod.epoch_permutation(len(z), 5, 0)[:64]
    np.testing.assert_array_equal(x.numpy(), whole.flux[idx])


def test_noise_augmentation_needs_flux_errors(files):
    whole, _ = _both(files[0])
    whole.flux_err = None
    with pytest.raises(DataError, match="noise_augmentation.*FLUX_ERR"):
        train_mod.noise_rows(whole, tiny_config(noise_augmentation=1.0))
