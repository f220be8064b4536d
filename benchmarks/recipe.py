"""Measure one training recipe: validation precision of the network next to linear ridge.

    python -m benchmarks.recipe --train results/data/train.fits --valid results/data/valid.fits \
        --configfile config/config.yaml --n-train 12000 --outdir /tmp/recipe train.epochs=10
    python -m benchmarks.recipe --tiny-dwarfs train.noise_augmentation=0 --ridge

The first form trains the configured network (plus ``key=value`` overrides, as
``snakemake --config``) on the first ``--n-train`` stars of a canonical training file and
prints, on the validation file, the MSE of the standardized labels per label, the RMSE and
robust scatter (1.4826 MAD) in physical units, the active units per hidden layer, the time
and the last history row. ``--tiny-dwarfs`` uses the small network and the 800 / 300
dwarf-box stars of tests/test_dwarfs.py instead (its fixture settings, overridable).
``--ridge`` adds linear ridge regression on the same stars, its penalty chosen on the
validation split (the test's ``ridge_validation_mse``). ``--test FILE`` adds the network's RMSE
and robust scatter on a held-out canonical file (the run's test split: its baselines are in
the run's ``results/tables/precision.csv``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def tiny_dwarfs(overrides: list[str]):
    """(config, train, valid) of tests/test_dwarfs.py with ``overrides`` applied."""
    from pipeline.config import apply_overrides, validate
    from tests.test_dwarfs import TINY_CONFIG, dwarf_spectra

    train, valid = dwarf_spectra()
    return validate(apply_overrides(json.loads(json.dumps(TINY_CONFIG)), overrides)), train, valid


def default_data(args):
    """(config, train, valid) from canonical files and a config file."""
    from pipeline.config import apply_overrides, load_config, validate
    from pipeline.spectra.fits import read_spectra

    config = validate(apply_overrides(load_config(args.configfile),
                                      ["train.stream=false", *args.overrides]))
    train = read_spectra(args.train, require_labels=True)
    if args.n_train:
        train = train.subset(np.arange(min(args.n_train, train.n_stars)))
    return config, train, read_spectra(args.valid, require_labels=True)


def report(name: str, mse: np.ndarray, scale: np.ndarray, extra: str = "") -> None:
    print(f"{name}: val MSE {np.round(mse, 5).tolist()} (mean {mse.mean():.5f}), RMSE "
          f"{np.round(np.sqrt(mse) * scale, 4).tolist()}{extra}", flush=True)


def predict(model, scaler, spectra) -> tuple[np.ndarray, np.ndarray]:
    """The network's scaled predictions (N, K) of ``spectra`` and its residuals (N, K) in
    physical units."""
    pred = np.asarray(model.predict(spectra.flux, verbose=0, batch_size=256), np.float64)
    return pred, scaler.inverse_transform(pred) - spectra.label_array()


def robust_scatter(residual: np.ndarray) -> list[float]:
    """Robust scatter (1.4826 MAD) of each column, as precision.csv reports it."""
    from pipeline.evaluation.calibration import robust_scatter as column_scatter

    return [round(column_scatter(r), 4) for r in np.asarray(residual).T]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train"), parser.add_argument("--valid")
    parser.add_argument("--configfile", default=str(REPO / "config" / "config.yaml"))
    parser.add_argument("--n-train", type=int, default=0)
    parser.add_argument("--tiny-dwarfs", action="store_true")
    parser.add_argument("--ridge", action="store_true")
    parser.add_argument("--test", help="canonical file to report the network's precision on")
    parser.add_argument("--outdir", help="model directory (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # epoch lines
    sys.path.insert(0, str(REPO))
    from pipeline.nn.training import train_model
    from tests.test_dwarfs import ridge_validation_mse

    if not args.tiny_dwarfs and not (args.train and args.valid):
        parser.error("give --train and --valid, or --tiny-dwarfs")
    config, train, valid = tiny_dwarfs(args.overrides) if args.tiny_dwarfs else default_data(args)
    outdir = Path(args.outdir or tempfile.mkdtemp(prefix="recipe-"))
    t0 = time.perf_counter()
    model, scaler, history = train_model(config, train, valid, outdir)
    seconds = time.perf_counter() - t0
    z = scaler.transform(valid.label_array())
    pred, residual = predict(model, scaler, valid)
    active = [layer["active"] for layer in json.loads((outdir / "diagnostics.json").read_text())
              ["layers"]]
    report("network", ((pred - z) ** 2).mean(axis=0), scaler.scale,
           f", robust scatter {robust_scatter(residual)}, "
           f"active units {active}, {seconds:.0f} s, "
           f"last epoch {history.iloc[-1].round(5).to_dict()}")
    if args.test:
        from pipeline.spectra.fits import read_spectra

        test = read_spectra(args.test, require_labels=True)
        _, residual = predict(model, scaler, test)
        print(f"network on {args.test}: RMSE {np.round(np.sqrt((residual**2).mean(0)), 4).tolist()}"
              f", robust scatter {robust_scatter(residual)}", flush=True)
    if args.ridge:
        zt = scaler.transform(train.label_array())
        mse, lam = ridge_validation_mse(np.asarray(train.flux, np.float64), zt,
                                        np.asarray(valid.flux, np.float64), z)
        report("ridge", mse, scaler.scale, f", penalty {lam:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
