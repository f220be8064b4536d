"""The Snakefile: a DAG over every rule, no TensorFlow import, config overrides reach the rules.

Dry runs happen in a copy of the workflow files, so they see a clean results/ whatever the
checkout holds (a user may already have run the pipeline there).
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import APSTAR_FILE, REPO

WORKFLOW_FILES = ("Snakefile", "rules", "config", "docs/report")


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    """A copy of the Snakefile, rule files, configs and report captions, without results/."""
    root = tmp_path_factory.mktemp("workflow")
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name)
        else:
            shutil.copy(source, root / name)
    return root


def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", *args],
                          cwd=workdir, capture_output=True, text=True, timeout=120)


@pytest.fixture
def dry_run(workflow):
    def run(*args: str) -> str:
        out = run_snakemake(workflow, *args)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout + out.stderr

    return run


def job_counts(text: str) -> dict[str, int]:
    block = text.split("Job stats:")[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


def test_snakefile_never_imports_tensorflow():
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        assert not re.search(r"^\s*(import|from)\s+(tensorflow|keras)", path.read_text(), re.M)


def test_dry_run_ignores_results_of_the_checkout(workflow, dry_run):
    """A finished results/ in the checkout does not change what a dry run of a copy plans."""
    assert not (workflow / "results").exists()
    assert job_counts(dry_run())["all"] == 1


def test_default_dag_has_every_rule(dry_run):
    counts = job_counts(dry_run())
    for rule in ("data", "train", "laplace", "emulator", "predict", "jacobian", "tables",
                 "figure", "all"):
        assert counts.get(rule, 0) >= 1, rule
    assert counts["jacobian"] == 2 * 2  # splits valid, test x 2 shards


def test_predict_reads_the_emulator_rules_output(dry_run):
    """The emulator rule fits on train + valid with the model; every predict job waits for
    its file and passes it on (the shift columns and FLAG bits 5-6)."""
    text = dry_run("--printshellcmds")
    assert job_counts(text)["emulator"] == 1
    block = text.split("rule emulator:")[1].split("\n\n")[0]
    inputs = block.split("input:")[1].split("\n")[0]
    for path in ("results/model/model.keras", "results/data/train.fits",
                 "results/data/valid.fits"):
        assert path in inputs, path
    assert "output: results/model/emulator.npz" in block
    predicts = text.split("rule predict:")[1:]
    assert predicts
    for block in predicts:
        assert "results/model/emulator.npz" in block.split("input:")[1].split("\n")[0]
    commands = [line for line in text.splitlines() if "pipeline.steps.predict " in line]
    assert commands and all("--emulator results/model/emulator.npz" in c for c in commands)


def test_scatter_fits_get_the_emulator_file_when_the_offset_is_a_covariate(dry_run):
    """laplace.scatter_emulator (on by default): the laplace and ensemble_scatter jobs fit the
    scatter with the emulator offset, so they wait for the emulator file and pass it on; with
    the option off (or a scatter kind without covariates) they do not."""
    def commands(step, *args):
        text = dry_run("-p", *args)
        return [line for line in text.splitlines() if f"pipeline.steps.{step} " in line]

    on = "laplace={scatter_emulator: true}"
    for option in ([], ["--config", on]):
        found = commands("laplace", *option)
        assert found and all("--emulator results/model/emulator.npz --out" in c for c in found)
    for off in ("laplace={scatter_emulator: false}",
                "laplace={scatter: constant, scatter_emulator: true}"):
        found = commands("laplace", "--config", off)
        assert found and not any("--emulator" in c for c in found), off
    found = commands("laplace", "--config", on, "ensemble={members: 2}")
    assert len(found) == 2
    assert all("--emulator results/model/member-0/emulator.npz" in c for c in found)
    found = commands("ensemble_scatter", "--config", on, "ensemble={members: 2}")
    assert len(found) == 1 and "--emulator results/model/member-0/emulator.npz" in found[0]


def test_config_overrides_reach_the_dag(dry_run):
    counts = job_counts(dry_run("--config", "jacobian={shards: 5, splits: [test]}"))
    assert counts["jacobian"] == 5


def test_user_inputs_get_catalogs_and_jacobians(dry_run):
    text = dry_run(
        "--config", f"predict={{inputs: [{{name: mystar, path: '{APSTAR_FILE}', format: apstar}}]}}"
    )
    assert "results/predictions/mystar.fits" in text
    assert "results/jacobians/mystar/shard-0.fits" in text


def test_bad_config_fails_before_running(workflow):
    out = run_snakemake(workflow, "--config", "laplace={curvature: fisher}")
    assert out.returncode != 0
    assert "fisher" in out.stdout + out.stderr


@pytest.mark.parametrize("profile", ["default"])
def test_profiles_dry_run(dry_run, profile):
    dry_run("--profile", f"config/profiles/{profile}")


def test_fewer_shards_than_on_disk_are_the_ones_tables_and_figures_read(workflow, dry_run):
    """Lowering jacobian.shards between two runs: stale shard files of the earlier run stay
    on disk, and neither the tables nor any figure may read them."""
    stale = workflow / "results" / "jacobians" / "test"
    stale.mkdir(parents=True)
    for i in range(5):
        (stale / f"shard-{i}.fits").write_bytes(b"stale")
    try:
        text = dry_run("--printshellcmds", "--config", "jacobian={shards: 2, splits: [test]}")
    finally:
        shutil.rmtree(workflow / "results")
    commands = [line for line in text.splitlines()
                if "pipeline.steps.tables" in line or "pipeline.steps.figures" in line]
    assert any("pipeline.steps.tables" in c for c in commands)
    assert sum("pipeline.steps.figures" in c for c in commands) == 9
    for command in commands:
        shards = re.findall(r"shard-(\d+)\.fits", command)
        assert shards == ["0", "1"], command


def test_tensorflow_steps_get_the_rule_threads(dry_run):
    text = dry_run("--printshellcmds", "--config", "threads=3")
    for step in ("train", "laplace", "emulator", "predict", "jacobian"):
        lines = [line for line in text.splitlines() if f"pipeline.steps.{step} " in line]
        assert lines and all("--threads 1" in line for line in lines), step  # --cores 1


def test_tables_rule_reads_every_split_and_names_every_output(dry_run):
    """The baselines of precision.csv read the train and valid datasets: both are inputs of
    the tables rule (also when predict.splits has no valid), and every output path is passed
    to the step instead of a directory with fixed names."""
    text = dry_run("--printshellcmds", "--config", "predict={splits: [test]}")
    block = text.split("rule tables:")[1].split("\n\n")[0]
    inputs = block.split("input:")[1].split("\n")[0]
    outputs = block.split("output:")[1].split("\n")[0]
    for path in ("results/data/train.fits", "results/data/valid.fits", "results/data/test.fits"):
        assert path in inputs, path
    assert "results/tables/precision.csv" in outputs
    command = next(line for line in text.splitlines() if "pipeline.steps.tables" in line)
    for option, path in (("--train", "results/data/train.fits"),
                         ("--valid", "results/data/valid.fits"),
                         ("--summary", "results/tables/jacobian_summary "),
                         ("--calibration", "results/tables/calibration.csv"),
                         ("--metrics", "results/tables/metrics.json"),
                         ("--precision", "results/tables/precision.csv"),
                         ("--diagnostics", "results/model/diagnostics.json")):
        assert f"{option} {path}" in command, option
    assert "--outdir" not in command
    assert '"tables": {' in command  # its config section reaches the step


def test_paper_target_plans_the_numbers_and_every_figure_as_pdf(dry_run):
    """`snakemake paper`: one numbers job reading the tables, the datasets, the test catalog
    and the benchmark file of every heavy job; one journal-PDF job per figure."""
    text = dry_run("paper", "--printshellcmds", "--configfile", "config/quick.yaml")
    counts = job_counts(text)
    assert counts["paper_numbers"] == 1 and counts["paper_figure"] == 9
    command = next(line for line in text.splitlines() if "pipeline.steps.paper " in line)
    assert "numbers --config-name quick " in command
    assert "--out results/paper/numbers.tex" in command
    benchmarks = re.findall(r"(\w+)=results/benchmarks/(\S+)\.tsv", command)
    assert sorted(benchmarks) == sorted(
        [("data", "data"), ("train", "train"), ("laplace", "laplace"),
         ("emulator", "emulator"), ("tables", "tables"),
         ("predict", "predict/valid"), ("predict", "predict/test")]
        + [("jacobian", f"jacobian/{s}-{i}") for s in ("valid", "test") for i in (0, 1)])
    figures = [line for line in text.splitlines() if "pipeline.steps.figures" in line]
    assert len(figures) == 9
    assert all(re.search(r"--preset journal .*--out results/paper/figures/\w+\.pdf ", line)
               for line in figures)


def test_paper_numbers_name_a_run_with_overrides(dry_run):
    text = dry_run("results/paper/numbers.tex", "--printshellcmds", "--config", "seed=3")
    assert "--config-name config+overrides " in text


def _dag(workflow, *args: str) -> tuple[dict[int, str], set[tuple[int, int]]]:
    """Nodes (id -> label) and edges (parent, child) of ``snakemake --dag``."""
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--dag",
                          *args], cwd=workflow, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    nodes = {int(m[1]): m[2] for m in re.finditer(r'^\s*(\d+)\[label = "([^"]*)"', out.stdout,
                                                    re.M)}
    edges = {(int(m[1]), int(m[2])) for m in re.finditer(r"^\s*(\d+) -> (\d+)", out.stdout, re.M)}
    return nodes, edges


def test_ensemble_members_train_in_parallel_and_predict_waits_for_all(workflow, dry_run):
    """ensemble.members = 3: 3 train and 3 laplace jobs that depend on no other member, one
    ensemble_scatter job after every laplace job, one predict per split that depends on all of
    them; Jacobians and figures use member 0."""
    option = ("--config", "ensemble={members: 3}")
    text = dry_run(*option)
    counts = job_counts(text)
    assert counts["train"] == 3 and counts["laplace"] == 3 and counts["predict"] == 2
    assert counts["ensemble_scatter"] == 1
    assert "results/laplace/ensemble_scatter.npz" in text
    for m in range(3):
        assert f"results/laplace/member-{m}/posterior.npz" in text
        assert f"results/model/member-{m}/model.keras" in text
    nodes, edges = _dag(workflow, *option)
    rule = {i: label.split("\\n")[0] for i, label in nodes.items()}
    parents = {i: {p for p, c in edges if c == i} for i in nodes}
    train = [i for i in nodes if rule[i] == "train"]
    laplace = [i for i in nodes if rule[i] == "laplace"]
    for i in train:
        assert {rule[p] for p in parents[i]} == {"data"}
    # each laplace job needs exactly its own member's network
    assert sorted(next(p for p in parents[i] if rule[p] == "train") for i in laplace) == \
        sorted(train)
    assert all(sum(rule[p] == "train" for p in parents[i]) == 1 for i in laplace)
    (scatter,) = (i for i in nodes if rule[i] == "ensemble_scatter")
    assert set(laplace) <= parents[scatter]
    for i in (i for i in nodes if rule[i] == "predict"):
        assert set(train) | set(laplace) | {scatter} <= parents[i]
    member0 = next(i for i in train if nodes[i].endswith("member: 0"))
    for i in (i for i in nodes if rule[i] == "jacobian"):
        assert {p for p in parents[i] if rule[p] == "train"} == {member0}


def test_one_member_keeps_the_single_model_dag(dry_run):
    text = dry_run("-p")
    assert "results/laplace/posterior.npz" in text and "member-" not in text
    assert "--model results/model --posterior results/laplace/posterior.npz --emulator" in text
    assert "ensemble_scatter" not in text and "--scatter" not in text


def test_ensemble_predict_gets_one_model_and_posterior_per_member(dry_run):
    text = dry_run("-p", "--config", "ensemble={members: 2}")
    pairs = ("--model results/model/member-0 --posterior results/laplace/member-0/posterior.npz "
             "--model results/model/member-1 --posterior results/laplace/member-1/posterior.npz")
    assert (f"{pairs} --scatter results/laplace/ensemble_scatter.npz "
            "--emulator results/model/member-0/emulator.npz --format") in text
    assert ("pipeline.steps.ensemble_scatter --config-json") in text
    assert (f"{pairs} --valid results/data/valid.fits --emulator results/model/member-0/"
            "emulator.npz --out results/laplace/ensemble_scatter.npz") in text
    # a 'likelihood' scatter has no model to refit: the members' Laplace noise, as before
    text = dry_run("-p", "--config", "ensemble={members: 2}", "laplace={scatter: likelihood}")
    assert f"{pairs} --emulator" in text and "ensemble_scatter" not in text
