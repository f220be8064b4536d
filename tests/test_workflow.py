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
                         ("--precision", "results/tables/precision.csv")):
        assert f"{option} {path}" in command, option
    assert "--outdir" not in command
    assert '"tables": {' in command  # its config section reaches the step
