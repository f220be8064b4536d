"""The scatter model against closed forms and simulated heteroscedastic, correlated residuals."""

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.exceptions import ConfigError, DataError
from pipeline.laplace.posterior import Posterior
from pipeline.laplace.scatter import (
    FIELDS,
    OFFSET_HINGE,
    ScatterModel,
    covariates,
    fit_scatter,
    nearest_correlation,
    robust_correlation,
)


def simulate(rng, n, coef, model_scale=0.01, corr=None):
    """Residuals whose log scatter is coef[k] . [1, log model std_k - u0, log noise std_k - u0]
    (u0 = log sqrt(model_scale), the median of both), with label correlation ``corr`` in the
    scatter part; model and noise variances diagonal."""
    model_var = model_scale * np.exp(rng.normal(0, 1.0, (n, 3)))
    noise_var = model_scale * np.exp(rng.normal(0, 1.0, (n, 3)))
    u = covariates(model_var, noise_var) - 0.5 * np.log(model_scale)
    s = np.exp(coef[:, 0] + np.einsum("nkc,kc->nk", u, coef[:, 1:]))
    corr = np.eye(3) if corr is None else np.asarray(corr)
    eps = rng.normal(size=(n, 3)) @ np.linalg.cholesky(corr).T
    resid = s * eps + np.sqrt(model_var + noise_var) * rng.normal(size=(n, 3))
    return resid, model_var, noise_var


def test_constant_scatter_is_the_variance_mle(rng):
    coef = np.zeros((3, 3))
    coef[:, 0] = -1.5
    resid, _, _ = simulate(rng, 500, coef)
    zero = np.zeros_like(resid)
    fit = fit_scatter(resid, zero, zero, kind="constant", cap_quantile=1.0, calibration="fitted")
    # with no other variance the MLE of a constant variance is the mean square residual
    np.testing.assert_allclose(fit.std(zero, zero)[0] ** 2, np.mean(resid**2, axis=0),
                               rtol=1e-7)
    assert np.all(fit.coef[:, 1:] == 0)


def test_linear_scatter_recovers_the_simulated_coefficients(rng):
    coef = np.array([[-1.0, 0.4, 0.0], [-2.0, -0.3, 0.1], [-1.5, 0.0, 0.5]])
    resid, mv, nv = simulate(rng, 40000, coef)
    fit = fit_scatter(resid, mv, nv, kind="linear", ridge=0.0, cap_quantile=1.0,
                      calibration="fitted")
    # the fit's covariates are standardized: slope b on raw u is b * scale on standardized u
    np.testing.assert_allclose(fit.coef[:, 1:], coef[:, 1:] * fit.u_scale, atol=0.05)
    centred = coef[:, 0] + np.sum(coef[:, 1:] * (fit.u_centre - 0.5 * np.log(0.01)), axis=1)
    np.testing.assert_allclose(fit.coef[:, 0], centred, atol=0.05)


def test_fitted_scatter_calibrates_fresh_stars(rng):
    coef = np.array([[-1.0, 1.5, 0.0], [-1.0, 0.0, 1.5], [-1.0, 1.0, 1.0]])
    resid, mv, nv = simulate(rng, 20000, coef)
    fit = fit_scatter(resid, mv, nv)
    resid2, mv2, nv2 = simulate(rng, 20000, coef)
    score = resid2 / np.sqrt(fit.std(mv2, nv2) ** 2 + mv2 + nv2)
    # N = 20000: sd of the sample std is 0.005, of a coverage fraction 0.0033
    np.testing.assert_allclose(score.std(axis=0), 1.0, atol=0.03)
    np.testing.assert_allclose(np.mean(np.abs(score) < 1, axis=0), 0.6827, atol=0.015)
    # stars of the largest fitted scatter (top fifth): right with the linear model, too
    # small with one constant level per label (sd of a std over 4000 stars: 0.011)
    top = fit.std(mv2, nv2) >= np.quantile(fit.std(mv2, nv2), 0.8, axis=0)
    constant = fit_scatter(resid, mv, nv, kind="constant")
    score_c = resid2 / np.sqrt(constant.std(mv2, nv2) ** 2 + mv2 + nv2)
    for k in range(3):
        assert abs(score[top[:, k], k].std() - 1.0) < 0.05
        assert score_c[top[:, k], k].std() > 1.2, "a constant level must miss stars whose " \
            "scatter grows with their model and noise errors"


def test_scatter_is_clipped_and_capped(rng):
    coef = np.array([[-1.0, 0.5, 0.5]] * 3)
    resid, mv, nv = simulate(rng, 2000, coef)
    fit = fit_scatter(resid, mv, nv)
    edge = fit.std(mv.max(axis=0)[None], nv.max(axis=0)[None])
    far = fit.std(mv.max(axis=0)[None] * 1e6, nv.max(axis=0)[None] * 1e6)
    np.testing.assert_array_equal(edge, far)
    np.testing.assert_allclose(fit.cap, np.quantile(np.abs(resid), 0.99, axis=0))
    assert np.all(fit.std(mv, nv) <= fit.cap)
    again = ScatterModel.from_dict(fit.to_dict())
    assert again.covariance(mv, nv).tobytes() == fit.covariance(mv, nv).tobytes()
    with pytest.raises(DataError, match="rerun the laplace step"):
        ScatterModel.from_dict({"coef": fit.coef.tolist()})


def collinear_validation(rng, n=3000):
    """The audit's setting: the model and noise stds of all labels move together (r ~ 0.99)
    with one latent quality t, and the residual scatter follows t gently."""
    t = rng.normal(size=n)
    log_m = -2.0 + 0.5 * t[:, None] + 0.05 * rng.normal(size=(n, 3))
    log_e = -2.5 + 0.5 * t[:, None] + 0.05 * rng.normal(size=(n, 3))
    s = np.exp(-1.0 + 0.2 * t)[:, None]
    resid = np.sqrt(s**2 + np.exp(2 * log_m) + np.exp(2 * log_e)) * rng.normal(size=(n, 3))
    return resid, np.exp(2 * log_m), np.exp(2 * log_e)


def test_collinear_covariates_give_bounded_scatter_inside_the_validation_range(rng):
    resid, mv, nv = collinear_validation(rng)
    fit = fit_scatter(resid, mv, nv)
    # the ridge keeps the slopes of the two collinear covariates small and of one sign
    assert np.all(np.abs(fit.coef[:, 1:]) < 0.5), fit.coef
    # stars whose covariates each lie inside the validation range, in any combination:
    # every corner of the per-coordinate box and random points inside it
    lo_m, hi_m, lo_e, hi_e = mv.min(0), mv.max(0), nv.min(0), nv.max(0)
    corners = [(a, b) for a in (lo_m, hi_m) for b in (lo_e, hi_e)]
    box_m = np.vstack([c[0] for c in corners] + [np.exp(rng.uniform(np.log(lo_m),
                                                                     np.log(hi_m), (500, 3)))])
    box_e = np.vstack([c[1] for c in corners] + [np.exp(rng.uniform(np.log(lo_e),
                                                                     np.log(hi_e), (500, 3)))])
    s = fit.std(box_m, box_e)
    assert np.all(s <= fit.cap)
    assert np.all(fit.cap <= np.abs(resid).max(axis=0))
    # and no star gets more than a few times the largest scatter of a validation star
    assert np.all(s <= 3.0 * fit.std(mv, nv).max(axis=0))


def test_correlated_residuals_give_the_correlation_and_whiten(rng):
    corr = np.array([[1.0, 0.5, -0.3], [0.5, 1.0, 0.2], [-0.3, 0.2, 1.0]])
    coef = np.array([[-1.0, 0.3, 0.0], [-1.2, 0.0, 0.3], [-0.8, 0.2, 0.2]])
    resid, mv, nv = simulate(rng, 20000, coef, corr=corr)
    fit = fit_scatter(resid, mv, nv)
    # sd of a correlation estimate at N = 20000 is ~ 0.006
    np.testing.assert_allclose(fit.correlation, corr, atol=0.03)
    resid2, mv2, nv2 = simulate(rng, 20000, coef, corr=corr)
    total = fit.covariance(mv2, nv2) + (mv2 + nv2)[:, :, None] * np.eye(3)
    white = np.linalg.solve(np.linalg.cholesky(total), resid2[:, :, None])[:, :, 0]
    cov = np.cov(white.T)
    off = cov[~np.eye(3, dtype=bool)]
    assert np.all(np.abs(off) < 0.1), cov
    np.testing.assert_allclose(np.diag(cov), 1.0, atol=0.05)


def test_robust_correlation_of_gaussian_pairs_and_outliers(rng):
    corr = np.array([[1.0, 0.5], [0.5, 1.0]])
    w = rng.normal(size=(20000, 2)) @ np.linalg.cholesky(corr).T
    np.testing.assert_allclose(robust_correlation(w), corr, atol=0.02)
    w[:100] = [50.0, -50.0]  # 0.5 % gross outliers barely move it (Pearson drops to ~ -0.2)
    np.testing.assert_allclose(robust_correlation(w)[0, 1], 0.5, atol=0.03)
    assert np.corrcoef(w.T)[0, 1] < 0.0


def test_nearest_correlation_is_a_valid_correlation_matrix():
    bad = np.array([[1.0, 0.9, 0.9], [0.9, 1.0, -0.9], [0.9, -0.9, 1.0]])  # not PSD
    r = nearest_correlation(bad)
    np.testing.assert_allclose(np.diag(r), 1.0)
    assert np.linalg.eigvalsh(r).min() > -1e-12
    good = np.array([[1.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 1.0]])
    np.testing.assert_allclose(nearest_correlation(good), good, atol=1e-12)


def test_likelihood_scatter_does_not_count_flux_noise_twice():
    """With evidence hyperparameters sigma_k is fitted on training residuals, which contain the
    flux noise: scatter + noise must be max(sigma^2, E), not sigma^2 + E."""
    sigma = np.array([0.2, 0.3, 0.1])
    noise_var = np.array([[0.01, 0.01, 0.04], [0.0, 0.2, 0.0]])
    post = SimpleNamespace(scatter_model=None, noise_std=sigma,
                           info={"hyperparameters": "evidence"})
    cov = Posterior.scatter_covariance(post, np.zeros_like(noise_var), noise_var)
    aleatoric = np.diagonal(cov, axis1=1, axis2=2) + noise_var
    np.testing.assert_allclose(aleatoric, np.maximum(sigma**2, noise_var))
    assert np.all(cov[:, ~np.eye(3, dtype=bool)] == 0)
    # fitted on validation stars with the flux noise as a separate term: sigma^2 is the scatter
    post.info["hyperparameters"] = "validation"
    cov = Posterior.scatter_covariance(post, np.zeros_like(noise_var), noise_var)
    np.testing.assert_allclose(np.diagonal(cov, axis1=1, axis2=2),
                               np.broadcast_to(sigma**2, noise_var.shape))


def test_unknown_kind_names_the_config_key(rng):
    resid, mv, nv = simulate(rng, 50, np.zeros((3, 3)))
    with pytest.raises(ConfigError, match=r"laplace\.scatter"):
        fit_scatter(resid, mv, nv, kind="quadratic")


# ------------------------------------------------------------- predicted labels as covariates
def simulate_label_tail(rng, n, slope=-0.8):
    """Residuals whose scatter grows towards low predicted [Fe/H] (the third label),
    s = 0.3 exp(slope zhat_3): about 4 times the median in the lowest [Fe/H] tenth (mean of
    exp(0.8 |x|) over x < -1.28 of a standard normal); model and noise variances that do not
    know it."""
    labels = rng.normal(size=(n, 3))
    model_var = 0.01 * np.exp(rng.normal(0, 1.0, (n, 3)))
    noise_var = 0.01 * np.exp(rng.normal(0, 1.0, (n, 3)))
    s = 0.3 * np.exp(slope * labels[:, 2])[:, None]
    resid = np.sqrt(s**2 + model_var + noise_var) * rng.normal(size=(n, 3))
    return resid, model_var, noise_var, labels


def test_label_covariates_calibrate_a_tail_that_the_errors_do_not_know(rng):
    resid, mv, nv, lab = simulate_label_tail(rng, 5000)
    resid2, mv2, nv2, lab2 = simulate_label_tail(rng, 20000)
    # the maximum-likelihood widths: the balanced calibration would hide the misfit in the core
    old = fit_scatter(resid, mv, nv, calibration="fitted")
    new = fit_scatter(resid, mv, nv, labels=lab, calibration="fitted")
    assert not old.uses_labels and new.uses_labels
    z_old = resid2 / np.sqrt(old.std(mv2, nv2) ** 2 + mv2 + nv2)
    z_new = resid2 / np.sqrt(new.std(mv2, nv2, lab2) ** 2 + mv2 + nv2)
    # N = 20000 fresh stars: sd of a coverage fraction 0.0033, of the z std 0.005
    cover_old = np.mean(np.abs(z_old) < 1, axis=0)
    cover_new = np.mean(np.abs(z_new) < 1, axis=0)
    assert np.all(cover_old > 0.72), cover_old  # right on average, too wide in the core
    assert np.all(np.abs(cover_new - 0.6827) < 0.03), cover_new
    assert np.all(np.abs(z_new.std(axis=0) - 1.0) < 0.1), z_new.std(axis=0)
    # and in the tail itself (the lowest [Fe/H] tenth, ~2000 stars: sd of a std ~0.016)
    tail = lab2[:, 2] < np.quantile(lab2[:, 2], 0.1)
    assert np.all(np.abs(z_new[tail].std(axis=0) - 1.0) < 0.1), z_new[tail].std(axis=0)
    assert np.all(z_old[tail].std(axis=0) > 1.3), z_old[tail].std(axis=0)
    # the fitted [Fe/H] slope on the standardized covariate: slope * validation std of zhat_3
    np.testing.assert_allclose(new.coef[:, 5], -0.8 * new.u_scale[:, 4], rtol=0.1)


def test_label_covariates_never_exceed_the_cap_at_the_corners_of_the_clip_box(rng):
    resid, mv, nv, lab = simulate_label_tail(rng, 3000, slope=-1.5)
    fit = fit_scatter(resid, mv, nv, labels=lab)
    # every corner of the 5-covariate box: per row, each of model var, noise var (all labels
    # at once) and the 3 predicted labels at its validation min (0) or max (1)
    corners = np.array(np.meshgrid(*[[0, 1]] * 5, indexing="ij")).reshape(5, -1).T  # (32, 5)
    m_c = np.where(corners[:, :1], mv.max(0), mv.min(0))
    e_c = np.where(corners[:, 1:2], nv.max(0), nv.min(0))
    l_c = np.where(corners[:, 2:], lab.max(0), lab.min(0))
    s = fit.std(m_c, e_c, l_c)
    assert np.all(s <= fit.cap) and np.any(s == fit.cap), "the steep tail must reach the cap"
    # far outside the box the covariates are clipped to its corners
    far = fit.std(m_c * np.where(corners[:, :1], 1e6, 1e-6), e_c * np.where(corners[:, 1:2],
                  1e6, 1e-6), l_c + np.where(corners[:, 2:], 100.0, -100.0))
    np.testing.assert_array_equal(far, s)
    np.testing.assert_allclose(fit.cap, np.quantile(np.abs(resid), 0.99, axis=0))


def test_the_stored_arrays_say_whether_labels_are_covariates(rng):
    resid, mv, nv, lab = simulate_label_tail(rng, 500)
    old = ScatterModel.from_dict(fit_scatter(resid, mv, nv).to_dict())
    new = ScatterModel.from_dict(fit_scatter(resid, mv, nv, labels=lab).to_dict())
    assert old.coef.shape == (3, 3) and new.coef.shape == (3, 6)
    # a two-covariate model (a posterior fitted before) ignores the labels it is given
    assert old.std(mv, nv, lab).tobytes() == old.std(mv, nv).tobytes()
    with pytest.raises(DataError, match="predicted labels"):
        new.std(mv, nv)
    with pytest.raises(DataError, match=r"expected \(500, 3\)"):
        new.std(mv, nv, lab[:, :2])


def refit_results(root, mean=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0)) -> None:
    """A results folder as benchmarks.scatter_refit reads it: model/scaler.json, predictions/."""
    from pipeline.nn.scaler import LabelScaler

    (root / "model").mkdir()
    (root / "predictions").mkdir()
    LabelScaler(mean=np.asarray(mean), scale=np.asarray(scale)).save(
        root / "model" / "scaler.json")


def write_refit_catalog(path, rng, resid, mv, nv, labels, mean=(0.0, 0.0, 0.0),
                        scale=(1.0, 1.0, 1.0), offset=None) -> None:
    """A catalog of standardized ``labels``, residuals and model / noise variances in physical
    units (``mean``, ``scale``), SNR uniform in 30-300, and emulator labels at ``offset``."""
    from astropy.table import Table

    table = Table({"SNR": rng.uniform(30, 300, len(labels))})
    for k, name in enumerate(("TEFF", "LOGG", "FE_H")):
        table[name] = mean[k] + scale[k] * labels[:, k]
        table[name + "_TRUE"] = mean[k] + scale[k] * (labels[:, k] - resid[:, k])
        table[name + "_ERR_MODEL"] = scale[k] * np.sqrt(mv[:, k])
        table[name + "_ERR_NOISE"] = scale[k] * np.sqrt(nv[:, k])
        if offset is not None:
            table[name + "_EMULATOR"] = mean[k] + scale[k] * (labels[:, k] - offset[:, k])
    table.write(path)


def test_offline_refit_command_scores_a_runs_catalogs(tmp_path, rng, capsys):
    """benchmarks.scatter_refit on catalogs of a label-dependent tail: it reads the physical
    columns back to standardized units (the scaler), and the label covariates bring the
    coverage of the test stars to 68.3% where the two-covariate fit over-covers."""
    from benchmarks.scatter_refit import main

    mean, scale = np.array([4800.0, 3.0, -0.3]), np.array([800.0, 1.3, 0.6])
    refit_results(tmp_path, mean, scale)
    for path, n in ((tmp_path / "predictions" / "valid.fits", 4000),
                    (tmp_path / "predictions" / "test.fits", 4000), (tmp_path / "new.fits", 3000)):
        write_refit_catalog(path, rng, *simulate_label_tail(rng, n), mean, scale)
    assert main(["--results", str(tmp_path), "--min-stars", "500"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("test, all")]
    old, *new = (np.array(ln.split("|z|<1 [")[1].split("]")[0].split(), float) for ln in lines)
    assert len(new) == 2, lines  # labels, and squared labels too
    assert "offset refit is skipped" in out  # the catalogs have no emulator labels
    assert np.all(old > 0.72) and np.all(np.abs(np.array(new) - 0.6827) < 0.03), (old, new)
    assert all("N= 4000" in ln and "bins outside" in ln for ln in lines)
    # --catalog: the same refits scored on other stars
    assert main(["--results", str(tmp_path), "--catalog", str(tmp_path / "new.fits")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("test, all")]
    assert len(lines) == 3 and all("N= 3000" in ln for ln in lines)


def test_fit_sizes_refit_on_disjoint_draws_of_the_catalog(tmp_path, rng, capsys):
    """benchmarks.scatter_refit --fit-sizes: the refit fitted on the validation split, then on
    every disjoint draw of each size from one half of the --catalog stars, each scored on the
    other half; on a well-specified label tail draws of 1000 stars are calibrated; a size the
    catalog cannot hold, or the option without --catalog, is refused."""
    from benchmarks.scatter_refit import main

    refit_results(tmp_path)
    for path, n in ((tmp_path / "predictions" / "valid.fits", 300), (tmp_path / "new.fits", 4000)):
        write_refit_catalog(path, rng, *simulate_label_tail(rng, n))
    args = ["--results", str(tmp_path), "--catalog", str(tmp_path / "new.fits")]
    assert main([*args, "--fit-sizes", "500", "1000"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if "bins outside" in ln]
    names = [ln.split("N=")[0].strip() for ln in rows]
    assert names == ["validation split (300)", *(f"500 stars, draw {i}" for i in range(1, 5)),
                     "1000 stars, draw 1", "1000 stars, draw 2"], names
    assert all("N= 2000" in ln and "label-tercile bins outside" in ln for ln in rows)
    for ln in rows[-2:]:
        coverage = np.array(ln.split("|z|<1 [")[1].split("]")[0].split(), float)
        assert np.all(np.abs(coverage - 0.6827) < 0.035), ln
    with pytest.raises(SystemExit, match="2001 stars"):
        main([*args, "--fit-sizes", "2001"])
    with pytest.raises(SystemExit):
        main(["--results", str(tmp_path), "--fit-sizes", "500"])
    assert "--fit-sizes draws its calibration sets from --catalog" in capsys.readouterr().err


def test_squared_labels_follow_a_scatter_that_grows_towards_both_edges(rng):
    """A network misses more at both edges of its training box: labels uniform in the box
    (unit variance), s = 0.2 exp(0.5 zhat_3^2), 4.5 times larger at the edges than in the
    centre, symmetric in the predicted [Fe/H], which no log-linear term can follow. Degree 1
    is too wide in the core and too narrow at the edges; degree 2 is calibrated in both."""
    def simulate(n):
        labels = rng.uniform(-np.sqrt(3.0), np.sqrt(3.0), size=(n, 3))
        model_var = 0.01 * np.exp(rng.normal(0, 1.0, (n, 3)))
        noise_var = 0.01 * np.exp(rng.normal(0, 1.0, (n, 3)))
        s = 0.2 * np.exp(0.5 * labels[:, 2] ** 2)[:, None]
        return np.sqrt(s**2 + model_var + noise_var) * rng.normal(size=(n, 3)), model_var, \
            noise_var, labels

    resid, mv, nv, lab = simulate(5000)
    resid2, mv2, nv2, lab2 = simulate(20000)
    edge = np.abs(lab2[:, 2]) > 1.5  # ~2700 stars: sd of a std ~0.014
    for degree in (1, 2):
        fit = fit_scatter(resid, mv, nv, labels=lab, label_degree=degree, calibration="fitted")
        assert fit.label_degree == degree and fit.coef.shape == (3, 3 + 3 * degree)
        again = ScatterModel.from_dict(fit.to_dict())
        assert again.std(mv2, nv2, lab2).tobytes() == fit.std(mv2, nv2, lab2).tobytes()
        z = resid2 / np.sqrt(fit.std(mv2, nv2, lab2) ** 2 + mv2 + nv2)
        cover = np.mean(np.abs(z) < 1, axis=0)
        if degree == 1:
            assert np.all(cover > 0.72), cover
            assert np.all(z[edge].std(axis=0) > 1.3), z[edge].std(axis=0)
        else:
            assert np.all(np.abs(cover - 0.6827) < 0.03), cover
            assert np.all(np.abs(z.std(axis=0) - 1.0) < 0.1), z.std(axis=0)
            assert np.all(np.abs(z[edge].std(axis=0) - 1.0) < 0.1), z[edge].std(axis=0)


def test_label_degree_is_checked(rng):
    resid, mv, nv, lab = simulate_label_tail(rng, 200)
    with pytest.raises(ConfigError, match="scatter_label_degree"):
        fit_scatter(resid, mv, nv, labels=lab, label_degree=3)


def test_calibration_check_whitens_with_the_reported_correlations(tmp_path, rng, capsys):
    """benchmarks.calibration_check on a catalog whose residuals are drawn from the reported
    covariances (correlation 0.6 between Teff and log g): the whitened covariance is the
    identity; with the correlation columns set to 0 its Teff-log g term is ~0.6."""
    import json

    from astropy.table import Table

    from benchmarks.calibration_check import main
    from pipeline.nn.scaler import LabelScaler

    n = 4000
    err = np.array([50.0, 0.1, 0.05]) * np.exp(rng.normal(0, 0.3, (n, 3)))
    corr = np.array([[1.0, 0.6, 0.0], [0.6, 1.0, 0.2], [0.0, 0.2, 1.0]])
    resid = (np.linalg.cholesky(corr) @ rng.normal(size=(n, 3, 1)))[..., 0] * err
    truth = np.column_stack([rng.uniform(3500, 7000, n), rng.uniform(0, 5, n),
                             rng.uniform(-2.5, 0.5, n)])
    (tmp_path / "predictions").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "laplace").mkdir()
    LabelScaler(mean=np.zeros(3), scale=np.ones(3)).save(tmp_path / "model" / "scaler.json")
    np.savez(tmp_path / "laplace" / "posterior.npz",
             info=json.dumps({"scatter": {"cap": [80.0, 0.2, 0.1]}}))
    for with_corr in (True, False):
        table = Table()
        for k, name in enumerate(("TEFF", "LOGG", "FE_H")):
            table[name] = truth[:, k] + resid[:, k]
            table[name + "_TRUE"] = truth[:, k]
            table[name + "_ERR"] = err[:, k]
            table[name + "_ERR_SCATTER"] = 0.5 * err[:, k]
        for (i, j), name in (((0, 1), "TEFF_LOGG_CORR"), ((0, 2), "TEFF_FE_H_CORR"),
                             ((1, 2), "LOGG_FE_H_CORR")):
            table[name] = np.full(n, corr[i, j] if with_corr else 0.0)
        table.write(tmp_path / "predictions" / "test.fits", overwrite=True)
        assert main(["--results", str(tmp_path)]) == 0
        out = capsys.readouterr().out.splitlines()
        rows = out[out.index("covariance of the whitened residuals (identity if calibrated):")
                   + 1:][:3]
        cov = np.array([[float(v) for v in row.strip(" []").split()] for row in rows])
        # N = 4000: sd of a covariance entry ~0.016-0.02
        if with_corr:
            np.testing.assert_allclose(cov, np.eye(3), atol=0.08)
        else:
            assert abs(cov[0, 1] - 0.6) < 0.08, cov
        assert any(line.startswith("largest scatter") and "cap [80." in line for line in out)
        # errors drawn as reported: RMSE / RMS error near 1 in every decile (400 stars each)
        deciles = [np.array(line.split("[")[1].strip("]").split(), float)
                   for line in out if "by decile of" in line]
        assert len(deciles) == 3 and np.all(np.abs(np.array(deciles) - 1) < 0.15), deciles


def test_decile_ratio_shows_a_variance_floor(rng):
    """Errors with a floor under them (sqrt(s^2 + f^2) reported, s true) come out too wide in
    the deciles of the smallest errors, which the decile ratio shows; errors as drawn give 1."""
    from benchmarks.calibration_check import decile_ratio

    s = np.exp(rng.normal(0, 0.5, 20000))
    resid = s * rng.normal(size=s.size)
    np.testing.assert_allclose(decile_ratio(resid, resid / s), 1.0, atol=0.06)
    floored = decile_ratio(resid, resid / np.sqrt(s**2 + 2.0))
    assert floored[0] < 0.5 and floored[-1] > floored[0] + 0.3, floored


# ------------------------------------------------------------- the balanced width of the core
def simulate_scale_mixture(rng, n, spread=0.35):
    """Residuals of a scatter the covariates do not resolve: s = 0.3 exp(spread x), x a
    standard normal per star and label, so excess kurtosis 3 (exp(4 spread^2) - 1), 1.9 for
    spread 0.35 (before the small model and noise terms), like a network's residuals."""
    model_var = 0.001 * np.exp(rng.normal(0, 1.0, (n, 3)))
    noise_var = 0.001 * np.exp(rng.normal(0, 1.0, (n, 3)))
    s = 0.3 * np.exp(spread * rng.normal(size=(n, 3)))
    return np.sqrt(s**2 + model_var + noise_var) * rng.normal(size=(n, 3)), model_var, noise_var


def test_balanced_factor_is_the_geometric_mean_of_the_std_and_coverage_factors(rng):
    """With no other variance z = r / (c s): c_std is std(r / s) and c_cov the 68.27% quantile
    of |r / s|, closed forms the root finder must reproduce."""
    from pipeline.laplace.scatter import balanced_factor
    r, s = rng.standard_t(4, 3000), np.exp(rng.normal(0, 0.3, 3000))
    c_std, c_cov = np.std(r / s), np.quantile(np.abs(r / s), 0.6826894921370859)
    np.testing.assert_allclose(balanced_factor(r, s, np.zeros(3000)), np.sqrt(c_std * c_cov),
                               rtol=1e-3)  # the quantile lies between two order statistics
    assert c_cov < 0.95 * c_std  # heavy tails: the two factors differ


def test_balanced_calibration_splits_std_and_coverage_of_heavy_tailed_residuals(rng):
    resid, mv, nv = simulate_scale_mixture(rng, 5000)
    resid2, mv2, nv2 = simulate_scale_mixture(rng, 20000)
    scores = {}
    for calibration in ("fitted", "balanced"):
        fit = fit_scatter(resid, mv, nv, calibration=calibration)
        z = resid2 / np.sqrt(fit.std(mv2, nv2) ** 2 + mv2 + nv2)
        scores[calibration] = z.std(axis=0), np.mean(np.abs(z) < 1, axis=0)
    # N = 20000 fresh stars: sd of a coverage fraction 0.0033, of the z std about 0.01
    std_fit, cover_fit = scores["fitted"]
    std_bal, cover_bal = scores["balanced"]
    # the maximum-likelihood width: std 1, but 73% of the stars within 1 sigma
    assert np.all(np.abs(std_fit - 1) < 0.03) and np.all(cover_fit > 0.72), scores
    # balanced: std still within 0.1 of 1, the coverage 1.5+ points nearer 68.3% (70.4-71.7%)
    assert np.all(std_bal > std_fit) and np.all(std_bal < 1.1), scores
    assert np.all(cover_bal > 0.6827) and np.all(cover_bal < cover_fit - 0.015), scores


def test_balanced_calibration_leaves_gaussian_residuals_alone(rng):
    resid, mv, nv = simulate(rng, 20000, np.array([[-1.0, 0.5, 0.0]] * 3))
    fitted = fit_scatter(resid, mv, nv, calibration="fitted")
    balanced = fit_scatter(resid, mv, nv)
    # both factors are 1 up to sampling noise (sd of the coverage factor ~0.6% at N = 20000)
    np.testing.assert_allclose(balanced.coef[:, 0], fitted.coef[:, 0], atol=0.02)
    np.testing.assert_array_equal(balanced.coef[:, 1:], fitted.coef[:, 1:])
    with pytest.raises(ConfigError, match="scatter_calibration"):
        fit_scatter(resid, mv, nv, calibration="coverage")


def test_balanced_factor_stops_at_its_bound_when_the_scatter_cannot_reach_the_targets(rng, caplog):
    """Residuals smaller than the model and noise errors alone: no scatter width gives std z = 1
    or 68.3% coverage, and the factor is the bracket's lower end (scatter ~ 0), with a warning."""
    from pipeline.laplace.scatter import balanced_factor
    r = 0.1 * rng.normal(size=2000)
    with caplog.at_level("WARNING"):
        assert balanced_factor(r, np.ones(2000), np.ones(2000)) == pytest.approx(1e-3)
    assert "no factor" in caplog.text


# ------------------------------------------------------------------ the emulator offset
def simulate_offsets(rng, n):
    """A scale mixture (``simulate_scale_mixture``: scatter s per star that no error covariate
    resolves) and a second estimate of every label whose own error is independent and about
    0.6 s (itself scale-mixed): the offsets d = network - emulator carry s."""
    model_var = 0.001 * np.exp(rng.normal(0, 1.0, (n, 3)))
    noise_var = 0.001 * np.exp(rng.normal(0, 1.0, (n, 3)))
    s = 0.3 * np.exp(0.35 * rng.normal(size=(n, 3)))
    resid = np.sqrt(s**2 + model_var + noise_var) * rng.normal(size=(n, 3))
    emulator_error = 0.6 * s * np.exp(0.5 * rng.normal(size=(n, 3))) * rng.normal(size=(n, 3))
    return resid, model_var, noise_var, resid - emulator_error


def test_the_emulator_offset_resolves_the_heavy_tail(rng):
    """Without the offset no covariate sees s: fresh stars' z have excess kurtosis ~1.6 and
    the balanced width leaves 70% within 1 sigma. With it the tail is mostly resolved: the
    kurtosis falls below half, the std and the coverage near their Gaussian values, the NLL
    drops, and the offset component grows with the offset."""
    from scipy import stats
    resid, mv, nv, offset = simulate_offsets(rng, 5000)
    resid2, mv2, nv2, offset2 = simulate_offsets(rng, 20000)
    scores = {}
    for name, off, off2 in (("plain", None, None), ("offset", offset, offset2)):
        fit = fit_scatter(resid, mv, nv, offset=off)
        var = fit.std(mv2, nv2, offset=off2) ** 2 + mv2 + nv2
        z = resid2 / np.sqrt(var)
        scores[name] = (stats.kurtosis(z), z.std(axis=0), np.mean(np.abs(z) < 1, axis=0),
                        np.mean(0.5 * np.log(var) + 0.5 * z**2, axis=0), fit)
    kurt, std, cover, nll, fit = scores["offset"]
    assert fit.uses_offset and np.all(fit.offset_weight > 0.05), fit.offset_weight
    assert np.all(scores["plain"][0] > 1.2) and np.all(kurt < 0.5 * scores["plain"][0]), scores
    assert np.all(np.abs(std - 1) < 0.05) and np.all(np.abs(cover - 0.6827) < 0.035), scores
    assert np.all(nll < scores["plain"][3] - 0.05), scores


def simulate_shared_tail(rng, n):
    """``simulate_offsets`` plus an error both estimates share, 0.1 exp(-zhat_3), 0.27 at
    zhat_3 = -1 and 0.74 at -2 (weak lines: the same degeneracy for both), which the offsets
    cannot see; the predicted labels are standard normal."""
    resid, mv, nv, offset = simulate_offsets(rng, n)
    labels = rng.normal(size=(n, 3))
    shared = 0.1 * np.exp(-labels[:, 2:]) * rng.normal(size=(n, 3))
    return resid + shared, mv, nv, offset, labels


def test_hinge_scan_cross_validates_the_offset_hinge_on_validation_stars(tmp_path, rng, capsys):
    """benchmarks.scatter_refit --hinge-scan: each hinge factor and the fit without the offset
    are scored out of fold on the validation catalog alone (the test catalog is not read); on
    offsets that carry each star's scatter the lowest hinge (0: every offset counts) beats the
    fit without the offset in NLL on every label."""
    from benchmarks.scatter_refit import HINGE_FACTORS, main

    refit_results(tmp_path)
    resid, mv, nv, offset = simulate_offsets(rng, 3000)
    labels = rng.normal(size=(3000, 3))
    write_refit_catalog(tmp_path / "predictions" / "valid.fits", rng, resid, mv, nv, labels,
                        offset=offset)
    assert main(["--results", str(tmp_path), "--hinge-scan"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if "bins outside" in ln]
    assert len(rows) == 1 + len(HINGE_FACTORS), rows
    nll = [np.array(ln.split("NLL [")[1].split("]")[0].split(), float) for ln in rows]
    assert HINGE_FACTORS[0] == 0 and np.all(nll[1] < nll[0] - 0.05), rows


def test_an_error_both_estimates_share_keeps_its_scatter(rng):
    """Where the network and the emulator err together their offset is small although the
    residual is not: the offset only adds a component, so the label covariates keep those
    stars' scatter (z std near 1 in the tail region of fresh stars) while the offset still
    sharpens the rest."""
    resid, mv, nv, offset, labels = simulate_shared_tail(rng, 6000)
    resid2, mv2, nv2, offset2, labels2 = simulate_shared_tail(rng, 20000)
    fit = fit_scatter(resid, mv, nv, labels=labels, label_degree=2, offset=offset)
    z = resid2 / np.sqrt(fit.std(mv2, nv2, labels2, offset2) ** 2 + mv2 + nv2)
    tail = labels2[:, 2] < -1
    assert np.all(np.abs(z[tail].std(axis=0) - 1) < 0.12), z[tail].std(axis=0)
    assert np.all(np.abs(z[~tail].std(axis=0) - 1) < 0.08), z[~tail].std(axis=0)
    assert np.all(np.abs(np.mean(np.abs(z[~tail]) < 1, axis=0) - 0.6827) < 0.04)


def test_offset_hinge_missing_offsets_and_the_cap(rng):
    """Below the hinge (twice the typical offset of the star: the validation median |offset|
    and its own flux-noise std) the offset adds nothing: the scatter is the first component's
    alone, so no variance floor lands on the most precise stars and a low-SNR star's noise is
    not counted twice. A star without an emulator fit (NaN offset) gets the cap; the stored
    arrays say the model has the component, a model without it still loads, and one with the
    older log-linear component is refused."""
    resid, mv, nv, offset = simulate_offsets(rng, 3000)
    fit = fit_scatter(resid, mv, nv, offset=offset)
    np.testing.assert_allclose(fit.offset_typical, np.median(np.abs(offset), axis=0))
    np.testing.assert_allclose(fit.offset_hinge, OFFSET_HINGE)
    probe = np.tile(np.median(mv, axis=0), (5, 1)), np.tile(np.median(nv, axis=0), (5, 1))
    probe[1][4] *= 100  # a low-SNR star: its noise moves the hinge out
    below = OFFSET_HINGE * np.sqrt(fit.offset_typical**2 + probe[1][0]) * 0.99
    noisy = 1.5 * below
    s = fit.std(*probe, offset=np.array([[np.nan] * 3, [0.0] * 3, below, 1.5 * below, noisy]))
    first = ScatterModel(*(getattr(fit, k) for k in FIELDS)).std(*probe)
    np.testing.assert_allclose(s[[1, 2, 4]], first[[1, 2, 4]])
    assert np.all(s[3] > first[3])
    np.testing.assert_allclose(s[0], fit.cap)
    with pytest.raises(DataError, match="scatter_emulator"):
        fit.std(*probe)
    again = ScatterModel.from_dict(fit.to_dict())
    np.testing.assert_array_equal(again.std(*probe, offset=offset[:5]),
                                  fit.std(*probe, offset=offset[:5]))
    old = fit_scatter(resid, mv, nv).to_dict()
    for key in ("offset_typical", "offset_hinge", "offset_weight"):
        del old[key]  # a posterior written before the offset existed
    assert not ScatterModel.from_dict(old).uses_offset
    with pytest.raises(DataError, match="older form"):
        ScatterModel.from_dict({**fit.to_dict(), "offset_coef": [[0.0, 1.0]] * 3})


def test_the_configured_offset_needs_the_emulator(rng):
    from pipeline.laplace.scatter import fit_configured
    resid, mv, nv, offset = simulate_offsets(rng, 500)
    cfg = {"scatter": "linear", "scatter_ridge": 0.02, "scatter_cap_quantile": 0.99,
           "scatter_labels": False, "scatter_emulator": True}
    with pytest.raises(ConfigError, match="scatter_emulator"):
        fit_configured(resid, mv, nv, resid, cfg)
    assert fit_configured(resid, mv, nv, resid, cfg, offset).uses_offset
    assert not fit_configured(resid, mv, nv, resid, {**cfg, "scatter_emulator": False},
                              offset).uses_offset
    with pytest.raises(DataError, match="emulator offset"):
        fit_scatter(resid, mv, nv, offset=np.full_like(offset, np.nan))
