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
