"""Ensembles of Laplace networks: member seeds and paths, the mixture's moments against a
Monte-Carlo sample of the mixture, one member = the single model, and predict end to end with
two members against the members' own catalogs."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from pipeline.artifacts.members import member_paths, member_seed, model_dir, posterior_path
from pipeline.artifacts.model_dir import load_trained
from pipeline.cli import main
from pipeline.config import validate
from pipeline.exceptions import ConfigError, DataError
from pipeline.laplace.ensemble import ensemble_budget, mixture_moments
from pipeline.steps import predict

CONFIG = validate({})


# ------------------------------------------------------------------------- seeds and paths
def test_one_member_keeps_the_single_model_seed_and_paths():
    assert member_seed(42, 1, 0) == 42
    assert model_dir("results", 1, 0) == "results/model"
    assert posterior_path("results", 1, 0) == "results/laplace/posterior.npz"
    assert model_dir("results", 1) == "results/model"  # no {member} wildcard in the rules


def test_member_seeds_are_distinct_reproducible_and_from_seedsequence():
    seeds = [member_seed(42, 4, m) for m in range(4)]
    assert len(set(seeds)) == 4 and 42 not in seeds
    assert seeds == [member_seed(42, 4, m) for m in range(4)]
    assert seeds[2] == int(np.random.SeedSequence([42, 0x454E53, 2]).generate_state(1)[0])
    assert member_seed(43, 4, 0) != seeds[0]
    # growing the ensemble keeps the members already trained
    assert [member_seed(42, 6, m) for m in range(4)] == seeds
    with pytest.raises(ValueError, match="ensemble.members"):
        member_seed(42, 4, 4)


def test_member_paths():
    assert model_dir("results", 3) == "results/model/member-{member}"
    assert [tuple(map(str, p)) for p in member_paths("r", 2)] == [
        ("r/model/member-0", "r/laplace/member-0/posterior.npz"),
        ("r/model/member-1", "r/laplace/member-1/posterior.npz")]


# ----------------------------------------------------------------------------- the mixture
def _random_members(rng, m=4, n=3, k=3):
    means = rng.normal(scale=2.0, size=(m, n, k))
    a = rng.normal(size=(m, n, k, k))
    covs = a @ np.swapaxes(a, -1, -2) + 0.1 * np.eye(k)
    return means, covs


def test_mixture_moments_match_monte_carlo_of_the_mixture():
    """Draw from (1/M) sum_m N(mu_m, C_m) and compare the sample moments with the closed form,
    within 5 Monte-Carlo standard errors estimated from the same sample."""
    rng = np.random.default_rng(5)
    means, covs = _random_members(rng)
    mean, within, between = mixture_moments(means, covs)
    n_draws = 200_000
    chol = np.linalg.cholesky(covs)  # (M, N, K, K)
    for star in range(means.shape[1]):
        comp = rng.integers(0, means.shape[0], n_draws)
        draws = means[comp, star] + np.einsum(
            "sij,sj->si", chol[comp, star], rng.standard_normal((n_draws, 3)))
        se_mean = draws.std(axis=0) / np.sqrt(n_draws)
        np.testing.assert_array_less(np.abs(draws.mean(axis=0) - mean[star]), 5 * se_mean)
        centred = draws - mean[star]
        products = centred[:, :, None] * centred[:, None, :]
        se_cov = products.std(axis=0) / np.sqrt(n_draws)
        np.testing.assert_array_less(
            np.abs(products.mean(axis=0) - (within + between)[star]), 5 * se_cov)
        # the test can fail: the members' mean covariance alone is far outside the MC error
        assert np.any(np.abs(products.mean(axis=0) - within[star]) > 20 * se_cov)


def test_mixture_moments_against_a_loop_over_stars():
    rng = np.random.default_rng(6)
    means, covs = _random_members(rng, m=3, n=4)
    mean, within, between = mixture_moments(means, covs)
    for n in range(4):
        np.testing.assert_allclose(mean[n], means[:, n].mean(axis=0), rtol=1e-13)
        np.testing.assert_allclose(between[n], np.cov(means[:, n].T, bias=True), rtol=1e-12)
        np.testing.assert_allclose(within[n], covs[:, n].mean(axis=0), rtol=1e-13)
    with pytest.raises(DataError, match=r"\(M, N, K\)"):
        mixture_moments(means, covs[..., 0])


def _budget(rng, n=5):
    means, covs = _random_members(rng, m=3, n=n)
    parts = {"model": covs[0], "scatter": covs[1], "noise": covs[2]}
    return {"prediction": means[0], **parts, "total": sum(parts.values())}


def test_one_member_budget_is_returned_unchanged():
    budget = _budget(np.random.default_rng(7))
    assert ensemble_budget([budget]) is budget
    with pytest.raises(DataError, match="at least one member"):
        ensemble_budget([])


def test_ensemble_budget_parts_add_up_to_the_mixture_covariance():
    rng = np.random.default_rng(8)
    budgets = [_budget(rng) for _ in range(3)]
    out = ensemble_budget(budgets)
    preds = np.stack([b["prediction"] for b in budgets])
    _, within_total, between = mixture_moments(preds, np.stack([b["total"] for b in budgets]))
    np.testing.assert_allclose(out["prediction"], preds.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(out["total"], within_total + between, rtol=1e-12)
    np.testing.assert_allclose(out["model"] + out["scatter"] + out["noise"], out["total"],
                               rtol=1e-12)
    np.testing.assert_allclose(out["model"] - out["model_laplace"], out["ensemble"], atol=1e-12)
    np.testing.assert_allclose(out["noise"], np.mean([b["noise"] for b in budgets], axis=0))


# ---------------------------------------------------------------------- predict end to end
class ConstantPosterior:
    """A fixed epistemic covariance and scatter (standardized units)."""

    noise_std = np.array([0.1, 0.2, 0.3])
    cov = np.array([[0.04, 0.01, 0.0], [0.01, 0.09, 0.02], [0.0, 0.02, 0.01]])

    def __init__(self, factor=1.0):
        self.cov = self.cov * factor

    def predictive_covariance(self, x):
        return np.broadcast_to(self.cov, (len(x), 3, 3)).copy()


@pytest.fixture(scope="module")
def second_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with perturbed weights: a second member that predicts differently."""
    import shutil

    model, _, _ = load_trained(tiny_model_dir)
    rng = np.random.default_rng(1)
    model.set_weights([w + 0.05 * np.abs(w).mean() * rng.standard_normal(w.shape)
                       for w in model.get_weights()])
    out = tmp_path_factory.mktemp("member1")
    for name in ("wave.npy", "scaler.json"):
        shutil.copy(tiny_model_dir / name, out / name)
    model.save(out / "model.keras")
    return out


@pytest.fixture(scope="module")
def spectra(tiny_model_dir):
    from pipeline.spectra.synthetic import generate

    return generate(10, 21, wave=np.load(tiny_model_dir / "wave.npy"))


def test_identical_members_give_exactly_the_single_model(tiny_model_dir, spectra):
    model, scaler, _ = load_trained(tiny_model_dir)
    post = ConstantPosterior()
    single = predict.predict_catalog(model, post, scaler, spectra, False, CONFIG)
    double = predict.predict_catalog(model, post, scaler, spectra, False, CONFIG,
                                     members=((model, post, scaler),))
    assert "TEFF_ERR_ENSEMBLE" not in single.colnames
    assert set(double.colnames) - set(single.colnames) == {
        "TEFF_ERR_ENSEMBLE", "LOGG_ERR_ENSEMBLE", "FE_H_ERR_ENSEMBLE"}
    for name in single.colnames[1:]:
        np.testing.assert_allclose(double[name], single[name], rtol=1e-12, atol=0, err_msg=name)
    np.testing.assert_array_equal(double["TEFF_ERR_ENSEMBLE"], 0.0)


def test_predict_cli_two_members_is_the_mixture_of_their_catalogs(
        tiny_model_dir, second_model_dir, spectra, tmp_path, monkeypatch):
    from pipeline.spectra.fits import write_spectra

    posteriors = {"p0.npz": ConstantPosterior(1.0), "p1.npz": ConstantPosterior(2.0)}
    monkeypatch.setattr(predict.Posterior, "load",
                        classmethod(lambda cls, path, model: posteriors[str(path)]))
    write_spectra(tmp_path / "stars.fits", spectra)
    tables = []
    for models, posts, name in (([tiny_model_dir], ["p0.npz"], "m0"),
                                ([second_model_dir], ["p1.npz"], "m1"),
                                ([tiny_model_dir, second_model_dir], ["p0.npz", "p1.npz"],
                                 "ens")):
        pairs = [a for m, p in zip(models, posts, strict=True) for a in ("--model", m,
                                                                         "--posterior", p)]
        argv = [*pairs, "--name", name,
                "--out", tmp_path / "pred", tmp_path / "stars.fits"]
        assert main(predict.build_parser, predict.run, [str(a) for a in argv]) == 0
        tables.append(Table.read(tmp_path / "pred" / f"{name}.fits", hdu="CATALOG"))
    m0, m1, ens = tables
    for label in ("TEFF", "LOGG", "FE_H"):
        pred = np.stack([m0[label], m1[label]])
        assert np.all(np.abs(pred[0] - pred[1]) > 0), label  # the members disagree
        np.testing.assert_allclose(ens[label], pred.mean(axis=0), rtol=1e-10)
        spread2 = pred.var(axis=0)  # 1/M: the mixture's between-member variance
        np.testing.assert_allclose(ens[f"{label}_ERR_ENSEMBLE"] ** 2, spread2, rtol=1e-8)
        np.testing.assert_allclose(
            ens[f"{label}_ERR"] ** 2, (m0[f"{label}_ERR"] ** 2 + m1[f"{label}_ERR"] ** 2) / 2
            + spread2, rtol=1e-8)
        np.testing.assert_allclose(
            ens[f"{label}_ERR_MODEL"] ** 2,
            (m0[f"{label}_ERR_MODEL"] ** 2 + m1[f"{label}_ERR_MODEL"] ** 2) / 2 + spread2,
            rtol=1e-8)


def test_predict_needs_one_posterior_per_model(tiny_model_dir, spectra, tmp_path, capsys):
    argv = ["--model", tiny_model_dir, "--model", tiny_model_dir, "--posterior", "p0.npz",
            "--out", tmp_path / "pred", tmp_path / "x.fits"]
    from pipeline.spectra.fits import write_spectra

    write_spectra(tmp_path / "x.fits", spectra)
    assert main(predict.build_parser, predict.run, [str(a) for a in argv]) == 1
    assert "one posterior per model" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="one posterior per model"):
        predict.load_members(["a", "b"], ["p"])


def test_members_below_one_is_a_config_error_naming_the_key():
    assert CONFIG["ensemble"]["members"] == 1  # the single model by default
    with pytest.raises(ConfigError, match="ensemble.members"):
        validate({"ensemble": {"members": 0}})


# ------------------------------------------------------------- the ensemble's scatter model
SCALE = np.array([500.0, 0.8, 0.3])  # physical units per standardized unit (Teff, log g, [Fe/H])


def _scaler():
    from pipeline.nn.scaler import LabelScaler

    return LabelScaler(mean=np.array([5000.0, 3.0, -0.5]), scale=SCALE.copy())


def _spd(rng, n, scale):
    """n random symmetric positive definite (3, 3) matrices, variances ~ scale^2."""
    a = rng.normal(size=(n, 3, 3)) * scale[:, None]
    return np.einsum("nij,nkj->nik", a, a) / 3 + 1e-3 * np.diag(scale**2)


def _validation_members(rng, n=5000, m=3, extra=None):
    """Member budgets (physical units) of n validation stars and their true labels, built so
    that the mixture mean's residual is N(0, within Laplace + between + noise [+ extra]):
    the mixture's own variance is right, and each member's residual mu_m - y is that plus the
    member's deviation from the mixture mean, which its Laplace covariance does not cover."""
    scaler = _scaler()
    level = np.exp(rng.uniform(-1.0, 1.0, size=(n, 1)))  # stars of different difficulty
    laplace = _spd(rng, n, 0.3 * SCALE) * level[:, :, None]
    noise = _spd(rng, n, 0.4 * SCALE) * np.exp(rng.uniform(-1.0, 1.0, size=(n, 1, 1)))
    deviation = np.einsum("nij,mnj->mni", np.linalg.cholesky(_spd(rng, n, 0.6 * SCALE)),
                          rng.standard_normal((m, n, 3)))
    deviation -= deviation.mean(axis=0)  # the members scatter around the mixture mean
    between = np.einsum("mni,mnj->nij", deviation, deviation) / m
    var = laplace + between + noise + (0.0 if extra is None else extra)
    truth = scaler.inverse_transform(rng.standard_normal((n, 3)))
    mean = truth + np.einsum("nij,nj->ni", np.linalg.cholesky(var), rng.standard_normal((n, 3)))
    budgets = [{"prediction": mean + deviation[k], "model": laplace, "noise": noise,
                "scatter": np.zeros_like(noise), "total": laplace + noise} for k in range(m)]
    return budgets, truth, scaler


def _z_std(budget, truth):
    return np.std((budget["prediction"] - truth)
                  / np.sqrt(np.diagonal(budget["total"], axis1=1, axis2=2)), axis=0)


@pytest.mark.parametrize(("kind", "labels"), [("constant", True), ("linear", False),
                                               ("linear", True)])
def test_mixture_scatter_vanishes_when_the_mixture_variance_is_already_right(kind, labels):
    """The mixture residuals are drawn from N(0, model + noise) of the mixture: the scatter
    fitted on them carries almost no variance (the sampling error of a variance ratio from
    5000 stars is sqrt(2/5000) = 0.02), and z has unit std. The members' own scatters, fitted
    on each member's residuals as the laplace step does, absorb the member spread and make the
    mixture's errors too large, which the test checks to show it can fail.

    With the predicted labels as covariates the fit finds some scatter (share 0.06-0.07,
    z std 0.95-0.96 on seeds 11-13): given the *predicted* label, the residual is not
    N(0, model + noise) (a star predicted at the edge of the label range is more often one with
    a large error), and the log-linear scatter takes that up. Its bounds are looser."""
    from pipeline.laplace.ensemble import fit_mixture_scatter
    from pipeline.laplace.scatter import fit_scatter

    budgets, truth, scaler = _validation_members(np.random.default_rng(11))
    cfg = {"scatter": kind, "scatter_ridge": 0.02, "scatter_cap_quantile": 0.99,
           "scatter_labels": labels, "scatter_emulator": False}
    share, z_tol = (0.08, 0.06) if labels and kind == "linear" else (0.06, 0.04)
    mixture = ensemble_budget(budgets)
    scatter = fit_mixture_scatter(mixture, truth, scaler, cfg)
    new = ensemble_budget(budgets, scatter=scatter, scaler=scaler)
    diag = {k: np.diagonal(new[k], axis1=1, axis2=2) for k in ("scatter", "total")}
    assert np.all(np.mean(diag["scatter"] / diag["total"], axis=0) < share)
    np.testing.assert_allclose(_z_std(new, truth), 1.0, atol=z_tol)

    # the old mixture: each member's scatter fitted on its own residuals, then averaged
    std = np.outer(SCALE, SCALE)
    for b in budgets:
        own = fit_scatter((b["prediction"] - truth) / SCALE, b["model"] / std,
                          b["noise"] / std, kind, ridge=0.02)
        b["scatter"] = own.covariance(np.diagonal(b["model"], axis1=1, axis2=2) / SCALE**2,
                                      np.diagonal(b["noise"], axis1=1, axis2=2) / SCALE**2) * std
        b["total"] = b["model"] + b["scatter"] + b["noise"]
    old = ensemble_budget(budgets)
    old_share = np.diagonal(old["scatter"], axis1=1, axis2=2) / np.diagonal(
        old["total"], axis1=1, axis2=2)
    assert np.all(np.mean(old_share, axis=0) > 0.15)
    assert np.all(_z_std(old, truth) < 0.92)


def test_mixture_scatter_recovers_a_known_constant_scatter_and_its_correlation():
    """An extra independent N(0, s0 R0 s0) in the mixture residuals (standardized s0 = 0.5,
    0.3, 0.4): the constant fit recovers s0 within 5%, and R0 within 0.1: R matches the mean
    predicted correlation over stars (pipeline.laplace.scatter), which recovers R0 exactly only
    when every star has the same share of scatter, not for these stars of varied errors."""
    from pipeline.laplace.ensemble import fit_mixture_scatter

    s0 = np.array([0.5, 0.3, 0.4])
    r0 = np.array([[1.0, 0.6, -0.3], [0.6, 1.0, 0.2], [-0.3, 0.2, 1.0]])
    extra = (s0[:, None] * r0 * s0[None, :]) * np.outer(SCALE, SCALE)
    budgets, truth, scaler = _validation_members(np.random.default_rng(12), extra=extra)
    scatter = fit_mixture_scatter(ensemble_budget(budgets), truth, scaler,
                                  {"scatter": "constant", "scatter_ridge": 0.02,
                                   "scatter_cap_quantile": 0.99, "scatter_labels": True})
    np.testing.assert_allclose(np.exp(scatter.coef[:, 0]), s0, rtol=0.05)
    np.testing.assert_array_equal(scatter.coef[:, 1:], 0.0)
    np.testing.assert_allclose(scatter.correlation, r0, atol=0.1)


@pytest.mark.parametrize("labels", [False, True])
def test_ensemble_budget_evaluates_the_scatter_model_at_the_mixture_variances(labels):
    """Against a loop over stars: scatter = S D R D S with D = the model's std at the star's
    standardized mixture model and noise variances (and, with labels as covariates, its
    standardized mixture mean); the sum rule still holds."""
    from pipeline.laplace.scatter import ScatterModel

    budgets, _, scaler = _validation_members(np.random.default_rng(13), n=6)
    coef = np.array([[-1.0, 0.3, -0.2], [-0.5, 0.1, 0.4], [-2.0, 0.0, 0.2]])
    n_cov = 5 if labels else 2
    if labels:
        coef = np.hstack([coef, [[0.2, -0.3, 0.1], [0.0, 0.4, -0.2], [0.3, 0.1, 0.5]]])
    scatter = ScatterModel(coef=coef,
                           u_centre=np.full((3, n_cov), -1.0), u_scale=np.full((3, n_cov), 0.5),
                           u_lo=np.full((3, n_cov), -3.0), u_hi=np.full((3, n_cov), 3.0),
                           cap=np.array([0.5, 0.4, 0.3]),
                           correlation=np.array([[1.0, 0.2, 0.0], [0.2, 1.0, -0.1],
                                                 [0.0, -0.1, 1.0]]))
    out = ensemble_budget(budgets, scatter=scatter, scaler=scaler)
    preds = np.stack([b["prediction"] for b in budgets])
    for n in range(6):
        dev = preds[:, n] - preds[:, n].mean(axis=0)
        model = budgets[0]["model"][n] + dev.T @ dev / len(budgets)
        noise = budgets[0]["noise"][n]
        zhat = (preds[:, n].mean(axis=0) - np.array([5000.0, 3.0, -0.5])) / SCALE
        s = scatter.std(np.diag(model)[None] / SCALE**2, np.diag(noise)[None] / SCALE**2,
                        zhat[None])[0]
        expected = np.outer(s * SCALE, s * SCALE) * scatter.correlation
        np.testing.assert_allclose(out["scatter"][n], expected, rtol=1e-12)
        np.testing.assert_allclose(out["model"][n], model, rtol=1e-12)
        np.testing.assert_allclose(out["total"][n], model + expected + noise, rtol=1e-12)
    with pytest.raises(ValueError, match="label scaler"):
        ensemble_budget(budgets, scatter=scatter)


# ------------------------------------------------------------------ the ensemble scatter file
def _scatter_model():
    from pipeline.laplace.scatter import fit_scatter

    rng = np.random.default_rng(14)
    return fit_scatter(rng.normal(size=(200, 3)), np.full((200, 3), 0.1), np.full((200, 3), 0.2))


class _Map:
    def __init__(self, values):
        self.theta_map = np.asarray(values, np.float64)


def test_ensemble_scatter_file_round_trip_and_refuses_other_members(tmp_path):
    from pipeline.artifacts.ensemble_scatter import (
        read_ensemble_scatter,
        write_ensemble_scatter,
    )
    from pipeline.exceptions import ModelFileError
    from pipeline.laplace.scatter import FIELDS

    scatter, posts = _scatter_model(), [_Map([1.0, 2.0]), _Map([1.0, 2.5])]
    path = tmp_path / "laplace" / "ensemble_scatter.npz"
    write_ensemble_scatter(path, scatter, "linear", SCALE, posts, {"n_valid": 200})
    back = read_ensemble_scatter(path, posts, SCALE)
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(back, name), getattr(scatter, name))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    with pytest.raises(ModelFileError, match="ensemble_scatter step"):
        read_ensemble_scatter(path, posts[::-1], SCALE)  # another order: other members
    with pytest.raises(ModelFileError, match="fitted for members"):
        read_ensemble_scatter(path, [posts[0], _Map([1.0, 2.5 + 1e-12])], SCALE)
    with pytest.raises(ModelFileError, match="label scale"):
        read_ensemble_scatter(path, posts, SCALE * 1.01)
    with pytest.raises(ModelFileError, match="does not exist; run the ensemble_scatter"):
        read_ensemble_scatter(tmp_path / "none.npz", posts, SCALE)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="not a readable ensemble scatter file"):
        read_ensemble_scatter(tmp_path / "bad.npz", posts, SCALE)


# -------------------------------------------------- the ensemble_scatter step, then predict
@pytest.fixture(scope="module")
def second_posterior_file(second_model_dir, tmp_path_factory):
    """A last-layer Laplace posterior of the second member, fitted as tiny_posterior_file."""
    from pipeline.laplace import fit_laplace
    from pipeline.spectra.synthetic import generate

    model, scaler, wave = load_trained(second_model_dir)
    spectra = generate(60, 3, wave=wave)
    spectra.flux[spectra.flux_err <= 0] = 1.0
    posterior = fit_laplace(model, spectra.flux, scaler.transform(spectra.label_array()),
                            last_layers=1)
    path = tmp_path_factory.mktemp("member1_posterior") / "posterior.npz"
    posterior.save(path)
    return path


def test_ensemble_scatter_step_then_predict_uses_the_mixture_scatter(
        tiny_model_dir, second_model_dir, tiny_posterior_file, second_posterior_file, spectra,
        tmp_path, capsys, caplog):
    """The step fits on the validation split through the mixture and writes the file; predict
    with --scatter reports that model's scatter (not the members' mean) and keeps the sum
    rule; the file refuses another member order, and --scatter needs an ensemble."""
    import json

    from pipeline.artifacts.ensemble_scatter import read_ensemble_scatter
    from pipeline.laplace.ensemble import fit_mixture_scatter
    from pipeline.spectra.fits import write_spectra
    from pipeline.spectra.inputs import read_labelled_on_grid
    from pipeline.spectra.synthetic import generate
    from pipeline.steps import ensemble_scatter

    wave = np.load(tiny_model_dir / "wave.npy")
    valid = generate(80, 31, wave=wave)
    write_spectra(tmp_path / "valid.fits", valid)
    write_spectra(tmp_path / "stars.fits", spectra)
    config = validate({"laplace": {"scatter": "constant"}})
    pairs = ["--model", tiny_model_dir, "--posterior", tiny_posterior_file,
             "--model", second_model_dir, "--posterior", second_posterior_file]
    out = tmp_path / "laplace" / "ensemble_scatter.npz"
    argv = ["--config-json", json.dumps(config), *pairs, "--valid", tmp_path / "valid.fits",
            "--out", out]
    assert main(ensemble_scatter.build_parser, ensemble_scatter.run, list(map(str, argv))) == 0

    members, _ = predict.load_members([str(tiny_model_dir), str(second_model_dir)],
                                      [str(tiny_posterior_file), str(second_posterior_file)])
    posts = [p for _, p, _ in members]
    scaler = members[0][2]
    written = read_ensemble_scatter(out, posts, scaler.scale)
    # the same fit from the members' budgets of the validation stars, outside the step
    (read_valid,) = read_labelled_on_grid((tmp_path / "valid.fits",), wave, config)
    budget, *_ = predict.mixture_budget(members, read_valid, config)
    direct = fit_mixture_scatter(budget, read_valid.label_array(), scaler, config["laplace"])
    np.testing.assert_allclose(written.coef, direct.coef, rtol=1e-10)
    np.testing.assert_allclose(written.correlation, direct.correlation, atol=1e-10)

    tables = {}
    for name, extra in (("own", []), ("mix", ["--scatter", out])):
        argv = [*pairs, *extra, "--name", name, "--out", tmp_path / "pred",
                tmp_path / "stars.fits"]
        assert main(predict.build_parser, predict.run, list(map(str, argv))) == 0
        tables[name] = Table.read(tmp_path / "pred" / f"{name}.fits", hdu="CATALOG")
    assert "counted twice" in caplog.text  # the warning without --scatter
    for i, label in enumerate(("TEFF", "LOGG", "FE_H")):
        mix, own = tables["mix"], tables["own"]
        np.testing.assert_allclose(mix[label], own[label], rtol=1e-12)
        np.testing.assert_allclose(mix[f"{label}_ERR_MODEL"], own[f"{label}_ERR_MODEL"],
                                   rtol=1e-6)
        # a constant scatter model: the same scatter for every star, exp(a_k) standardized
        np.testing.assert_allclose(mix[f"{label}_ERR_SCATTER"],
                                   np.exp(written.coef[i, 0]) * scaler.scale[i], rtol=1e-5)
        assert not np.allclose(mix[f"{label}_ERR_SCATTER"], own[f"{label}_ERR_SCATTER"])
        np.testing.assert_allclose(
            mix[f"{label}_ERR"] ** 2, mix[f"{label}_ERR_MODEL"] ** 2
            + mix[f"{label}_ERR_SCATTER"] ** 2 + mix[f"{label}_ERR_NOISE"] ** 2, rtol=1e-5)

    swapped = ["--model", second_model_dir, "--posterior", second_posterior_file,
               "--model", tiny_model_dir, "--posterior", tiny_posterior_file]
    for argv, message in ((swapped, "fitted for members"),
                          (pairs[:4], "only one --model")):
        argv = [*argv, "--scatter", out, "--out", tmp_path / "pred", tmp_path / "stars.fits"]
        assert main(predict.build_parser, predict.run, list(map(str, argv))) == 1
        assert message in capsys.readouterr().err


def test_ensemble_scatter_step_refuses_a_likelihood_scatter_and_one_member(tmp_path, capsys):
    import json

    from pipeline.steps import ensemble_scatter

    for config, models, message in (
            (validate({"laplace": {"scatter": "likelihood"}}), 2, "laplace.scatter"),
            (CONFIG, 1, "at least 2 members")):
        argv = ["--config-json", json.dumps(config), "--valid", tmp_path / "v.fits",
                "--out", tmp_path / "s.npz"]
        for m in range(models):
            argv += ["--model", tmp_path / f"m{m}", "--posterior", tmp_path / f"p{m}.npz"]
        assert main(ensemble_scatter.build_parser, ensemble_scatter.run,
                    list(map(str, argv))) == 1
        assert message in capsys.readouterr().err
