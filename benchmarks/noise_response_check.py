"""Check a finished run's flux-noise term against the noise it claims to describe.

    python -m benchmarks.noise_response_check --results results --configfile config/config.yaml
        [--n 120] [--draws 48] [--snr 12 30 100]

For generated stars of the run's label distribution at each SNR, the true noise variance of the
network's labels is measured by brute force: ``draws`` noise realizations around the
*noiseless* spectrum (the generator's model), the sample variance of the predictions. It is
compared with what the error budget reports for one observed (noisy) spectrum of each star:
the delta method D diag(flux_err^2) D^T at the observed spectrum, alone and scaled by the
posterior's noise response (``laplace.noise_response``, measured by the laplace step on
validation spectra, not on these stars). Printed per label: the mean over stars of true /
reported variance (1 when the noise term is right). Writes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline import LABELS


def check(results: Path, config: dict, snrs, n: int, draws: int, seed: int = 5) -> list[tuple]:
    """Rows (snr, mean true/delta, mean true/scaled, mean ratio applied), each (3,) per label."""
    from pipeline.artifacts.model_dir import load_trained
    from pipeline.laplace import Posterior
    from pipeline.laplace.error_budget import noise_covariances, predict_standardized
    from pipeline.laplace.noise_response import NoiseResponse, star_snr
    from pipeline.spectra import synthetic

    model, _, wave = load_trained(results / "model")
    posterior = Posterior.load(results / "laplace" / "posterior.npz", model)
    response = posterior.noise_response or NoiseResponse(np.zeros(1), np.ones((1, 3)))
    data = synthetic.synthetic_config(config)
    rng = np.random.default_rng(seed)
    rows = []
    for k, snr in enumerate(snrs):
        labels = synthetic.sample_labels(n, rng, data)
        observed = synthetic.generate(n, [seed, k], data, wave, "CHECK", labels,
                                      np.full(n, float(snr)))
        err = np.where(observed.flux_err > 10, 0.0, observed.flux_err).astype(np.float32)
        clean = np.where(err > 0, synthetic.synthesize(labels, wave), 1.0).astype(np.float32)
        obs = np.where(err > 0, observed.flux, 1.0).astype(np.float32)
        preds = [predict_standardized(model, clean + err * rng.standard_normal(
            clean.shape, dtype=np.float32)) for _ in range(draws)]
        true = np.var(np.stack(preds), axis=0, ddof=1)
        delta = np.diagonal(noise_covariances(model, obs, err), axis1=1, axis2=2)
        ratio = response(star_snr(obs, err))
        rows.append((snr, np.mean(true / delta, axis=0), np.mean(true / (ratio * delta), axis=0),
                     ratio.mean(axis=0)))
    return rows


def main(argv=None) -> int:
    from pipeline.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, type=Path, help="a run's results folder")
    parser.add_argument("--configfile", required=True, help="that run's config")
    parser.add_argument("--n", type=int, default=120, help="stars per SNR")
    parser.add_argument("--draws", type=int, default=48, help="noise draws per star")
    parser.add_argument("--snr", type=float, nargs="+", default=[12.0, 30.0, 100.0])
    args = parser.parse_args(argv)
    rows = check(args.results, load_config(args.configfile), args.snr, args.n, args.draws)
    print(f"mean over {args.n} stars of the true noise variance ({args.draws} draws around the "
          "noiseless spectrum) over the reported one; labels " + ", ".join(LABELS))
    for snr, delta, scaled, ratio in rows:
        print(f"SNR {snr:g}: delta method {np.round(delta, 3)}, with the noise response "
              f"{np.round(scaled, 3)} (response applied {np.round(ratio, 3)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
