"""Training: loss decreases, early stopping, determinism, checkpoint/resume after a kill.

Toy data: P-pixel spectra that are a smooth random function of the three labels plus noise, so
a tiny network learns them in a few epochs. References are independent of the code under test:
numpy permutations, hand-worked early-stopping sequences, uninterrupted runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from astropy.table import Table

import pipeline.nn.training as train_mod
from pipeline import LABELS
from pipeline.config import validate
from pipeline.exceptions import DataError, GridMismatchError, NumericalError
from pipeline.spectra.dataset import Spectra
from pipeline.spectra.fits import write_spectra


def make_spectra(n: int, p: int, seed: int, noise_labels: bool = False) -> Spectra:
    """Spectra depending smoothly on (TEFF, LOGG, FE_H); with ``noise_labels`` they do not."""
    rng = np.random.default_rng(seed)
    labels = np.column_stack([rng.uniform(4000, 6000, n), rng.uniform(1, 5, n),
                              rng.uniform(-2, 0.5, n)])
    z = (labels - [5000, 3, -0.75]) / [577, 1.15, 0.72]
    mix = np.random.default_rng(99).normal(size=(3, p))  # same line response for every split
    flux = 1 + 0.5 * np.tanh(0.5 * z @ mix) + rng.normal(0, 0.01, (n, p))
    if noise_labels:
        labels = labels[rng.permutation(n)]
    table = Table({"STAR_ID": [f"s{seed}-{i}" for i in range(n)],
                   **{name: labels[:, j] for j, name in enumerate(LABELS)}})
    return Spectra(flux.astype(np.float32), np.full((n, p), 0.01, np.float32),
                   np.linspace(15100.0, 16900.0, p), table)


def tiny_config(seed: int = 5, model=None, **train) -> dict:
    cfg = {"seed": seed, "model": {"hidden": [32, 16], **(model or {})},
           "train": {"epochs": 8, "batch_size": 32, "learning_rate": 2e-3, **train}}
    return validate(cfg)


def weights_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(),
                                                    strict=True))


@pytest.fixture(scope="module")
def toy():
    return make_spectra(384, 40, seed=1), make_spectra(128, 40, seed=2)


# ------------------------------------------------------------------------------- learning
def test_loss_decreases_and_outputs(toy, tmp_path):
    train, valid = toy
    config = tiny_config(model={"input_normalization": True})
    model, scaler, history = train_mod.train_model(config, train, valid, tmp_path)
    assert list(history.columns) == ["epoch", "loss", "val_loss"]
    assert history["loss"].iloc[-1] < 0.3 * history["loss"].iloc[0]
    assert history["val_loss"].min() < 0.3 * history["val_loss"].iloc[0]
    np.testing.assert_allclose(scaler.mean, train.label_array().mean(0), rtol=1e-14)
    for name in ("model.keras", "scaler.json", "history.csv", "wave.npy"):
        assert (tmp_path / name).is_file()
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"
    assert json.loads((tmp_path / "scaler.json").read_text())["provenance"]["SEED"] == "5"

    from pipeline.artifacts.model_dir import load_trained

    loaded, scaler2, wave = load_trained(tmp_path)
    np.testing.assert_array_equal(wave, train.wave)
    np.testing.assert_array_equal(scaler2.scale, scaler.scale)
    assert weights_equal(model, loaded)
    assert getattr(loaded, "optimizer", None) is None  # the deliverable is for inference
    # the input normalization learned on the training flux travels inside model.keras
    flux64 = train.flux.astype(np.float64)
    norm = loaded.get_layer("flux_norm")
    np.testing.assert_allclose(norm.adapt_mean.numpy(), flux64.mean(0), rtol=1e-6)
    # default model.input_scale = global: one divisor, the root mean per-pixel variance
    np.testing.assert_allclose(norm.adapt_variance.numpy(), flux64.var(0).mean(), rtol=1e-5)
    np.testing.assert_array_equal(loaded.predict(valid.flux, verbose=0),
                                  model.predict(valid.flux, verbose=0))
    from pipeline.artifacts.model_dir import read_diagnostics

    diag = read_diagnostics(tmp_path)
    assert [la["name"] for la in diag["layers"]] == ["dense_0", "dense_1"]
    assert diag["n_stars"] == valid.n_stars and diag["last_hidden"]["units"] == 16
    assert {"accepted", "valid_mse_before", "valid_mse_after"} <= set(diag["refit"])
    on_disk = np.loadtxt(tmp_path / "history.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(on_disk[:, 2], history["val_loss"], rtol=1e-8)


@pytest.mark.parametrize("model_cfg", [
    {"type": "cnn", "hidden": [16], "cnn": {"filters": [4, 8], "kernel_size": 5}},
    {"activation": "gelu"},
    {"activation": "softplus"},
], ids=["cnn", "gelu", "softplus"])
def test_other_architectures_train(toy, tmp_path, model_cfg):
    train, valid = toy
    _, _, history = train_mod.train_model(
        tiny_config(model=model_cfg, epochs=5), train, valid, tmp_path)
    assert history["val_loss"].min() < 0.5 * history["val_loss"].iloc[0]


# -------------------------------------------------------------------------- early stopping
def test_update_early_stopping_hand_worked_sequence():
    cfg = {"enabled": True, "patience": 2, "min_delta": 0.05}
    state = train_mod.TrainingState("fp")
    stops = []
    for epoch, loss in enumerate([3.0, 2.0, 1.97, 1.5, 1.6, 1.46, 1.0], start=1):
        state.epoch = epoch
        train_mod.update_early_stopping(state, loss, lambda e=epoch: [e], cfg)
        stops.append(state.stopped)
        if state.stopped:
            break
    # 1.97 and 1.46 are within min_delta of the best: no improvement; stop after epoch 6.
    assert stops == [False] * 5 + [True]
    assert state.wait == 2
    assert state.best_epoch == 4 and state.best_loss == 1.5 and state.best_weights == [4]


def test_last_layer_refit_is_the_least_squares_solution(toy, tmp_path):
    """Without the prior the refit solves the normal equations: residuals of the training set
    are orthogonal to every penultimate feature and have zero mean."""
    from pipeline.laplace.curvature import Head

    train, valid = toy
    cfg = tiny_config(epochs=2, refit_prior=False)
    model, scaler, _ = train_mod.train_model(cfg, train, valid, tmp_path)
    diag = json.loads((tmp_path / "diagnostics.json").read_text())
    assert diag["refit"]["accepted"], diag["refit"]
    assert diag["refit"]["valid_mse_after"] < diag["refit"]["valid_mse_before"]
    phi = Head(model, last_layers=1).features(train.flux)
    z = scaler.transform(train.label_array())
    resid = np.asarray(model.predict(train.flux, verbose=0), np.float64) - z
    np.testing.assert_allclose(resid.mean(axis=0), 0.0, atol=1e-5)
    gradient = phi.T @ resid / len(phi)  # d MSE / d W up to a factor 2
    assert np.abs(gradient).max() < 1e-4 * np.abs(phi).max()


def _refit_case(seed=0, n=300, p=40):
    cfg = tiny_config(seed=seed)
    model = train_mod.compiled_model(p, cfg)
    rng = np.random.default_rng(seed)
    flux = rng.normal(1, 0.2, (n, p)).astype(np.float32)
    z = rng.normal(size=(n, 3))
    return model, flux, z


def test_refit_with_prior_matches_numpy_ridge():
    """Reference: per-label ridge in float64 numpy, penalty ridge N + sigma_k^2 d / |w_k|^2
    with sigma_k^2 the training MSE of the trained weights, bias unpenalized."""
    from pipeline.laplace.curvature import Head

    model, flux, z = _refit_case()
    layer = model.get_layer("labels")
    w0 = np.vstack([layer.kernel.numpy(), layer.bias.numpy()[None]]).astype(np.float64)
    phi = Head(model, last_layers=1).features(flux)
    n, d = phi.shape
    a = np.hstack([phi, np.ones((n, 1))])
    sigma2 = ((a @ w0 - z) ** 2).mean(0)
    report = train_mod.refit_last_layer(model, flux, z, 64, ridge=1e-3, prior=True)
    assert report["accepted"]
    for k in range(3):
        lam = 1e-3 * n + sigma2[k] * d / np.sum(w0[:-1, k] ** 2)
        pen = np.diag(np.r_[np.full(d, lam), 0.0])
        ref = np.linalg.solve(a.T @ a + pen, a.T @ z[:, k])
        np.testing.assert_allclose(layer.kernel.numpy()[:, k], ref[:-1], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(layer.bias.numpy()[k], ref[-1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(report["train_mse_before"], sigma2.mean(), rtol=1e-10)


def test_refit_is_rejected_when_validation_loss_rises():
    model, flux, z = _refit_case(seed=1)
    before = [w.copy() for w in model.get_layer("labels").get_weights()]
    # validation targets = the current predictions: any change of the weights raises its MSE
    zv = np.asarray(model.predict(flux[:100], verbose=0), np.float64)
    report = train_mod.refit_last_layer(model, flux, z, 64, ridge=0.0, prior=False,
                                        valid=(flux[:100], zv))
    assert not report["accepted"]
    assert report["valid_mse_after"] > report["valid_mse_before"] < 1e-10
    assert report["train_mse_after"] < report["train_mse_before"]
    for got, ref in zip(model.get_layer("labels").get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, ref)


def test_cosine_schedule_warms_up_and_decays():
    """lr(step): linear from f*lr to lr over the warm-up, then lr (f + (1-f)(1+cos(pi t))/2)
    with t the fraction of the decay steps done (worked by hand)."""
    tcfg = tiny_config(epochs=10, learning_rate=1e-3,
                       schedule={"type": "cosine", "warmup_epochs": 2, "min_factor": 0.1})["train"]
    sched = train_mod.learning_rate(tcfg, steps_per_epoch=5)  # 50 steps, 10 of warm-up
    lr = lambda step: float(keras.ops.convert_to_numpy(sched(step)))  # noqa: E731
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [1e-4, 5.5e-4, 1e-3], rtol=1e-5)
    np.testing.assert_allclose(lr(30), 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)  # t = 1/2
    np.testing.assert_allclose(lr(50), 1e-4, rtol=1e-5)
    plateau = tiny_config(schedule={"type": "plateau"})["train"]
    assert train_mod.learning_rate(plateau) == pytest.approx(2e-3)


def test_cosine_schedule_resumes_identically(tmp_path):
    train, valid = make_spectra(48, 40, 3), make_spectra(32, 40, 4)
    cfg = tiny_config(epochs=5, batch_size=16, schedule={"type": "cosine"},
                      early_stopping={"enabled": False})
    ref, _, ref_hist = train_mod.train_model(cfg, train, valid, tmp_path / "ref")
    with pytest.raises(_Interrupt):
        train_mod.train_model(cfg, train, valid, tmp_path / "run", callbacks=[_StopAfter(2)])
    model, _, hist = train_mod.train_model(cfg, train, valid, tmp_path / "run")
    assert weights_equal(model, ref) and hist.equals(ref_hist)


def test_learning_rate_halves_after_each_plateau():
    import keras

    cfg = {"enabled": True, "patience": 2, "factor": 0.5, "min_lr": 3e-4}
    opt = keras.optimizers.Adam(1e-3)
    state = train_mod.TrainingState(fingerprint="x")
    rates = []
    for wait in [1, 2, 3, 4, 0, 1, 2]:
        state.wait = wait
        train_mod.update_learning_rate(state, opt, cfg)
        rates.append(float(opt.learning_rate.numpy()))
    np.testing.assert_allclose(rates, [1e-3, 5e-4, 5e-4, 3e-4, 3e-4, 3e-4, 3e-4], rtol=1e-6)


def test_early_stopping_restores_best_epoch(tmp_path):
    # Labels unrelated to the flux: the network can only memorize, validation loss rises.
    train, valid = make_spectra(48, 40, 3, noise_labels=True), make_spectra(96, 40, 4)
    cfg = tiny_config(model={"hidden": [64, 64]}, epochs=40, batch_size=16,
                      learning_rate=3e-3, early_stopping={"patience": 3},
                      refit_last_layer=False)
    model, scaler, history = train_mod.train_model(cfg, train, valid, tmp_path)
    best = int(history["val_loss"].idxmin())
    assert len(history) < 40 and len(history) - 1 - best == 3
    z = scaler.transform(valid.label_array())
    mse = np.mean((model.predict(valid.flux, verbose=0).astype(np.float64) - z) ** 2)
    np.testing.assert_allclose(mse, history["val_loss"][best], rtol=1e-5)
    assert abs(mse - history["val_loss"].iloc[-1]) > 1e-3
    # A rerun after completion trains nothing and restores the best epoch from its checkpoint.
    again, _, history2 = train_mod.train_model(cfg, train, valid, tmp_path)
    assert weights_equal(again, model) and history2.equals(history)


# ------------------------------------------------------------------- determinism and resume
def test_two_runs_give_identical_weights(toy, tmp_path):
    train, valid = toy
    cfg = tiny_config(epochs=3)
    m1, _, h1 = train_mod.train_model(cfg, train, valid, tmp_path / "a")
    m2, _, h2 = train_mod.train_model(cfg, train, valid, tmp_path / "b")
    assert weights_equal(m1, m2)
    assert h1.equals(h2)


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    n, batch = 10, 4
    flux = np.arange(n, dtype=np.float32)[:, None]  # a star's flux is its index
    ds = train_mod.training_dataset(flux, flux, batch, seed=7, first_epoch=2, epochs=4)
    seen = np.concatenate([x.numpy()[:, 0] for x, _ in ds]).astype(int)
    expected = [np.random.default_rng([7, e]).permutation(n) for e in (2, 3)]
    np.testing.assert_array_equal(seen, np.concatenate(expected))
    assert len(list(ds)) == 2 * 3  # batches never straddle two epochs


class _Interrupt(Exception):
    pass


class _StopAfter(keras.callbacks.Callback):
    """Simulates a kill right after the checkpoint of epoch ``n`` was written."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.n:
            raise _Interrupt


def test_resume_in_process_matches_uninterrupted_run(tmp_path, caplog):
    train, valid = make_spectra(48, 40, 3, noise_labels=True), make_spectra(96, 40, 4)
    cfg = tiny_config(model={"hidden": [64, 64]}, epochs=12, batch_size=16,
                      learning_rate=3e-3, early_stopping={"patience": 20},
                      schedule={"type": "plateau"})
    caplog.set_level("INFO", logger="pipeline.nn.training")
    ref, _, ref_hist = train_mod.train_model(cfg, train, valid, tmp_path / "ref")
    assert "learning rate" in caplog.text, "the case must also resume a reduced learning rate"
    caplog.clear()
    best = int(ref_hist["val_loss"].idxmin()) + 1
    assert 1 < best < 12, "the case must restore best weights from an older checkpoint"
    stop_at = min(best + 2, 11)
    with pytest.raises(_Interrupt):
        train_mod.train_model(cfg, train, valid, tmp_path / "run",
                              callbacks=[_StopAfter(stop_at)])
    assert not (tmp_path / "run" / "model.keras").exists()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == sorted({f"epoch-{best:04d}", f"epoch-{stop_at:04d}"})
    caplog.set_level("INFO", logger="pipeline.nn.training")
    model, _, hist = train_mod.train_model(cfg, train, valid, tmp_path / "run")
    assert f"after epoch {stop_at}" in caplog.text
    assert weights_equal(model, ref)
    assert hist.equals(ref_hist)


def test_checkpoint_of_other_label_weights_is_not_resumed(tmp_path, caplog, monkeypatch):
    """Weights computed by code from the data (not in the config) must not resume a model
    trained under other weights: it would be saved with the new scaler, its outputs rescaled."""
    train, valid = make_spectra(48, 40, 3), make_spectra(32, 40, 4)
    cfg = tiny_config(epochs=1, label_weights="ridge")
    monkeypatch.setattr(train_mod, "label_weights", lambda *a: np.ones(3))
    train_mod.train_model(cfg, train, valid, tmp_path)
    monkeypatch.setattr(train_mod, "label_weights", lambda *a: np.array([2.0, 1.0, 1.0]))
    caplog.set_level("INFO", logger="pipeline.nn.training")
    model, scaler, _ = train_mod.train_model(cfg, train, valid, tmp_path)
    assert "belongs to another config or data set" in caplog.text
    assert "already finished" not in caplog.text
    fresh, _, _ = train_mod.train_model(cfg, train, valid, tmp_path / "fresh")
    assert weights_equal(model, fresh)
    np.testing.assert_array_equal(scaler.weights, [2.0, 1.0, 1.0])


@pytest.mark.slow
def test_kill_and_resume_subprocess(tmp_path):
    train, valid = make_spectra(512, 200, 1), make_spectra(64, 200, 2)
    write_spectra(tmp_path / "train.fits", train)
    write_spectra(tmp_path / "valid.fits", valid)
    cfg = json.dumps({"seed": 11, "model": {"hidden": [64, 32]},
                      "train": {"epochs": 12, "batch_size": 16,
                                "early_stopping": {"enabled": False}}})

    def command(outdir):
        return [sys.executable, "-m", "pipeline.steps.train", "--config-json", cfg, "--train",
                str(tmp_path / "train.fits"), "--valid", str(tmp_path / "valid.fits"),
                "--outdir", str(outdir)]

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(run_dir), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(run_dir.glob("checkpoints/epoch-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model.keras").exists(), "the kill came too late to test resume"

    resumed = subprocess.run(command(run_dir), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from checkpoint" in resumed.stderr
    assert "epoch 1/12:" not in resumed.stderr
    from pipeline.artifacts.model_dir import load_trained

    # the uninterrupted reference runs in this process: same machine, same TF, same threads
    ref, _, _ = train_mod.train_model(validate(json.loads(cfg)), train, valid, tmp_path / "ref")
    assert weights_equal(load_trained(run_dir)[0], ref)


# ------------------------------------------------------------------------------ bad input
class _PoisonAfterFirstEpoch(keras.callbacks.Callback):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    @staticmethod
    def poison(layer):
        for var in layer.weights:
            var.assign(np.full(var.shape, np.nan, np.float32))

    def on_epoch_end(self, epoch, logs=None):
        self.poison(self.model.get_layer(self.layer))


def _relu_propagates_nan() -> bool:
    """Whether this build's compiled training step gives a NaN loss for NaN first-layer weights.

    ReLU kernels differ: TensorFlow's generic CPU kernel returns relu(NaN) = NaN, its AVX2 and
    some fused or XLA kernels compute max(x, 0) = 0. Probed with the very train step
    ``train_model`` runs (same seeding and determinism, network, compile options and jit
    setting), on a throwaway model.
    """
    cfg = tiny_config(epochs=3)
    train_mod.seed_everything(cfg)
    model = train_mod.compiled_model(40, cfg)
    _PoisonAfterFirstEpoch.poison(model.get_layer("dense_0"))
    loss = model.train_on_batch(np.ones((4, 40), np.float32), np.zeros((4, 3), np.float32))
    return not np.isfinite(float(np.ravel(loss)[0]))


@pytest.mark.parametrize("layer", ["labels", "dense_0"])
def test_nonfinite_values_keep_last_good_checkpoint(toy, tmp_path, layer):
    # NaN output weights give a NaN loss at once on every kernel. NaN first-layer weights do
    # too where relu(NaN) = NaN; where relu(NaN) = 0 they hide behind a finite loss and only
    # the end-of-epoch weight check catches them. Each kernel has exactly one right message.
    if layer == "labels" or _relu_propagates_nan():
        where = r"non-finite training loss \(nan\) at epoch 2, batch 1; "
    else:
        where = r"non-finite weights after epoch 2; "
    train, valid = toy
    with pytest.raises(NumericalError,
                       match=where + r"the last good checkpoint \(epoch 1\) is kept"):
        train_mod.train_model(tiny_config(epochs=3), train, valid, tmp_path,
                              callbacks=[_PoisonAfterFirstEpoch(layer)])
    kept = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert kept == ["epoch-0001"]
    assert not (tmp_path / "model.keras").exists()


def test_nan_weights_behind_a_finite_loss_are_caught(tmp_path):
    """The end-of-epoch weight check on its own, whatever ReLU does with NaN on this CPU:
    finite losses reported, NaN weights in the model -> NumericalError, no new checkpoint."""
    cfg = tiny_config(epochs=3)
    model = train_mod.compiled_model(40, cfg)
    state = train_mod.TrainingState("fp")
    state.epoch = 1
    root = tmp_path / "checkpoints"
    monitor = train_mod.TrainingMonitor(state, cfg, root, n_stars=10)
    monitor.set_model(model)
    monitor.on_epoch_end(1, {"loss": 0.5, "val_loss": 0.5})  # finite weights: checkpointed
    assert [p.name for p in root.iterdir()] == ["epoch-0002"]
    _PoisonAfterFirstEpoch.poison(model.get_layer("dense_0"))
    with pytest.raises(NumericalError, match=r"non-finite weights after epoch 3; the last good "
                                             r"checkpoint \(epoch 2\) is kept"):
        monitor.on_epoch_end(2, {"loss": 0.5, "val_loss": 0.5})
    assert [p.name for p in root.iterdir()] == ["epoch-0002"]
    assert state.epoch == 2


def test_constant_label_is_a_clear_error(toy, tmp_path):
    train, valid = toy
    train = train.subset(np.arange(train.n_stars))
    train.labels["LOGG"] = 2.5
    with pytest.raises(DataError, match="LOGG.*constant"):
        train_mod.train_model(tiny_config(), train, valid, tmp_path)


def test_validation_grid_must_match(toy, tmp_path):
    train, _ = toy
    with pytest.raises(GridMismatchError, match="41 pixels"):
        train_mod.train_model(tiny_config(), train, make_spectra(20, 41, 2), tmp_path)


def test_global_clipnorm_bounds_each_step():
    """train.global_clipnorm reaches Adam: after one step on a batch with a huge gradient,
    Adam's first moment is (1 - beta_1) times the gradient it was given, so its norm is
    (1 - beta_1) times the clip; unclipped it is orders of magnitude larger."""
    x, y = np.full((4, 40), 50.0, np.float32), np.full((4, 3), 1e4, np.float32)
    moments = {}
    for clip in (None, 1e-3):
        cfg = tiny_config(global_clipnorm=clip)
        train_mod.seed_everything(cfg)
        model = train_mod.compiled_model(40, cfg)
        model.train_on_batch(x, y)
        opt = model.optimizer
        m = [v.numpy() for v in opt.variables if "momentum" in v.path]
        moments[clip] = float(np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in m)))
    assert validate({})["train"]["global_clipnorm"] is None
    np.testing.assert_allclose(moments[1e-3], (1 - 0.9) * 1e-3, rtol=1e-3)
    assert moments[None] > 100 * moments[1e-3]
