"""The paper numbers file and the README block rendered from it.

The numbers step runs on a small results tree in the formats the tables step, the data step,
the predict step and Snakemake's benchmark directive write (docs/outputs.md); the expected
macro values are worked out here by hand from the numbers put in. The README comparison
uses results/paper/numbers.tex of the checkout only when it exists and comes from the
configuration the README block names.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.table import Table

from pipeline.artifacts.latex_numbers import (
    fixed,
    macro_name,
    parse_numbers,
    read_numbers,
    significant,
    tex_to_text,
)
from pipeline.exceptions import DataError
from pipeline.steps import paper
from tests.conftest import REPO

LABELS_ = ("TEFF", "LOGG", "FE_H")
METRICS = {"TEFF": (-56.4417, 391.069, 279.998), "LOGG": (0.134011, 0.807203, 0.738803),
           "FE_H": (0.0421608, 0.483518, 0.360748)}
STARS = {"train": 40, "valid": 15, "test": 12}
# rule -> wall seconds and max_rss (MB) of each of its jobs
BENCHMARKS = {"data": [(5.31, 130.2)], "train": [(4000.0, 2960.0)], "laplace": [(44.9, 640.0)],
              "predict": [(30.0, 600.0), (50.0, 630.0)],
              "jacobian": [(100.0, 690.0), (50.0, float("nan"))], "tables": [(20.6, 290.0)]}


# ----------------------------------------------------------------------- a results tree
def write_tree(root: Path) -> dict[str, Path]:
    """Tables, datasets, a catalog header and benchmark files as the pipeline writes them."""
    tables = root / "tables"
    tables.mkdir(parents=True)
    metrics = {"provenance": {"PKGVERS": "0.1.0"}, "catalog": "test", "n_stars": 12,
               "n_flagged": 2, "labels": {
                   label: {"unit": "K", "bias": b, "rmse": r, "robust_scatter": s,
                           "n_stars": 12} for label, (b, r, s) in METRICS.items()}}
    (tables / "metrics.json").write_text(json.dumps(metrics, indent=2))
    rows = []
    for catalog, shift in (("valid", 0.0), ("test", 0.01)):
        for k, label in enumerate(LABELS_):
            rows.append({"CATALOG": catalog, "LABEL": label, "UNIT": "K", "N": 12,
                         "Z_MEAN": -0.0027 + shift * k, "Z_STD": 1.0958992 + shift,
                         "COVERAGE_68.3": 0.54666667, "COVERAGE_95.4": 0.98,
                         "COVERAGE_99.7": 1.0, "NLL": 0.3, "ENCE": 0.16389331,
                         "GROUP": "all", "BIN": "all"})
    # the rows of SNR bins and label terciles follow, as the tables step writes them: the
    # numbers quote the rows over all stars, never a bin's
    rows += [{**row, "N": 4, "Z_STD": 0.41, "COVERAGE_68.3": 0.92, "GROUP": group, "BIN": "1"}
             for group in ("SNR", "TEFF") for row in list(rows)[:6]]
    pd.DataFrame(rows).to_csv(tables / "calibration.csv", index=False, float_format="%.8g")
    rows = [{"CATALOG": "test", "LABEL": label, "UNIT": "K", "BIN": b, "SNR_MIN": 30,
             "SNR_MAX": 300, "N": 12, "NN_RMSE": 1.0, "NN_SCATTER": 1.0,
             "RIDGE_RMSE": 86.2 if b == "all" else 1e9, "RIDGE_SCATTER": 0.0431,
             "KRR_RMSE": 99.96, "KRR_SCATTER": 0.0163, "NN_SCATTER_OVER_CRB": 327.6}
            for label in LABELS_ for b in ("all", "1", "2")]
    pd.DataFrame(rows).to_csv(tables / "precision.csv", index=False, float_format="%.8g")
    data = {}
    for split, n in STARS.items():
        data[split] = root / "data" / f"{split}.fits"
        data[split].parent.mkdir(exist_ok=True)
        labels = fits.table_to_hdu(Table({"STAR_ID": [f"s{i}" for i in range(n)],
                                          "TEFF": np.full(n, 5000.0)}))
        labels.name = "LABELS"
        fits.HDUList([fits.PrimaryHDU(), labels]).writeto(data[split])
    catalog = root / "predictions" / "test.fits"
    catalog.parent.mkdir()
    header = fits.Header({"PKGVERS": "0.1.0", "PYVERS": "3.11.7", "TFVERS": "2.21.0",
                          "NPVERS": "2.4.6", "GITCOMM": "7fcd4ac4582a",
                          "MACHINE": "AMD EPYC, 2 CPUs"})
    fits.HDUList([fits.PrimaryHDU(header=header)]).writeto(catalog)
    bench = []
    for rule, jobs in BENCHMARKS.items():
        for i, (seconds, rss) in enumerate(jobs):
            path = root / "benchmarks" / f"{rule}-{i}.tsv"
            path.parent.mkdir(exist_ok=True)
            path.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\t"
                            f"mean_load\tcpu_time\n{seconds}\t0:00:05\t{rss}\t1\t1\t1\t0\t0\t"
                            "50\t3\n")
            bench.append(f"{rule}={path}")
    return {"tables": tables, "data": data, "catalog": catalog, "benchmarks": bench}


def numbers_args(tree: dict, out: Path, name: str = "quick") -> list[str]:
    t = tree["tables"]
    return ["--config-json", json.dumps({"seed": 7}), "numbers", "--config-name", name,
            "--metrics", str(t / "metrics.json"), "--calibration", str(t / "calibration.csv"),
            "--precision", str(t / "precision.csv"),
            "--data", *(f"{s}={p}" for s, p in tree["data"].items()),
            "--catalog", str(tree["catalog"]), "--benchmarks", *tree["benchmarks"],
            "--out", str(out)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    return write_tree(tmp_path_factory.mktemp("paper_results"))


@pytest.fixture(scope="module")
def numbers_file(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paper") / "numbers.tex"
    assert paper.main(numbers_args(tree, out)) == 0
    return out


# ------------------------------------------------------------------------- formatting
@pytest.mark.parametrize(("value", "digits", "text"), [
    (391.069, 2, "390"), (-56.4417, 2, "$-$56"), (0.0421608, 2, "0.042"), (9.96, 2, "10"),
    (0.999, 2, "1.0"), (1234.5, 2, "1200"), (1234.5, 3, "1230"), (0.000123, 2, "0.00012"),
    (5.31, 2, "5.3"), (0.0, 2, "0"), (2.5, 1, "2"),  # round half to even, as Python rounds
])
def test_significant_figures(value, digits, text):
    assert significant(value, digits) == text


def test_significant_figures_agree_with_exponent_formatting(rng):
    """Against Python's own %g rounding (an independent implementation), over 8 decades."""
    for value in rng.uniform(-1, 1, 500) * 10.0 ** rng.integers(-4, 5, 500):
        for digits in (1, 2, 3):
            expected = float(f"{value:.{digits - 1}e}")
            assert float(tex_to_text(significant(value, digits))) == pytest.approx(
                expected, rel=1e-12), (value, digits)


def test_fixed_decimals_and_signs():
    assert fixed(-0.0571, 2, plus=True) == "$-$0.06"
    assert fixed(0.0918, 2, plus=True) == "+0.09"
    assert fixed(-0.0027, 2, plus=True) == "0.00"  # a rounded zero carries no sign
    assert fixed(54.666667, 1) == "54.7"
    with pytest.raises(ValueError, match="non-finite"):
        fixed(float("nan"), 2)


def test_macro_names_are_letters_only():
    assert macro_name("Teff", "RMSE", "test") == "TeffRMSETest"
    assert macro_name("NStars", "my_stars-2") == "NStarsMyStarsTwo"
    with pytest.raises(ValueError):
        macro_name("_-")


@pytest.mark.parametrize(("text", "message"), [
    ("\\newcommand{\\A}{1}\n\\newcommand{\\A}{2}\n", "line 2: \\A is defined a second time"),
    ("\\newcommand{\\Teff2}{1}\n", "'Teff2' is not letters only"),
    ("\\newcommand{\\A}{{1}\n", "unbalanced braces"),
    ("\\def\\A{1}\n", "line 1: '\\def\\A{1}' is not a \\newcommand"),
])
def test_malformed_numbers_files_name_the_line(text, message):
    with pytest.raises(DataError) as info:
        parse_numbers(text, "n.tex")
    assert message in str(info.value) and "'n.tex'" in str(info.value)


# ----------------------------------------------------------------------- the numbers step
def test_every_number_from_its_table(numbers_file):
    numbers = read_numbers(numbers_file)
    expected = {
        "ConfigName": "quick", "ConfigSeed": "7",
        "NStarsTrain": "40", "NStarsValid": "15", "NStarsTest": "12", "NFlaggedTest": "2",
        "TeffBiasTest": "$-$56\\,K", "TeffRMSETest": "390\\,K", "TeffScatterTest": "280\\,K",
        "LoggBiasTest": "+0.13\\,dex", "LoggRMSETest": "0.81\\,dex",
        "FeHBiasTest": "+0.042\\,dex", "FeHRMSETest": "0.48\\,dex",
        "FeHScatterTest": "0.36\\,dex",
        "TeffZMeanValid": "0.00", "LoggZMeanTest": "+0.01", "TeffZStdTest": "1.11",
        "TeffCoverageOneTest": "54.7\\%", "FeHCoverageTwoValid": "98.0\\%",
        "LoggCoverageThreeTest": "100.0\\%", "FeHENCETest": "0.16",
        "TeffRMSERidgeTest": "86\\,K",  # BIN 'all', not the SNR bins
        "TeffRMSEKRRTest": "100\\,K", "FeHScatterKRRTest": "0.016\\,dex",
        "LoggScatterOverCRBTest": "330",
        # sums over the jobs of a rule; a NaN max_rss (job ended before the first sample)
        # does not hide the other job's peak
        "RuntimeData": "5.3\\,s", "RuntimePredict": "80\\,s", "RuntimeJacobian": "2.5\\,min",
        "RuntimeTrain": "67\\,min",  # 4000 s
        "RuntimeHeavyRules": "72\\,min",  # 5.31 + 4000 + 44.9 + 80 + 150 + 20.6 s = 71.7 min
        "MemoryData": "130\\,MB", "MemoryTrain": "3.0\\,GB", "MemoryJacobian": "690\\,MB",
        "PipelineVersion": "0.1.0", "TensorFlowVersion": "2.21.0", "PythonVersion": "3.11.7",
        "NumPyVersion": "2.4.6", "Machine": "AMD EPYC, 2 CPUs",
    }
    for name, value in expected.items():
        assert numbers[name] == value, name
    assert re.fullmatch(r"[0-9a-f]{16}", numbers["ConfigHash"])


def test_every_macro_defined_once_with_a_letters_only_name(numbers_file):
    text = numbers_file.read_text()
    names = re.findall(r"\\newcommand\{\\([^}]*)\}", text)
    assert len(names) == len(set(names)) == len(read_numbers(numbers_file)) > 80
    assert all(re.fullmatch(r"[A-Za-z]+", n) for n in names)


def test_numbers_file_is_written_atomically_and_identically(tree, numbers_file, tmp_path):
    out = tmp_path / "numbers.tex"
    assert paper.main(numbers_args(tree, out)) == 0
    assert out.read_bytes() == numbers_file.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["numbers.tex"]


def test_missing_column_names_file_and_writes_nothing(tree, tmp_path, capsys):
    broken = tmp_path / "tables"
    shutil.copytree(tree["tables"], broken)
    table = pd.read_csv(broken / "calibration.csv").drop(columns="ENCE")
    table.to_csv(broken / "calibration.csv", index=False)
    args = numbers_args({**tree, "tables": broken}, tmp_path / "numbers.tex")
    assert paper.main(args) == 1
    err = capsys.readouterr().err
    assert "calibration.csv': columns ['ENCE'] are missing; rerun the tables step" in err
    assert not (tmp_path / "numbers.tex").exists()


def test_non_finite_metric_is_refused(tree, tmp_path, capsys):
    broken = tmp_path / "tables"
    shutil.copytree(tree["tables"], broken)
    metrics = json.loads((broken / "metrics.json").read_text())
    metrics["labels"]["LOGG"]["rmse"] = None  # how the tables step writes NaN
    (broken / "metrics.json").write_text(json.dumps(metrics))
    assert paper.main(numbers_args({**tree, "tables": broken}, tmp_path / "n.tex")) == 1
    assert "labels.LOGG.rmse is missing or not finite" in capsys.readouterr().err


def test_catalog_names_that_spell_the_same_macro_are_refused(tree, tmp_path, capsys):
    broken = tmp_path / "tables"
    shutil.copytree(tree["tables"], broken)
    table = pd.read_csv(broken / "calibration.csv")
    table["CATALOG"] = table["CATALOG"].map({"valid": "set1", "test": "set-1"})
    table.to_csv(broken / "calibration.csv", index=False)
    assert paper.main(numbers_args({**tree, "tables": broken}, tmp_path / "n.tex")) == 1
    assert "catalogs ['set-1', 'set1'] would all be quoted as 'SetOne'" in capsys.readouterr().err


# ------------------------------------------------------------------------ LaTeX compile
def test_numbers_compile_in_a_minimal_document(numbers_file, tmp_path):
    latex = shutil.which("pdflatex") or shutil.which("latex")
    if latex is None:
        pytest.skip("no pdflatex or latex on PATH: compilation not checked (the macros were "
                    "checked by parsing)")
    shutil.copy(numbers_file, tmp_path / "numbers.tex")
    uses = " ".join(f"\\{name}" for name in read_numbers(numbers_file))
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\input{numbers}\n"
                                      f"\\begin{{document}}\n{uses}\n\\end{{document}}\n")
    done = subprocess.run([latex, "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]


# ---------------------------------------------------------------------- the README block
def block_values(block: str) -> list[str]:
    """The values a reader sees in a rendered block: table cells after the label column, the
    items of the run-time and version lines, and the configuration line's numbers."""
    values = []
    lines = []
    for paragraph in block.split("\n\n"):  # prose is wrapped: one line per paragraph
        table = paragraph.startswith("| ")
        lines += paragraph.splitlines() if table else [paragraph.replace("\n", " ")]
    for line in lines:
        if line.startswith("| ") and not line.startswith("| label"):
            values += [c.strip() for c in line.strip("|").split("|")[1:]]
        elif line.startswith("Wall-clock"):
            items = line.split("): ", 1)[1].rstrip(".").replace("; ", ", ").split(", ")
            values += [" ".join(item.split(" ")[-2:]) for item in items]  # 'train 67 min'
        elif line.startswith("Versions"):
            packages, _, machine = line[10:].rstrip(".").partition("; machine ")
            values += [item.rsplit(" ", 1)[1] for item in packages.split(", ")] + [machine]
        elif line.startswith("Configuration"):
            values += re.findall(r"seed (\d+)|hash ([0-9a-f]+)|(\d+) /|/ (\d+) stars", line)
    flat = []
    for value in values:
        flat += [v for v in value if v] if isinstance(value, tuple) else [value]
    return flat


def test_readme_block_shows_only_macro_values(numbers_file):
    numbers = read_numbers(numbers_file)
    block = paper.render_block(numbers)
    shown = {tex_to_text(v) for v in numbers.values()}
    values = block_values(block)
    assert len(values) >= 3 * 5 + 3 * 6 + 7 + 3 + 4  # accuracy, calibration, runtimes, ...
    assert [v for v in values if v not in shown] == []
    assert "| Teff | -56 K | 390 K | 280 K | 86 K | 100 K |" in block
    assert block == paper.render_block(dict(numbers))  # deterministic


def test_readme_command_rewrites_only_the_block(numbers_file, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\ntext before\n<!-- numbers:begin config=config -->\nold "
                      "numbers\n<!-- numbers:end -->\ntext after\n")
    check = ["readme", "--numbers", str(numbers_file), "--readme", str(readme), "--check"]
    assert paper.main(check) == 1  # stale
    assert paper.main(check[:-1]) == 0
    first = readme.read_text()
    assert first.startswith("# title\n\ntext before\n<!-- numbers:begin config=quick hash=")
    assert first.endswith("<!-- numbers:end -->\ntext after\n") and "old numbers" not in first
    assert paper.main(check[:-1]) == 0
    assert readme.read_text() == first  # rendering twice changes nothing
    assert paper.main(check) == 0


def test_readme_without_markers_is_a_clear_error(numbers_file, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no block\n")
    assert paper.main(["readme", "--numbers", str(numbers_file), "--readme", str(readme)]) == 1
    assert "no '<!-- numbers:begin config=NAME -->'" in capsys.readouterr().err


def test_repository_readme_matches_the_numbers_of_its_configuration():
    """The README block equals the rendering of results/paper/numbers.tex, run times and
    versions aside, when the checkout has that file from the configuration the block names
    (skipped otherwise, e.g. where only the quick pipeline ran) and from the installation and
    machine the block's versions paragraph names. From another machine or installation (or a
    block that does not name its machine) the training ends in another network, so only what
    the configuration decides is compared: the block with every number masked."""
    readme = (REPO / "README.md").read_text()
    name, block = paper.block_config(readme, "README.md")
    path = REPO / "results" / "paper" / "numbers.tex"
    if not path.is_file():
        pytest.skip(f"{path} does not exist: run `snakemake paper --configfile "
                    f"config/{name}.yaml` to compare")
    numbers = read_numbers(path)
    made_from = tex_to_text(numbers.get("ConfigName", ""))
    if made_from != name:
        pytest.skip(f"{path} comes from config '{made_from}', the README block from '{name}'")
    # The same configuration file with other values (a user's seed or sizes) is another run.
    readme_hash = re.search(r"hash=(\S+)", block.splitlines()[0])
    run_hash = tex_to_text(numbers.get("ConfigHash", ""))
    if readme_hash is None or readme_hash[1] != run_hash:
        pytest.skip(f"{path} comes from config hash {run_hash}, the README block from "
                    f"{readme_hash[1] if readme_hash else 'a run before the numbers file'}")
    rendered = paper.render_block(numbers)
    compare = run_results if versions(block) == versions(rendered) else configured
    assert compare(block) == compare(rendered), (
        "README.md's numbers block differs from results/paper/numbers.tex: rewrite it with "
        "`python -m pipeline.steps.paper readme --numbers results/paper/numbers.tex`")


def versions(block: str) -> str:
    """The block's versions paragraph (installation and machine)."""
    return "\n\n".join(p for p in block.split("\n\n") if p.lstrip().startswith("Versions"))


def configured(block: str) -> str:
    """:func:`run_results` with every number masked: what the configuration decides (which
    tables, rows and columns), not what the training made of it on one machine."""
    return re.sub(r"[-+]?\d[\d.,]*", "#", run_results(block))


def test_readme_comparison_masks_numbers_of_another_machine():
    """A block from another machine equals a rendering with other metrics once masked, and
    still differs from one with another table (a column lost)."""
    block = "Configuration `config`: 12000 stars.\n\n| Teff | +1.3 K | 25 K |\n\nVersions: a."
    other = "Configuration `config`: 12000 stars.\n\n| Teff | +1.5 K | 23.1 K |\n\nVersions: b."
    assert versions(block) != versions(other)
    assert configured(block) == configured(other) and run_results(block) != run_results(other)
    assert configured(block) != configured(other.replace(" 23.1 K |", ""))


def run_results(block: str) -> str:
    """The block without its run-time and version paragraphs: those belong to the machine and
    the installation that ran the pipeline, not to the configuration, so a user's own run of
    the README's configuration keeps this test passing."""
    return "\n\n".join(p for p in block.split("\n\n")
                       if not p.lstrip().startswith(("Wall-clock", "Versions")))
