"""Step ``paper``: the numbers a paper quotes, as LaTeX macros, and the README tables made
from them.

    python -m pipeline.steps.paper numbers [--config-json J] --config-name NAME \\
        --metrics results/tables/metrics.json --calibration results/tables/calibration.csv \\
        --precision results/tables/precision.csv --data train=F valid=F test=F \\
        --catalog results/predictions/test.fits --benchmarks train=F jacobian=F ... \\
        --out results/paper/numbers.tex
    python -m pipeline.steps.paper readme --numbers results/paper/numbers.tex [--readme README.md]
        [--check]

``numbers`` writes one ``\\newcommand`` per number (:mod:`pipeline.artifacts.latex_numbers`;
the list is in docs/outputs.md): accuracy of the test catalog (bias, RMSE, robust scatter per
label, from metrics.json; the baselines' RMSE from precision.csv), calibration of every catalog
with true labels (z mean, z std, coverage of the 1, 2, 3 sigma intervals, ENCE, from
calibration.csv), stars per split (the LABELS rows of each dataset FITS), the wall-clock time of
each heavy rule summed over its jobs (Snakemake ``benchmark:`` files), package versions (the
provenance cards of the catalog), and the configuration's name, hash and seed.

``readme`` rewrites the block between ``<!-- numbers:begin ... -->`` and ``<!-- numbers:end -->``
of the README with tables rendered from the numbers file only, so the two cannot drift;
``--check`` writes nothing and exits 1 when the block differs from the rendering.
"""

from __future__ import annotations

import json
import logging
import re
import textwrap
from pathlib import Path

import pandas as pd
from astropy.io import fits

from pipeline import LABELS, cli
from pipeline.artifacts.atomic import atomic_path
from pipeline.artifacts.latex_numbers import (
    escape,
    fixed,
    macro_name,
    read_numbers,
    significant,
    tex_to_text,
    with_unit,
    write_numbers,
)
from pipeline.artifacts.provenance import provenance
from pipeline.cli import base_parser
from pipeline.config import config_hash
from pipeline.exceptions import ConfigError, DataError

log = logging.getLogger(__name__)

LABEL_MACRO = {"TEFF": "Teff", "LOGG": "Logg", "FE_H": "FeH"}
LABEL_TEXT = {"TEFF": "Teff", "LOGG": "log g", "FE_H": "[Fe/H]"}
LABEL_UNIT = {"TEFF": "K", "LOGG": "dex", "FE_H": "dex"}  # log g in dex of cm s-2, as quoted
# calibration.csv column -> (macro part, nominal level in the README header)
COVERAGE = {"COVERAGE_68.3": ("CoverageOne", "1 sigma (68.3%)"),
            "COVERAGE_95.4": ("CoverageTwo", "2 sigma (95.4%)"),
            "COVERAGE_99.7": ("CoverageThree", "3 sigma (99.7%)")}
BASELINES = {"RIDGE": ("Ridge", "ridge RMSE"), "KRR": ("KRR", "kernel ridge RMSE")}
# the heavy rules, in DAG order, whose benchmark files the Snakefile passes
RULES = ("data", "train", "laplace", "predict", "jacobian", "tables")
PROVENANCE_VERSIONS = {"PKGVERS": "PipelineVersion", "PYVERS": "PythonVersion",
                       "NPVERS": "NumPyVersion", "TFVERS": "TensorFlowVersion",
                       "GITCOMM": "GitCommit", "MACHINE": "Machine"}
BEGIN = re.compile(r"<!-- numbers:begin(?P<attrs>[^>]*)-->")
END = "<!-- numbers:end -->"


# ------------------------------------------------------------------------- formatting
def label_value(value: float, label: str, *, plus: bool = False) -> str:
    """A residual statistic of ``label`` to 2 significant figures with its unit."""
    return with_unit(significant(value, 2, plus=plus), LABEL_UNIT[label])


def duration(seconds: float) -> str:
    """Wall-clock time in s below 2 min, min below 2 h, else h; 2 significant figures."""
    if seconds < 120:
        return with_unit(significant(seconds, 2), "s")
    if seconds < 7200:
        return with_unit(significant(seconds / 60, 2), "min")
    return with_unit(significant(seconds / 3600, 2), "h")


def memory(megabytes: float) -> str:
    """Peak resident memory in MB below 1000 MB, else GB, 2 significant figures."""
    if megabytes < 1000:
        return with_unit(significant(megabytes, 2), "MB")
    return with_unit(significant(megabytes / 1000, 2), "GB")


# -------------------------------------------------------------------------- reading
def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise DataError(f"'{path}': cannot read ({exc.strerror}); run the tables step") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"'{path}': not valid JSON ({exc}); rerun the tables step") from None


def read_csv(path: Path, columns: tuple[str, ...], sep: str = ",",
             writer: str = "the tables step") -> pd.DataFrame:
    """A table with at least ``columns``; errors name the file and the step to rerun."""
    try:
        table = pd.read_csv(path, sep=sep)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"'{path}': not a readable table ({exc}); rerun {writer}") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"'{path}': columns {missing} are missing; rerun {writer}")
    return table


def finite(value, where: str) -> float:
    if value is None or pd.isna(value):
        raise DataError(f"{where} is missing or not finite: a paper cannot quote it; check "
                        "the tables step's log")
    return float(value)


def read_benchmark(path: Path) -> pd.Series:
    """The one row of a Snakemake benchmark TSV (s = wall seconds, max_rss in MB)."""
    table = read_csv(path, ("s", "max_rss"), sep="\t", writer="the rule of this benchmark")
    if len(table) < 1:
        raise DataError(f"'{path}': no benchmark row; rerun the rule")
    return table.iloc[-1]


def pairs(items: list[str], option: str) -> list[tuple[str, Path]]:
    """``NAME=FILE`` arguments as (name, path) pairs."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{option} '{item}': expected NAME=FILE")
        out.append((name, Path(path)))
    return out


# ------------------------------------------------------------------------ the numbers
def accuracy_numbers(metrics_path: Path) -> dict[str, str]:
    metrics = read_json(metrics_path)
    catalog = macro_name(metrics.get("catalog", "test"))
    out = {}
    for label in LABELS:
        stats = metrics.get("labels", {}).get(label)
        if stats is None:
            raise DataError(f"'{metrics_path}': no entry labels.{label}; rerun the tables step")
        name = LABEL_MACRO[label]
        where = f"'{metrics_path}' labels.{label}"
        out[f"{name}Bias{catalog}"] = label_value(finite(stats["bias"], f"{where}.bias"),
                                                  label, plus=True)
        out[f"{name}RMSE{catalog}"] = label_value(finite(stats["rmse"], f"{where}.rmse"), label)
        out[f"{name}Scatter{catalog}"] = label_value(
            finite(stats["robust_scatter"], f"{where}.robust_scatter"), label)
    out[f"NFlagged{catalog}"] = str(int(metrics.get("n_flagged", 0)))
    return out


def distinct_catalogs(table: pd.DataFrame, path: Path) -> None:
    """Refuse catalogs whose names spell the same macro part ('set1', 'set-1')."""
    stems = sorted(table["CATALOG"].astype(str).unique())
    parts = [macro_name(stem) for stem in stems]
    for part in set(parts):
        same = [stem for stem, p in zip(stems, parts, strict=True) if p == part]
        if len(same) > 1:
            raise DataError(f"'{path}': catalogs {same} would all be quoted as '{part}'; "
                            "rename the inputs so their names differ in letters or digits")


def calibration_numbers(path: Path) -> dict[str, str]:
    """z mean, z std, coverages and ENCE of every catalog and label over all its stars."""
    table = read_csv(path, ("CATALOG", "LABEL", "Z_MEAN", "Z_STD", "ENCE", *COVERAGE))
    if "GROUP" in table.columns:  # the rows over every star, not those of an SNR or label bin
        table = table[table["GROUP"].astype(str) == "all"]
    distinct_catalogs(table, path)
    out = {}
    for row in table.to_dict("records"):
        label, catalog = row["LABEL"], macro_name(row["CATALOG"])
        if label not in LABEL_MACRO:
            raise DataError(f"'{path}': unknown LABEL '{label}'; rerun the tables step")
        name = LABEL_MACRO[label]
        where = f"'{path}' catalog {row['CATALOG']} label {label}"
        out[f"{name}ZMean{catalog}"] = fixed(finite(row["Z_MEAN"], f"{where} Z_MEAN"), 2,
                                             plus=True)
        out[f"{name}ZStd{catalog}"] = fixed(finite(row["Z_STD"], f"{where} Z_STD"), 2)
        for column, (part, _) in COVERAGE.items():
            fraction = finite(row[column], f"{where} {column}")
            out[f"{name}{part}{catalog}"] = with_unit(fixed(100 * fraction, 1), "%")
        out[f"{name}ENCE{catalog}"] = fixed(finite(row["ENCE"], f"{where} ENCE"), 2)
    return out


def precision_numbers(path: Path) -> dict[str, str]:
    """RMSE and robust scatter of the baselines over all stars (BIN 'all'), and the network's
    robust scatter over the Cramér–Rao bound where the table has it."""
    table = read_csv(path, ("CATALOG", "LABEL", "BIN"))
    table = table[table["BIN"].astype(str) == "all"]
    out = {}
    for row in table.to_dict("records"):
        label, catalog = row["LABEL"], macro_name(row["CATALOG"])
        name = LABEL_MACRO.get(label)
        if name is None:
            raise DataError(f"'{path}': unknown LABEL '{label}'; rerun the tables step")
        where = f"'{path}' catalog {row['CATALOG']} label {label} bin all"
        for method, (part, _) in BASELINES.items():
            if f"{method}_RMSE" in row:
                out[f"{name}RMSE{part}{catalog}"] = label_value(
                    finite(row[f"{method}_RMSE"], f"{where} {method}_RMSE"), label)
                out[f"{name}Scatter{part}{catalog}"] = label_value(
                    finite(row[f"{method}_SCATTER"], f"{where} {method}_SCATTER"), label)
        if "NN_SCATTER_OVER_CRB" in row:
            out[f"{name}ScatterOverCRB{catalog}"] = significant(
                finite(row["NN_SCATTER_OVER_CRB"], f"{where} NN_SCATTER_OVER_CRB"), 2)
    return out


def star_counts(datasets: list[tuple[str, Path]]) -> dict[str, str]:
    """Stars per split: the rows of each dataset's LABELS table (no flux is read)."""
    out = {}
    for split, path in datasets:
        try:
            with fits.open(path) as hdul:
                rows = hdul["LABELS"].header["NAXIS2"]
        except (OSError, KeyError) as exc:
            raise DataError(f"'{path}': no readable LABELS HDU ({exc}); rerun the data "
                            "step") from None
        out[macro_name("NStars", split)] = str(int(rows))
    return out


def runtime_numbers(benchmarks: list[tuple[str, Path]]) -> dict[str, str]:
    """Wall-clock time of each rule summed over its jobs, their total, and the largest peak
    memory (max_rss) of each rule's jobs."""
    seconds: dict[str, float] = {}
    peak: dict[str, float] = {}
    for rule, path in benchmarks:
        row = read_benchmark(path)
        seconds[rule] = seconds.get(rule, 0.0) + finite(row["s"], f"'{path}' column s")
        rss = row["max_rss"]
        if not pd.isna(rss):  # NaN when a job ended before psutil's first sample
            peak[rule] = max(peak.get(rule, 0.0), float(rss))
    out = {}
    for rule in sorted(seconds, key=lambda r: (RULES.index(r) if r in RULES else len(RULES), r)):
        out[macro_name("Runtime", rule)] = duration(seconds[rule])
    if seconds:
        out["RuntimeHeavyRules"] = duration(sum(seconds.values()))
    for rule in sorted(peak, key=lambda r: (RULES.index(r) if r in RULES else len(RULES), r)):
        out[macro_name("Memory", rule)] = memory(peak[rule])
    return out


def version_numbers(catalog: Path) -> dict[str, str]:
    """Package versions from the provenance cards of a catalog written by a TensorFlow step."""
    try:
        header = fits.getheader(catalog, 0)
    except OSError as exc:
        raise DataError(f"'{catalog}': not a readable FITS catalog ({exc}); rerun the predict "
                        "step") from None
    return {macro: escape(str(header[card]).strip())
            for card, macro in PROVENANCE_VERSIONS.items() if card in header}


def collect_numbers(args, config: dict) -> dict[str, str]:
    numbers = {"ConfigName": escape(args.config_name), "ConfigHash": config_hash(config),
               "ConfigSeed": str(config["seed"])}
    numbers |= star_counts(pairs(args.data, "--data"))
    parts = [accuracy_numbers(Path(args.metrics)), calibration_numbers(Path(args.calibration)),
             precision_numbers(Path(args.precision)),
             runtime_numbers(pairs(args.benchmarks, "--benchmarks")),
             version_numbers(Path(args.catalog))]
    for part in parts:
        twice = sorted(set(numbers) & set(part))
        if twice:  # e.g. two catalog names that spell the same macro
            raise DataError(f"the macros {twice} would be defined twice; rename the catalogs "
                            "so their names differ in letters")
        numbers |= part
    return numbers


# --------------------------------------------------------------------- the README block
def _cell(numbers: dict[str, str], name: str) -> str:
    return tex_to_text(numbers[name]) if name in numbers else "n/a"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def render_block(numbers: dict[str, str], catalog: str = "test") -> str:
    """The README result tables from the macros of a numbers file (every value shown is a
    macro value, through :func:`tex_to_text`), between the begin/end markers."""
    cat = macro_name(catalog)
    name = tex_to_text(numbers.get("ConfigName", "unknown"))
    config_hash = tex_to_text(numbers.get("ConfigHash", "unknown"))
    lines = [f"<!-- numbers:begin config={name} hash={config_hash} -->",
             "<!-- generated by `python -m pipeline.steps.paper readme --numbers "
             "results/paper/numbers.tex`: edit the numbers file's inputs, not this block -->",
             ""]
    splits = [s for s in ("Train", "Valid", "Test") if f"NStars{s}" in numbers]
    counts = " / ".join(_cell(numbers, f"NStars{s}") for s in splits)
    lines += [f"Configuration `{name}` (seed {_cell(numbers, 'ConfigSeed')}, config hash "
              f"{_cell(numbers, 'ConfigHash')}): {counts} stars ({' / '.join(splits).lower()}).",
              ""]
    baselines = [(part, head) for part, head in BASELINES.values()
                 if f"TeffRMSE{part}{cat}" in numbers]
    lines += [f"Accuracy on the {catalog} split (`results/tables/metrics.json`, "
              "`precision.csv`; physical units):", ""]
    lines += _table(["label", "bias", "RMSE", "robust scatter (1.4826 MAD)",
                     *(head for _, head in baselines)],
                    [[LABEL_TEXT[label], *(_cell(numbers, f"{LABEL_MACRO[label]}{stat}{cat}")
                                           for stat in ("Bias", "RMSE", "Scatter")),
                      *(_cell(numbers, f"{LABEL_MACRO[label]}RMSE{part}{cat}")
                        for part, _ in baselines)] for label in LABELS])
    lines += ["", f"Calibration of the error bars on the held-out {catalog} stars "
              "(`results/tables/calibration.csv`; a calibrated z-score has unit standard "
              "deviation and 68.3% of stars inside their 1-sigma interval):", ""]
    lines += _table(["label", "z mean", "z std", *(f"within {head}" for _, head in
                                                   COVERAGE.values()), "ENCE"],
                    [[LABEL_TEXT[label], *(_cell(numbers, f"{LABEL_MACRO[label]}{stat}{cat}")
                                           for stat in ("ZMean", "ZStd",
                                                        *(p for p, _ in COVERAGE.values()),
                                                        "ENCE"))] for label in LABELS])
    runtimes = [(rule, f"Runtime{macro_name(rule)}") for rule in RULES]
    runtimes = [(rule, m) for rule, m in runtimes if m in numbers]
    if runtimes:
        lines += ["", "Wall-clock time of the heavy rules, summed over their jobs (Snakemake "
                  "benchmark files, `results/benchmarks/`): "
                  + ", ".join(f"{rule} {_cell(numbers, m)}" for rule, m in runtimes)
                  + f"; total {_cell(numbers, 'RuntimeHeavyRules')}."]
    versions = [("stellar-laplace", "PipelineVersion"), ("Python", "PythonVersion"),
                ("NumPy", "NumPyVersion"), ("TensorFlow", "TensorFlowVersion")]
    shown = [f"{text} {_cell(numbers, m)}" for text, m in versions if m in numbers]
    if shown:
        machine = f"; machine {_cell(numbers, 'Machine')}" if "Machine" in numbers else ""
        lines += ["", "Versions: " + ", ".join(shown) + machine + "."]
    lines += ["", END]
    # prose wrapped at 96 characters like the rest of the README; tables and markers as they are
    return "\n".join(line if line.startswith(("|", "<!--")) or not line
                     else textwrap.fill(line, 96, break_on_hyphens=False) for line in lines)


def block_config(text: str, source: str = "README") -> tuple[str | None, str]:
    """(config name recorded in the begin marker, the block) of a README's numbers block."""
    begin = BEGIN.search(text)
    end = text.find(END)
    if begin is None or end < begin.end():
        raise DataError(f"'{source}': no '<!-- numbers:begin config=NAME -->' ... '{END}' "
                        "block; add the two markers where the result tables go")
    attrs = dict(re.findall(r"(\w+)=(\S+)", begin["attrs"]))
    return attrs.get("config"), text[begin.start():end + len(END)]


def replace_block(text: str, block: str, source: str = "README") -> str:
    """``text`` with its numbers block replaced by ``block``."""
    _, old = block_config(text, source)
    start = text.index(old)
    return text[:start] + block + text[start + len(old):]


# ------------------------------------------------------------------------------ steps
def run_numbers(args, config: dict) -> None:
    numbers = collect_numbers(args, config)
    header = provenance(config, timestamp=False)
    write_numbers(args.out, numbers, header)
    log.info("wrote %d numbers to %s", len(numbers), args.out)


def run_readme(args, config: dict) -> None:
    numbers = read_numbers(args.numbers)
    readme = Path(args.readme)
    try:
        text = readme.read_text()
    except OSError as exc:
        raise DataError(f"'{readme}': cannot read ({exc.strerror})") from None
    new = replace_block(text, render_block(numbers), str(readme))
    block_name = block_config(text, str(readme))[0]
    made_from = tex_to_text(numbers.get("ConfigName", "unknown"))
    other = (f" (the block is from config '{block_name}', the numbers file from "
             f"'{made_from}')" if block_name != made_from else "")
    if args.check:
        if new != text:
            raise DataError(f"'{readme}': the numbers block differs from '{args.numbers}'"
                            f"{other}; rewrite it with `python -m pipeline.steps.paper readme "
                            f"--numbers {args.numbers}`")
        log.info("%s: the numbers block matches %s", readme, args.numbers)
        return
    if other:
        log.warning("%s: replacing the numbers block%s", readme, other)
    with atomic_path(readme) as tmp:
        tmp.write_text(new)
    log.info("rewrote the numbers block of %s from %s", readme, args.numbers)


def build_parser():
    parser = base_parser("The numbers a paper quotes as LaTeX macros (numbers), and the "
                         "README tables made from them (readme).")
    sub = parser.add_subparsers(dest="command", required=True)
    numbers = sub.add_parser("numbers", help="write results/paper/numbers.tex")
    numbers.add_argument("--config-name", required=True,
                         help="name of the configuration (the config file's stem)")
    numbers.add_argument("--metrics", required=True, help="results/tables/metrics.json")
    numbers.add_argument("--calibration", required=True, help="results/tables/calibration.csv")
    numbers.add_argument("--precision", required=True, help="results/tables/precision.csv")
    numbers.add_argument("--data", nargs="+", default=[], metavar="SPLIT=FILE",
                         help="dataset FITS of each split (stars per split)")
    numbers.add_argument("--catalog", required=True,
                         help="a prediction catalog FITS (its provenance gives the versions)")
    numbers.add_argument("--benchmarks", nargs="*", default=[], metavar="RULE=FILE",
                         help="Snakemake benchmark TSV of each job, named by its rule")
    numbers.add_argument("--out", required=True, help="the numbers file to write")
    readme = sub.add_parser("readme", help="rewrite the README's numbers block")
    readme.add_argument("--numbers", default="results/paper/numbers.tex",
                        help="numbers file (default: results/paper/numbers.tex)")
    readme.add_argument("--readme", default="README.md", help="file with the numbers block")
    readme.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the block differs from the rendering")
    return parser


def run(args, config: dict) -> None:
    {"numbers": run_numbers, "readme": run_readme}[args.command](args, config)


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
