"""Laplace posterior against closed forms, brute force and Monte Carlo; save/load; the step."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.exceptions import ConfigError, ModelFileError, NumericalError
from pipeline.laplace import Posterior, evidence, fit_laplace
from pipeline.laplace.curvature import Head, ggn_blocks
from pipeline.laplace.posterior import cholesky_with_jitter
from tests.conftest import set_seed

D = "float64"


def tiny_model(n_in=6, hidden=(8, 5), seed=1):
    set_seed(seed)
    layers = [keras.Input((n_in,), dtype=D)]
    layers += [keras.layers.Dense(h, "tanh", dtype=D) for h in hidden]
    return keras.Sequential(layers + [keras.layers.Dense(3, dtype=D)])


@pytest.fixture
def data(rng):
    model = tiny_model()
    x = rng.normal(size=(120, 6))
    y = model(x).numpy() + rng.normal(size=(120, 3)) * [0.05, 0.1, 0.2]
    return model, x, y


def independent_jacobians(model, x, variables):
    """Per-star tape Jacobians (N, 3, P): reference independent of pipeline.curvature."""
    rows = []
    for n in range(len(x)):
        with tf.GradientTape(persistent=True) as tape:
            f = model(x[n:n + 1])[0]
            outs = [f[k] for k in range(3)]
        rows.append([np.concatenate([g.numpy().ravel() for g in tape.gradient(o, variables)])
                     for o in outs])
    return np.array(rows)


def test_last_layer_posterior_is_bayesian_linear_regression(data):
    model, x, y = data
    post = fit_laplace(model, x, y, last_layers=1, device="cpu")
    last = model.layers[-1]
    phi = keras.Model(model.inputs[0], last.input)(x).numpy()
    design = np.hstack([phi, np.ones((len(x), 1))])  # features and the bias input
    d = phi.shape[1]
    delta, beta = post.prior_precision[0], post.noise_std**-2
    precision = np.zeros((3 * d + 3, 3 * d + 3))
    for k in range(3):  # label k owns kernel column k (index i*3+k) and bias k (3d+k)
        idx = np.r_[np.arange(d) * 3 + k, 3 * d + k]
        precision[np.ix_(idx, idx)] = beta[k] * design.T @ design
    precision += delta * np.eye(len(precision))
    a = post.cholesky @ post.cholesky.T
    assert np.abs(a - precision).max() / np.abs(precision).max() < 1e-12
    # predictive variance of label k = x~^T A_k^-1 x~, no correlation between labels
    cov = post.predictive_covariance(x[:7])
    for k in range(3):
        idx = np.r_[np.arange(d) * 3 + k, 3 * d + k]
        ref = np.einsum("np,pq,nq->n", design[:7], np.linalg.inv(precision[np.ix_(idx, idx)]),
                        design[:7])
        np.testing.assert_allclose(cov[:, k, k], ref, rtol=1e-10)
    off = cov - np.einsum("nii->ni", cov)[:, :, None] * np.eye(3)
    assert np.abs(off).max() < 1e-14 * np.abs(cov).max()


def brute_log_evidence(jac, theta, rss, n, delta, beta):
    """log Z from explicitly built A on a grid: delta (G,), beta (G, 3) -> (G,)."""
    g = np.einsum("nkp,nkq->kpq", jac, jac)
    a = np.einsum("gk,kpq->gpq", beta, g) + delta[:, None, None] * np.eye(theta.size)
    logdet = np.linalg.slogdet(a)[1]
    p = theta.size
    return (np.sum(n / 2 * np.log(beta / (2 * np.pi)) - beta * rss / 2, axis=1)
            + p / 2 * np.log(delta / (2 * np.pi)) - delta * (theta @ theta) / 2
            + p / 2 * np.log(2 * np.pi) - logdet / 2)


def test_evidence_optimum_beats_a_brute_force_grid(data):
    model, x, y = data
    post = fit_laplace(model, x, y, last_layers=2, device="cpu")
    variables = [v for la in model.layers[-2:] for v in (la.kernel, la.bias)]
    jac = independent_jacobians(model, x, variables)
    theta = np.concatenate([v.numpy().ravel() for v in variables])
    rss = np.sum((model(x).numpy() - y) ** 2, axis=0)
    best = np.r_[post.prior_precision, post.noise_std**-2]
    at_best = brute_log_evidence(jac, theta, rss, len(x), best[:1], best[None, 1:])[0]
    np.testing.assert_allclose(post.log_evidence, at_best, rtol=1e-10)
    # a grid of +-50% around the optimum in every hyperparameter (9^4 points)
    axes = [b * np.linspace(0.5, 1.5, 9) for b in best]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 4)
    values = brute_log_evidence(jac, theta, rss, len(x), grid[:, 0], grid[:, 1:])
    assert at_best >= values.max() - 1e-9
    # the grid maximum sits next to the optimum (within one grid step)
    arg = grid[np.argmax(values)]
    assert np.all(np.abs(arg / best - 1) <= 0.125 + 1e-12)
    # the evidence curve is the same function of a scalar prior at the fitted noise
    curve = post.evidence_curve
    ref = brute_log_evidence(jac, theta, rss, len(x), curve["prior_precision"][::10],
                             np.tile(best[1:], (7, 1)))
    np.testing.assert_allclose(curve["log_evidence"][::10], ref, rtol=1e-9)


def test_layer_prior_is_a_stationary_point(data):
    model, x, y = data
    post = fit_laplace(model, x, y, last_layers=2, prior="layer", device="cpu")
    assert post.prior_precision.shape == (2,)
    head = post.head
    blocks = ggn_blocks(head, head.features(x))
    rss = np.sum((model(x).numpy() - y) ** 2, axis=0)
    eta = np.log(np.r_[post.prior_precision, post.noise_std**-2])

    def value(e):
        return evidence.log_evidence(blocks, post.theta_map, rss, len(x), post.groups,
                                     np.exp(e[:2]), np.exp(e[2:]))
    h = 1e-5
    grad = [(value(eta + h * np.eye(5)[i]) - value(eta - h * np.eye(5)[i])) / (2 * h)
            for i in range(5)]
    assert np.max(np.abs(grad)) < 1e-4


def test_predictive_covariance_matches_monte_carlo(data):
    model, x, y = data
    post = fit_laplace(model, x, y, last_layers=2, device="cpu")
    samples = post.sample(40000, seed=3)
    np.testing.assert_allclose(samples.mean(0), post.theta_map, atol=5 * np.sqrt(
        np.diag(post.covariance()).max() / 40000))
    variables = [v for la in model.layers[-2:] for v in (la.kernel, la.bias)]
    jac = independent_jacobians(model, x[:4], variables)
    mc = np.einsum("nkp,sp->snk", jac, samples - post.theta_map)  # linearized predictive
    mc_cov = np.einsum("snk,snl->nkl", mc, mc) / len(samples)
    cov = post.predictive_covariance(x[:4])
    var = np.einsum("nkk->nk", cov)
    np.testing.assert_allclose(np.einsum("nkk->nk", mc_cov), var, rtol=0.04)
    np.testing.assert_allclose(mc_cov, cov, atol=0.04 * var.max())
    # and against the explicit inverse (formed only here, on request)
    np.testing.assert_allclose(cov, np.einsum("nkp,pq,nlq->nkl", jac, post.inverse_hessian(),
                                              jac), rtol=1e-9, atol=1e-15)


def test_weights_of_units_dead_on_the_training_set_keep_their_prior_variance(rng):
    """A ReLU unit that never activates on the training stars decouples its weights (zero
    curvature rows): the predictive covariance skips them in the solves, and a new star that
    switches the unit on gets the prior's variance there, as the explicit inverse gives."""
    set_seed(2)
    model = keras.Sequential([keras.Input((6,), dtype=D), keras.layers.Dense(8, "relu", dtype=D),
                              keras.layers.Dense(5, "relu", dtype=D),
                              keras.layers.Dense(3, dtype=D)])
    x = rng.normal(size=(150, 6))
    phi = keras.Model(model.inputs[0], model.layers[0].output)(x).numpy()
    kernel, bias = (v.numpy() for v in model.layers[1].weights)
    kernel[:, 4], bias[4] = 1.0, -phi.sum(axis=1).max() - 0.1  # unit 4: off on every star
    model.layers[1].set_weights([kernel, bias])
    y = model(x).numpy() + rng.normal(size=(150, 3)) * 0.1
    post = fit_laplace(model, x, y, last_layers=2, device="cpu")
    assert post.n_decoupled >= 8 + 1 + 3  # unit 4's kernel column, bias and outgoing row
    new = np.vstack([x[:3], 20 * x[:3]])
    hidden = keras.Model(model.inputs[0], model.layers[1].output)(new).numpy()
    assert (hidden[:3, 4] == 0).all() and (hidden[3:, 4] > 0).any(), "the case: unit 4 on"
    variables = [v for la in model.layers[-2:] for v in (la.kernel, la.bias)]
    jac = independent_jacobians(model, new, variables)
    reference = np.einsum("nkp,pq,nlq->nkl", jac, post.inverse_hessian(), jac)
    np.testing.assert_allclose(post.predictive_covariance(new), reference, rtol=1e-9,
                               atol=1e-14 * np.abs(reference).max())


def kronecker_case(rng, last_layers, subset=False, n_in=40, hidden=(24, 16)):
    """A ReLU network with a random SPD posterior precision over its last layers (weight 5 of
    the first layer's kernel, one of its bias and the last weight decoupled) and 20 inputs:
    Posterior built without a fit; ``subset``: the head's weights without the first layer's
    kernel."""
    set_seed(4)
    model = keras.Sequential([keras.Input((n_in,), dtype=D)]
                             + [keras.layers.Dense(h, "relu", dtype=D) for h in hidden]
                             + [keras.layers.Dense(3, dtype=D)])
    head = Head(model, last_layers)
    if subset:
        head = Head(model, last_layers, head.names[1:])
    m = rng.normal(size=(head.n_params, head.n_params)) / np.sqrt(head.n_params)
    precision = m @ m.T + 0.1 * np.eye(head.n_params)
    n_kernel = int(np.prod(head.shapes[0]))
    for w in (5, n_kernel + 1, head.n_params - 1):  # decoupled: prior only
        precision[:, w] = precision[w, :] = 0.0
        precision[w, w] = 3.0
    post = Posterior(head, np.linalg.cholesky(precision), prior_precision=[1.0],
                     groups=np.zeros(head.n_params, int), noise_std=np.ones(3), log_evidence=0.0,
                     curvature="ggn", eigenvalues=np.ones(head.n_params),
                     evidence_curve={"prior_precision": [1.0], "log_evidence": [0.0]},
                     info={"device": "cpu"})
    return model, post, np.linalg.inv(precision), rng.normal(size=(20, n_in))


@pytest.mark.parametrize("last_layers", [1, 2, 3])
def test_kronecker_route_equals_the_triangular_solves_and_the_explicit_inverse(rng, last_layers):
    """The outer-product route of the predictive covariance (pipeline.laplace.kronecker), the
    triangular solves and J Sigma J^T with numpy's inverse of the precision agree for heads
    of one, two and three layers, decoupled weights included."""
    model, post, sigma, x = kronecker_case(rng, last_layers)
    assert post.n_decoupled == 3
    assert post._kronecker is not None  # the route is chosen: its first layer dominates
    kron = post.predictive_covariance(x)
    post.__dict__["_kronecker"] = None  # force the triangular solves
    solves = post.predictive_covariance(x)
    jac = independent_jacobians(model, x, post.head.variables)
    reference = np.einsum("nkp,pq,nlq->nkl", jac, sigma, jac)
    np.testing.assert_allclose(kron, reference, rtol=1e-10, atol=1e-13 * np.abs(reference).max())
    np.testing.assert_allclose(kron, solves, rtol=1e-10, atol=1e-13 * np.abs(reference).max())


def test_jacobian_without_the_outer_kernel_block_is_the_full_one_less_those_columns(rng):
    """Head.jacobian(outer_kernel=False), which the Kronecker route reads, is the full
    per-star Jacobian without the first layer's kernel columns (bias block first), and
    a head whose weights do not start with that kernel refuses it."""
    model, post, _, x = kronecker_case(rng, 2)
    head = post.head
    phi = head.features(x)
    full, f = head.jacobian(phi)
    reduced, f2 = head.jacobian(phi, outer_kernel=False)
    m, d = head.outer_product_layer
    np.testing.assert_array_equal(reduced.numpy(), full.numpy()[:, :, (m - 1) * d:])
    np.testing.assert_array_equal(f2.numpy(), f.numpy())
    subset = kronecker_case(rng, 2, subset=True)[1].head
    with pytest.raises(ValueError, match="outer_product_layer"):
        subset.jacobian(phi, outer_kernel=False)


def test_solves_of_a_head_without_the_outer_product_structure(rng):
    """A head whose weights start past the first layer's kernel takes the triangular solves
    over its whole Jacobian: J Sigma J^T with numpy's inverse, decoupled weights included."""
    model, post, sigma, x = kronecker_case(rng, 2, subset=True)
    assert post.head.outer_product_layer is None and post.n_decoupled == 3
    jac = independent_jacobians(model, x, post.head.variables)
    reference = np.einsum("nkp,pq,nlq->nkl", jac, sigma, jac)
    np.testing.assert_allclose(post.predictive_covariance(x), reference, rtol=1e-10,
                               atol=1e-13 * np.abs(reference).max())


def test_kronecker_route_only_where_it_applies(rng):
    """A head whose weights start past the first layer's kernel (a subset), or a posterior
    fitted on the GPU (its solves run there), keeps the triangular solves."""
    assert kronecker_case(rng, 2, subset=True)[1]._kronecker is None
    post = kronecker_case(rng, 2)[1]
    post.device = "gpu"
    assert post._kronecker is None


def test_save_load_reproduces_every_variance_bit_for_bit(data, tmp_path):
    model, x, y = data
    post = fit_laplace(model, x, y, last_layers=2, curvature="hessian", device="cpu")
    path = tmp_path / "posterior.npz"
    post.save(path, provenance={"PKGVERS": "test"})
    loaded = Posterior.load(path, model)
    assert np.array_equal(loaded.predictive_covariance(x), post.predictive_covariance(x))
    for name in ("cholesky", "prior_precision", "noise_std", "eigenvalues", "theta_map"):
        assert np.array_equal(getattr(loaded, name), getattr(post, name))
    assert loaded.log_evidence == post.log_evidence and loaded.curvature == "hessian"
    with np.load(path) as npz:
        info = json.loads(str(npz["info"]))
        assert info["provenance"]["PKGVERS"] == "test" and info["device"] == "cpu"
        assert npz["evidence_curve_log_evidence"].shape == (61,)
        assert list(npz["weight_names"]) == post.head.names
    other = tiny_model(seed=9)  # same architecture, other weights
    with pytest.raises(ModelFileError, match="different model"):
        Posterior.load(path, other)
    with pytest.raises(ModelFileError, match="different model"):
        Posterior.load(path, tiny_model(hidden=(8, 4)))
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file


def test_cholesky_jitter_and_failures():
    a = np.diag([1.0, 1.0, 0.0])  # singular: needs jitter
    chol, added = cholesky_with_jitter(a, jitter_initial=1e-8, jitter_max=1e-2)
    assert added > 0 and np.allclose(chol @ chol.T, a + added * np.eye(3))
    with pytest.raises(NumericalError, match="jitter_max"):
        cholesky_with_jitter(np.diag([1.0, -5.0, 1.0]), jitter_initial=1e-8, jitter_max=1e-2)


def test_bad_options_name_the_config_key(data):
    model, x, y = data
    with pytest.raises(ConfigError, match="laplace.hyperparameters.*evidence, validation"):
        fit_laplace(model, x, y, hyperparameters="grid")
    with pytest.raises(ConfigError, match="laplace.prior"):
        fit_laplace(model, x, y, prior="diag")
    with pytest.raises(ValueError, match="x_valid"):
        fit_laplace(model, x, y, hyperparameters="validation")


def toy_spectra(teff, rng, n_pix=40):
    """Synthetic-like spectra: Gaussian lines whose depth grows as Teff falls, with noise."""
    centres = np.linspace(0, 1, n_pix)
    depth = 0.6 * np.exp(-(teff[:, None] - 3500) / 2500 * (1 + 2 * centres))
    flux = 1 - depth + 0.01 * rng.normal(size=depth.shape)
    return flux.astype(np.float32)


def test_epistemic_error_grows_outside_the_training_range(rng):
    set_seed(5)
    teff = rng.uniform(4000, 6000, 600)
    labels = np.stack([teff, 2.5 + (teff - 5000) / 1000, np.zeros(600)], 1)
    labels[:, 2] = rng.normal(0, 0.3, 600)
    flux = toy_spectra(teff, rng)
    mean, scale = labels.mean(0), labels.std(0)
    z = (labels - mean) / scale
    model = keras.Sequential([keras.Input((40,)), keras.layers.Dense(16, "tanh"),
                              keras.layers.Dense(8, "tanh"), keras.layers.Dense(3)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(flux, z, epochs=60, batch_size=64, verbose=0)
    post = fit_laplace(model, flux, z, last_layers=2, device="cpu")
    inside = toy_spectra(rng.uniform(4500, 5500, 50), rng)
    outside = toy_spectra(np.full(50, 6800.0), rng)
    var_in = np.median(post.predictive_covariance(inside)[:, 0, 0])
    var_out = np.median(post.predictive_covariance(outside)[:, 0, 0])
    assert var_out > 3 * var_in


def test_laplace_step_writes_a_posterior_that_reloads(tmp_path, rng):
    from astropy.table import Table

    from pipeline.artifacts.model_dir import MODEL_FILE, SCALER_FILE, WAVE_FILE
    from pipeline.cli import main
    from pipeline.nn.scaler import LabelScaler
    from pipeline.spectra.dataset import Spectra
    from pipeline.spectra.fits import write_spectra
    from pipeline.steps.laplace import build_parser, run

    set_seed(6)
    n_pix = 30
    wave = np.linspace(15100.0, 16900.0, n_pix)
    files = {}
    for split, n in (("train", 90), ("valid", 40)):
        teff = rng.uniform(4000, 6000, n)
        labels = Table({"STAR_ID": [f"{split}{i}" for i in range(n)], "TEFF": teff,
                        "LOGG": rng.uniform(1, 4, n), "FE_H": rng.normal(0, 0.3, n)})
        flux = toy_spectra(teff, rng, n_pix)
        files[split] = tmp_path / f"{split}.fits"
        write_spectra(files[split], Spectra(flux, np.full_like(flux, 0.01), wave, labels))
    model = keras.Sequential([keras.Input((n_pix,)), keras.layers.Dense(6, "tanh"),
                              keras.layers.Dense(5, "tanh"), keras.layers.Dense(3)])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model.save(model_dir / MODEL_FILE)
    scaler = LabelScaler().fit(np.stack([rng.normal(5000, 500, 50), rng.normal(2.5, 1, 50),
                                         rng.normal(0, 0.3, 50)], 1))
    scaler.save(model_dir / SCALER_FILE)
    np.save(model_dir / WAVE_FILE, wave)
    out = tmp_path / "laplace" / "posterior.npz"
    for mode in ("evidence", "validation"):
        # no emulator file here: the scatter model without the emulator offset (test_shift)
        argv = ["--config-json", json.dumps({"laplace": {"hyperparameters": mode, "device": "cpu",
                                                         "scatter_emulator": False}}),
                "--model", str(model_dir), "--train", str(files["train"]),
                "--valid", str(files["valid"]), "--out", str(out)]
        assert main(build_parser, run, argv) == 0
        with np.load(out) as npz:
            assert {"weight_names", "map_values", "prior_precision", "noise_std", "cholesky",
                    "log_evidence", "curvature", "eigenvalues", "evidence_curve_prior_precision",
                    "evidence_curve_log_evidence", "info"} <= set(npz.files)
            info = json.loads(str(npz["info"]))
        assert info["hyperparameters"] == mode and "CFGHASH" in info["provenance"]
        scatter = info["scatter"]  # the default 'linear' scatter model, capped and correlated
        # intercept, model, noise, three labels and their squares (scatter_label_degree 2)
        assert np.shape(scatter["coef"]) == (3, 9)
        assert np.all(np.abs(np.asarray(scatter["coef"])[:, 1:]) < 5)
        assert np.all(np.asarray(scatter["cap"]) > 0)
        np.testing.assert_allclose(np.diag(scatter["correlation"]), 1.0)
        assert "TFVERS" in info["provenance"] and info["provenance"]["DEVICE"] == "CPU"
    from pipeline.artifacts.model_dir import load_trained

    loaded_model = load_trained(model_dir)[0]
    post = Posterior.load(out, loaded_model)
    assert np.all(np.isfinite(post.predictive_covariance(toy_spectra(np.full(3, 5e3), rng,
                                                                     n_pix))))


def test_truncated_or_foreign_posterior_files_are_model_file_errors(data, tmp_path):
    model, x, y = data
    post = fit_laplace(model, x, y, last_layers=1, device="cpu")
    good = tmp_path / "posterior.npz"
    post.save(good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, something=np.arange(3))
    for path in (truncated, foreign):
        with pytest.raises(ModelFileError, match="not a readable posterior file"):
            Posterior.load(path, model)
    with pytest.raises(ModelFileError, match="absent.npz' does not exist; run the laplace"):
        Posterior.load(tmp_path / "absent.npz", model)


def test_options_are_the_config_keys_and_unknown_ones_are_named():
    from dataclasses import fields

    from pipeline.config import validate
    from pipeline.laplace.posterior import LaplaceOptions

    cfg = validate({"laplace": {"last_layers": 3, "jitter_max": 1e-3}})["laplace"]
    options = LaplaceOptions.from_config(cfg)
    assert {f.name for f in fields(LaplaceOptions)} <= set(cfg)  # every option is a config key
    assert options.last_layers == 3 and options.jitter_max == 1e-3
    assert options.with_overrides({"device": "cpu"}).device == "cpu"
    with pytest.raises(TypeError, match="unknown option.*lastlayers.*valid: last_layers"):
        options.with_overrides({"lastlayers": 1})
