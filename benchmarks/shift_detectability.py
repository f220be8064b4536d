"""How detectable is a shift at all? An oracle bound from the generator itself.

The shift suite asks a label-free flag to catch spectra that differ from the training set. For
a shift of the physical model, ``m(theta) -> m'(theta)`` (line opacity x1.25 is
``m' = m**1.25``), the generator answers how far any method could get. It fits the noiseless
shifted spectrum by weighted least squares over the labels, with the star's own errors::

    theta* = argmin_t  sum_p (m'_p(theta) - m_p(t))^2 / sigma_p^2,     lambda = min chi^2

(Gauss-Newton on the exact label Jacobian, started at the true labels). Two consequences, in
the Gaussian (linearized) approximation:

* **Detection.** ``lambda`` is the non-centrality of the most powerful test of "shifted" against
  "not shifted" for a test that knows the shift and profiles the labels: the residual projected
  on the shift direction, orthogonalized against the label gradients, is ``N(sqrt(lambda), 1)``.
  At false-alarm rate ``alpha`` its power is ``Phi(sqrt(lambda) - z_(1-alpha))``; no label-free
  flag with that false-alarm rate can fire on more of the stars on average.
* **Bias.** A shifted star at ``theta`` and an unshifted star at ``theta*`` give spectra that
  differ by ``sqrt(lambda)`` noise units. Where that is small, any estimator calibrated on
  unshifted stars answers about ``theta*`` for both, so on the shifted star it is off by
  ``theta* - theta``; divided by the Cramer-Rao bound at ``theta*`` this is the z such an estimator
  shows at best.

A shift with a small mean power and a large ``|theta* - theta| / sigma_CR`` could not pass the
suite (at least 90% flagged, or unflagged stars calibrated) by any method: the limit would be in
the data. A mean power near 1 says the opposite: a pipeline that flags fewer of those stars is
limited by its own statistics (the emulator's precision sets their in-distribution tail).

    PYTHONPATH=. python -m benchmarks.shift_detectability [--n 300] \
        [--configfile config/config.yaml]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import norm

from pipeline.spectra import shifts, synthetic

ALPHA = 0.02
"""False-alarm rate of the oracle test: the suite's allowance for flagged in-distribution stars."""

NOISELESS = {name: shift.noiseless for name, shift in shifts.SHIFTS.items() if shift.noiseless}
"""The noiseless shifted model ``m'(model, labels, wave)`` of the suite's shifts of the spectrum
itself (line strengths, continuum, radial velocity, line-spread function)."""


def best_fit_labels(target, flux_err, labels, wave, iterations: int = 12):
    """Labels of the unshifted generator closest to ``target`` (N, P) in chi^2 with errors
    ``flux_err`` (0: pixel ignored), by damped Gauss-Newton from ``labels``.

    Returns ``(theta*, lambda, cramer_rao)``: (N, 3) best-fit labels, (N,) minimum chi^2 and
    (N, 3, 3) the inverse Fisher matrix at ``theta*``.
    """
    good = flux_err > 0
    weight = np.where(good, 1.0 / np.where(good, flux_err, 1.0) ** 2, 0.0)
    theta = np.array(labels, np.float64)

    def chi2_at(t):
        resid = target - synthetic.synthesize(t, wave, np.float64)
        return np.einsum("np,np,np->n", resid, weight, resid), resid

    chi2, resid = chi2_at(theta)
    for _ in range(iterations):
        jac = synthetic.label_jacobian(theta, wave)
        fisher = np.einsum("npi,np,npj->nij", jac, weight, jac)
        step = np.linalg.solve(fisher, np.einsum("npi,np,np->ni", jac, weight, resid)[..., None])
        step = step[..., 0]
        for _halving in range(8):  # accept per star only where chi^2 does not grow
            trial = theta + step
            trial[:, 0] = np.maximum(trial[:, 0], 2000.0)
            new_chi2, new_resid = chi2_at(trial)
            better = new_chi2 <= chi2
            theta[better], chi2[better], resid[better] = (trial[better], new_chi2[better],
                                                          new_resid[better])
            if better.all():
                break
            step[better] = 0.0
            step *= 0.5
    return theta, chi2, synthetic.cramer_rao_bound(theta, flux_err, wave)


def oracle(name: str, n: int, seed: int, cfg=None, wave=None, chunk: int = 100) -> dict:
    """Oracle power and best-estimator bias for ``n`` stars of shift ``name`` (the suite's
    stars: same seed, same draws)."""
    wave = synthetic._check_wave(wave)
    spectra = shifts.shifted_spectra(name, n, seed, cfg, wave)
    labels = spectra.label_array().astype(np.float64)
    lam, bias, crb = [], [], []
    for start in range(0, n, chunk):
        lab = labels[start:start + chunk]
        model = synthetic.synthesize(lab, wave, np.float64)
        target = NOISELESS[name](model, lab, wave)
        theta, chi2, cov = best_fit_labels(target, spectra.flux_err[start:start + chunk]
                                           .astype(np.float64), lab, wave)
        lam.append(chi2)
        bias.append(theta - lab)
        crb.append(np.sqrt(np.diagonal(cov, axis1=1, axis2=2)))
    lam, bias, crb = np.concatenate(lam), np.concatenate(bias), np.concatenate(crb)
    power = norm.cdf(np.sqrt(lam) - norm.ppf(1.0 - ALPHA))
    return {"name": name, "n": n, "power": float(power.mean()),
            "lambda_median": float(np.median(lam)),
            "detectable": float(np.mean(power >= 0.9)),
            "bias_median": np.median(bias, axis=0), "z_bias_median": np.median(bias / crb, axis=0),
            "z_bias_abs_gt3": np.mean(np.abs(bias / crb) > 3.0, axis=0)}


def main(argv=None) -> int:
    from benchmarks.bench_shift import SHIFT_SEED
    from pipeline.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="stars per shift")
    parser.add_argument("--configfile", default=None, help="config whose data ranges to use")
    parser.add_argument("--only", nargs="*", default=list(NOISELESS), choices=list(NOISELESS))
    args = parser.parse_args(argv)
    cfg = load_config(args.configfile)
    print(f"oracle test at false-alarm rate {ALPHA:g}; labels Teff, log g, [Fe/H]")
    print(f"{'shift':16s} {'power':>6s} {'P>=0.9':>7s} {'med chi2':>9s}  "
          f"{'median bias':>26s}  {'median bias / CRB':>20s}  {'|bias/CRB|>3':>16s}")
    for name in args.only:
        r = oracle(name, args.n, SHIFT_SEED, cfg)
        print(f"{name:16s} {r['power']:6.3f} {r['detectable']:7.3f} {r['lambda_median']:9.1f}  "
              f"{r['bias_median'][0]:+8.1f} {r['bias_median'][1]:+8.3f} "
              f"{r['bias_median'][2]:+8.3f}  "
              + " ".join(f"{v:+6.1f}" for v in r["z_bias_median"]) + "  "
              + " ".join(f"{v:5.2f}" for v in r["z_bias_abs_gt3"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
