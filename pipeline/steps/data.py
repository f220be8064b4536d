"""The ``data`` step: build ``{train,valid,test}.fits`` (canonical FITS) from the configured source.

    python -m pipeline.steps.data --config-json J --outdir results/data

``data.source``:

* ``synthetic``: ``n_train``, ``n_valid``, ``n_test`` stars of :mod:`pipeline.spectra.synthetic`
  on the named grid ``data.grid`` (:mod:`pipeline.spectra.grids`), generated
  ``data.synthetic.chunk_size`` at a time and streamed to disk (memory flat). Labels and SNR of
  a split come from the stream ``random_stream(seed, "labels", split)``, the noise of chunk
  ``c`` from ``random_stream(seed, "noise", split, c)``. Labels table: STAR_ID, TEFF, LOGG,
  FE_H, SNR.
* ``fits``: one canonical dataset FITS (``data.fits.path``), validated with labels required,
  split by ``data.split`` fractions.
* ``apstar``: apStar files (``data.apstar.paths``) joined with a label catalog
  (``data.apstar.catalog``; an SDSS allStar table passes the counted cuts of
  ``data.apstar.allstar`` first), normalized onto the grid ``data.grid``, split likewise.

The split is a seeded permutation (stream ``random_stream(seed, "split")``): same config, same
split. Every input is read and validated before anything is written, so a bad input leaves no
output; each file is written atomically with provenance cards
(:mod:`pipeline.artifacts.provenance`) plus SOURCE, SPLIT, NBADPIX (bad pixels in that file)
and GRID (``data.grid``; not for a fits source, whose grid is the file's).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
from astropy.table import Table
from tqdm import tqdm

from pipeline.artifacts.provenance import provenance
from pipeline.cli import base_parser, main
from pipeline.exceptions import ConfigError, DataError
from pipeline.random_streams import random_stream
from pipeline.spectra import apogee, grids, synthetic, validation
from pipeline.spectra.dataset import Spectra
from pipeline.spectra.fits import SpectraWriter, read_options, read_spectra, write_spectra

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


def build_parser():
    parser = base_parser("Build the train/valid/test canonical FITS files.")
    parser.add_argument("--outdir", type=Path,
                        help="directory for <split>.fits of the splits not named below")
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=Path, help=f"output FITS of the {split} split")
    return parser


def output_paths(args) -> dict[str, Path]:
    """The file of every split: named explicitly, or ``<outdir>/<split>.fits``."""
    missing = [s for s in SPLITS if getattr(args, s) is None]
    if missing and args.outdir is None:
        raise ConfigError(f"no output for the split(s) {', '.join(missing)}: pass "
                          "--outdir DIR or " + " ".join(f"--{s} FILE" for s in missing))
    return {s: getattr(args, s) or args.outdir / f"{s}.fits" for s in SPLITS}


def run(args, config: dict) -> None:
    write_datasets(config, output_paths(args))


def write_datasets(config: dict, outputs) -> dict[str, Path]:
    """Write the three splits of ``config['data']['source']``; return their paths.

    ``outputs`` maps each split to its file, or is a directory receiving ``<split>.fits``.
    """
    if not isinstance(outputs, dict):
        outputs = {name: Path(outputs) / f"{name}.fits" for name in SPLITS}
    source = config["data"]["source"]
    if source == "synthetic":
        return {name: write_synthetic_split(config, name, Path(outputs[name]))
                for name in SPLITS}
    spectra = load_labelled(config)
    parts = split_spectra(spectra, config)
    validation.check_label_variance(parts["train"], path=f"{source} training split")
    bad_err = config["data"]["bad_pixel_err"]
    paths = {}
    for name, part in parts.items():
        paths[name] = Path(outputs[name])
        grid = {} if source == "fits" else {"GRID": config["data"]["grid"]}
        header = provenance(config, SOURCE=source, SPLIT=name,
                            NBADPIX=int((part.flux_err >= bad_err).sum()), **grid)
        write_spectra(paths[name], part, header)
        log.info("wrote %s: %d stars x %d pixels", paths[name], part.n_stars, part.n_pixels)
    return paths


# ---------------------------------------------------------------------------- synthetic
def write_synthetic_split(config: dict, name: str, path: Path) -> Path:
    """Generate one split chunk by chunk into ``path`` (atomic, memory flat)."""
    data = config["data"]
    n, chunk = data[f"n_{name}"], data["synthetic"]["chunk_size"]
    index = SPLITS.index(name)
    rng = np.random.default_rng(random_stream(config["seed"], "labels", index))
    labels = synthetic.sample_labels(n, rng, data)
    snr = synthetic.sample_snr(n, rng, data)
    wave = grids.grid_wave(config)
    prefix = f"SYN-{name.upper()}"
    table = Table({"STAR_ID": [f"{prefix}-{i:07d}" for i in range(n)], "TEFF": labels[:, 0],
                   "LOGG": labels[:, 1], "FE_H": labels[:, 2], "SNR": snr})
    n_bad = 0
    header = provenance(config, SOURCE="synthetic", SPLIT=name, CHUNK=chunk,
                        GRID=data["grid"])
    with SpectraWriter(path, wave, table, header) as out:
        starts = range(0, n, chunk)
        for c, start in enumerate(tqdm(starts, desc=name, disable=not sys.stderr.isatty())):
            stop = min(start + chunk, n)
            part = synthetic.generate(stop - start,
                                      random_stream(config["seed"], "noise", index, c), data, wave,
                                      prefix, labels[start:stop], snr[start:stop], start)
            out.write(start, part.flux, part.flux_err)
            n_bad += part.meta["N_BADPIX"]
        out.set_card("NBADPIX", n_bad)
    log.info("wrote %s: %d synthetic stars x %d pixels, %d bad pixels", path, n, wave.size,
             n_bad)
    return path


# ------------------------------------------------------------------------- fits, apstar
def load_labelled(config: dict) -> Spectra:
    """The labelled spectra of a fits or apstar source, validated (nothing written)."""
    data = config["data"]
    if data["source"] == "fits":
        if not data["fits"]["path"]:
            raise ConfigError("config key 'data.fits.path' must name a canonical dataset FITS "
                              "when data.source is fits")
        return read_spectra(data["fits"]["path"], require_labels=True, **read_options(config))
    opts = data["apstar"]
    if not opts["paths"] or not opts["catalog"]:
        raise ConfigError("config keys 'data.apstar.paths' and 'data.apstar.catalog' must be "
                          "set when data.source is apstar")
    spectra = apogee.ingest(opts["paths"], opts["catalog"], grids.grid_wave(config), config)
    where = f"apStar set ({opts['catalog']})"
    spectra = validation.flag_bad_pixels(where, spectra, data["bad_pixel_err"],
                                         data["max_bad_pixel_fraction"])
    return validation.check_labels(where, spectra, data["nan_labels"])


def split_spectra(spectra: Spectra, config: dict) -> dict[str, Spectra]:
    """Seeded random split by ``data.split`` fractions; each split gets at least one star."""
    fractions = config["data"]["split"]
    n = spectra.n_stars
    n_valid = int(round(fractions["valid_fraction"] * n))
    n_test = int(round(fractions["test_fraction"] * n))
    if min(n_valid, n_test, n - n_valid - n_test) < 1:
        raise DataError(f"{n} stars cannot be split into train/valid/test with "
                        f"data.split.valid_fraction={fractions['valid_fraction']} and "
                        f"test_fraction={fractions['test_fraction']}; supply more stars or "
                        "change the fractions")
    order = np.random.default_rng(random_stream(config["seed"], "split")).permutation(n)
    bounds = {"valid": order[:n_valid], "test": order[n_valid:n_valid + n_test],
              "train": order[n_valid + n_test:]}
    return {name: spectra.subset(np.sort(bounds[name])) for name in SPLITS}


if __name__ == "__main__":
    sys.exit(main(build_parser, run))
