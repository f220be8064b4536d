"""An ensemble of Laplace networks against the single model, on a small synthetic config.

    python -m benchmarks --only ensemble          # 3 members, 2000 training stars
    python -m benchmarks --only ensemble --quick  # the config/quick.yaml sizes (smoke test)

Runs the pipeline's own steps in-process in a temporary directory laid out as the Snakefile
lays it out (``pipeline.artifacts.members``): the data step; the train and laplace steps once
for the single model (``ensemble.members = 1``, seed ``seed``) and once per member of an
``ensemble.members = 3`` ensemble (member seeds from SeedSequence); the predict step on the test
split and on a shifted set (Teff 7000-7800 K, above the 3500-7000 K the networks were trained
on; log g 3.8-4.5, other labels and SNR as the test split) with the single model and with the
ensemble, whose scatter model the ensemble_scatter step refits on the mixture's validation
residuals (``--scatter``). Rows per label and set: z std and 68.3% coverage of the total error,
RMSE and the median model (epistemic) error; value = ensemble, baseline = single model, ratio =
ensemble / single; and the fraction of stars with any FLAG bit set (the metrics above include
them); z std and coverage of the mixture with the members' own scatter terms (predict without
``--scatter``, what the ensemble did before it had its own scatter model) against the single
model; and the RMSE of the mixture mean against the average RMSE of its members alone (the
members' predict runs). Numbers hold for this tiny network and data size only (docs/laplace.md).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import row

MEMBERS = 3
SIZES = {False: {"n_train": 2000, "n_valid": 500, "n_test": 1000, "epochs": 20},
         True: {"n_train": 400, "n_valid": 150, "n_test": 150, "epochs": 4}}


def _config(quick: bool) -> dict:
    from pipeline.config import validate

    size = SIZES[quick]
    return validate({
        "seed": 7, "data": {"source": "synthetic", "n_train": size["n_train"],
                            "n_valid": size["n_valid"], "n_test": size["n_test"]},
        "model": {"type": "dense", "hidden": [64, 32, 16]},
        "train": {"epochs": size["epochs"], "batch_size": 64},
        # its predict runs have no emulator file (no shift flags), so neither has the scatter
        # model the emulator offset
        "laplace": {"last_layers": 2, "scatter_emulator": False}})


def _step(module, argv: list) -> None:
    from pipeline.cli import main

    if main(module.build_parser, module.run, [str(a) for a in argv]) != 0:
        raise RuntimeError(f"{module.__name__} {argv} failed")


def _shifted(config: dict, n: int, path: Path) -> Path:
    """Stars hotter than the training range: Teff U(7000, 7800) K, log g U(3.8, 4.5)."""
    from pipeline.spectra.fits import write_spectra
    from pipeline.spectra.synthetic import apogee_grid, generate, sample_labels, sample_snr

    rng = np.random.default_rng([config["seed"], 99])
    labels = sample_labels(n, rng, config["data"])
    labels[:, 0], labels[:, 1] = rng.uniform(7000, 7800, n), rng.uniform(3.8, 4.5, n)
    spectra = generate(n, [config["seed"], 99, 0], config["data"], apogee_grid(), "HOT",
                       labels, sample_snr(n, rng, config["data"]))
    write_spectra(path, spectra)
    return path


def _fit_members(config: dict, root: Path, members: int) -> tuple[list, list]:
    """Train and fit the Laplace posterior of every member, as the Snakefile's jobs do."""
    from pipeline.artifacts.members import member_paths, member_seed
    from pipeline.steps import laplace, train

    data = root.parent / "data"
    models, posteriors = [], []
    for m, (model_dir, posterior) in enumerate(member_paths(root, members)):
        cfg = dict(config, seed=member_seed(config["seed"], members, m))
        common = ["--config-json", json.dumps(cfg), "--train", data / "train.fits",
                  "--valid", data / "valid.fits"]
        _step(train, [*common, "--outdir", model_dir])
        _step(laplace, [*common, "--model", model_dir, "--out", posterior])
        models.append(model_dir)
        posteriors.append(posterior)
    return models, posteriors


def _metrics(catalog: Path) -> dict:
    from pipeline import LABELS
    from pipeline.artifacts.catalog import read_table
    from pipeline.evaluation.calibration import accuracy_metrics, calibration_metrics

    table = read_table(catalog)
    out = {"all stars": {"flagged fraction": float(np.mean(np.asarray(table["FLAG"]) != 0))}}
    for label in LABELS:
        pred, err, true = (np.asarray(table[c]) for c in (label, f"{label}_ERR",
                                                           f"{label}_TRUE"))
        cal = calibration_metrics(pred, err, true, n_bins=10)
        out[label] = {"z std": cal["Z_STD"], "coverage 68.3%": cal["COVERAGE_68.3"],
                      "RMSE": accuracy_metrics(pred, true)["rmse"],
                      "median model error": float(np.median(table[f"{label}_ERR_MODEL"]))}
    return out


def _ensemble_scatter(config: dict, root: Path, pairs: list) -> Path:
    """The ensemble_scatter step on the members, as the Snakefile's job runs it."""
    from pipeline.artifacts.members import ensemble_scatter_path
    from pipeline.steps import ensemble_scatter

    out = Path(ensemble_scatter_path(str(root)))
    _step(ensemble_scatter, ["--config-json", json.dumps(config),
                             *[a for m, p in pairs for a in ("--model", m, "--posterior", p)],
                             "--valid", root.parent / "data" / "valid.fits", "--out", out])
    return out


def run(quick: bool = False) -> list[dict]:
    from pipeline.steps import data, predict

    config = _config(quick)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ensemble_") as tmp:
        tmp = Path(tmp)
        _step(data, ["--config-json", json.dumps(config), "--outdir", tmp / "data"])
        sets = {"test": tmp / "data" / "test.fits",
                "Teff 7000-7800 K": _shifted(config, config["data"]["n_test"],
                                             tmp / "data" / "hot.fits")}
        metrics = {}
        for kind, members in (("single", 1), ("ensemble", MEMBERS)):
            models, posteriors = _fit_members(config, tmp / kind, members)
            # the mixture (with its own scatter model, and with the members' own scatter
            # terms); with an ensemble also each member alone
            pairs = list(zip(models, posteriors, strict=True))
            runs = {kind: (pairs, [])}
            if members > 1:
                scatter = _ensemble_scatter(config, tmp / kind, pairs)
                runs = {kind: (pairs, ["--scatter", scatter]), "members' scatter": (pairs, [])}
                runs.update({f"member {m}": ([pair], []) for m, pair in enumerate(pairs)})
            for name, path in sets.items():
                for run_name, (pairs, extra) in runs.items():
                    out = tmp / kind / "predictions"
                    argv = [a for m, p in pairs for a in ("--model", m, "--posterior", p)]
                    _step(predict, ["--config-json", json.dumps(config), *argv, *extra,
                                    "--name", "cat", "--out", out, path])
                    metrics[run_name, name] = _metrics(out / "cat.fits")
    size = SIZES[quick]
    where = (f"{size['n_train']} train stars, 64-32-16, {size['epochs']} epochs, "
             f"{MEMBERS} members")
    for name in sets:
        for label, single in metrics["single", name].items():
            for stat, base in single.items():
                value = metrics["ensemble", name][label][stat]
                rows.append(row(f"ensemble vs single, {name}, {label} {stat} ({where})",
                                value, base, "", value / base if base else None, "report",
                                None))
            if label != "all stars":
                for stat in ("z std", "coverage 68.3%"):
                    value = metrics["members' scatter", name][label][stat]
                    base = single[stat]
                    rows.append(row(f"ensemble with its members' own scatter vs single, {name}, "
                                    f"{label} {stat} ({where})", value, base, "",
                                    value / base if base else None, "report", None))
                members_rmse = np.mean([metrics[f"member {m}", name][label]["RMSE"]
                                        for m in range(MEMBERS)])
                value = metrics["ensemble", name][label]["RMSE"]
                rows.append(row(f"ensemble vs its members' mean, {name}, {label} RMSE ({where})",
                                value, members_rmse, "", value / members_rmse, "report", None))
    return rows
