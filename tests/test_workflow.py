"""The Snakefile: a DAG over every rule, no TensorFlow import, config overrides reach the rules."""

import re
import subprocess
import sys

import pytest

from tests.conftest import APSTAR_FILE, REPO


def dry_run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def job_counts(text: str) -> dict[str, int]:
    block = text.split("Job stats:")[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


def test_snakefile_never_imports_tensorflow():
    text = (REPO / "Snakefile").read_text()
    assert not re.search(r"^\s*(import|from)\s+(tensorflow|keras)", text, re.M)


def test_default_dag_has_every_rule():
    counts = job_counts(dry_run())
    for rule in ("data", "train", "laplace", "predict", "jacobian", "tables", "figure", "all"):
        assert counts.get(rule, 0) >= 1, rule
    assert counts["jacobian"] == 2 * 2  # splits valid, test x 2 shards


def test_config_overrides_reach_the_dag():
    counts = job_counts(dry_run("--config", "jacobian={shards: 5, splits: [test]}"))
    assert counts["jacobian"] == 5


def test_user_inputs_get_catalogs_and_jacobians():
    text = dry_run(
        "--config", f"predict={{inputs: [{{name: mystar, path: '{APSTAR_FILE}', format: apstar}}]}}"
    )
    assert "results/predictions/mystar.fits" in text
    assert "results/jacobians/mystar/shard-0.fits" in text


def test_bad_config_fails_before_running():
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1",
         "--config", "laplace={curvature: fisher}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "fisher" in out.stdout + out.stderr


@pytest.mark.parametrize("profile", ["default"])
def test_profiles_dry_run(profile):
    dry_run("--profile", f"config/profiles/{profile}")
