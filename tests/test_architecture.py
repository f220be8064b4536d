"""The package's shape: no import cycles, no hidden imports, nothing imports a step, every
module importable on its own, and the steps size TensorFlow's thread pools from --threads."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

PACKAGE = REPO / "pipeline"
SHIMS = {"pipeline.predict", "pipeline.derivatives"}  # documented names of moved modules


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(tree: ast.AST, name: str) -> list[tuple[str, ast.AST]]:
    """(module, node) for every import of a pipeline module in ``tree``, anywhere in it.

    ``from pipeline.x import y`` counts as importing ``pipeline.x.y`` when that is a module;
    importing a submodule also runs its packages' ``__init__``.
    """
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                targets.append(sub if sub in MODULES else node.module)
        for target in targets:
            if target.split(".")[0] != "pipeline":
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                parent = ".".join(parts[:i])
                if parent in MODULES and parent != name and not name.startswith(parent + "."):
                    found.append((parent, node))
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in imported_modules(ast.parse(path.read_text()), name)}
            for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_no_import_cycles():
    """Imports inside functions count too: moving an import into a function hides a cycle
    from the interpreter, not from this test."""
    assert find_cycle(import_graph()) is None


def test_no_pipeline_import_inside_a_function():
    offenders = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                offenders += [f"{name}:{node.lineno} imports {module}"
                              for module, node in imported_modules(func, name)]
    assert not offenders, offenders


def test_no_library_module_imports_a_step():
    graph = import_graph()
    offenders = [f"{name} imports {dep}" for name, deps in graph.items()
                 if not name.startswith("pipeline.steps") and name not in SHIMS
                 for dep in deps if dep.startswith("pipeline.steps")]
    assert not offenders, offenders


def test_importing_the_package_does_not_import_tensorflow():
    code = "import sys, pipeline, pipeline.config, pipeline.cli; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("preset", [None, "20"])
def test_the_package_sets_openblas_idle_threads_to_sleep_before_numpy_loads(preset):
    """A step's interpreter imports the package before NumPy: OpenBLAS's thread timeout is
    then the shortest (its idle threads would otherwise spin on the cores TensorFlow needs),
    unless the user set one."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if preset:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    code = ("import os, sys, pipeline; "
            "print('numpy' in sys.modules, os.environ['OPENBLAS_THREAD_TIMEOUT'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=60, env=env)
    assert out.stdout.split() == ["False", preset or "4"], out.stderr


@pytest.mark.parametrize("order", ["sorted", "reversed", "shuffled"])
def test_all_modules_import_in_any_order_in_a_fresh_interpreter(order):
    """Three orders, each in a fresh interpreter (each pays one TensorFlow import); with the
    acyclic graph above, no order can meet a partially initialized module."""
    names = sorted(MODULES)
    if order == "reversed":
        names.reverse()
    elif order == "shuffled":
        names = list(np.random.default_rng(0).permutation(names))
    code = "\n".join(f"import {name}" for name in names)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


# --------------------------------------------------------------------------------- threads
STEP_STOPS = {  # the first thing each TensorFlow step does after configuring the runtime
    "train": "read_split", "laplace": "load_trained", "predict": "catalog_names",
    "jacobian": "shard_rows",
}


@pytest.mark.parametrize("step", sorted(STEP_STOPS))
def test_a_step_run_with_one_thread_uses_one_intra_op_thread(step):
    code = f"""
import sys
from pipeline.steps import {step} as step  # first, as in `python -m pipeline.steps.{step}`
from pipeline.cli import main
import tensorflow as tf

def stop(*args, **kwargs):
    threading = tf.config.threading
    print("THREADS", threading.get_intra_op_parallelism_threads(),
          threading.get_inter_op_parallelism_threads())
    sys.exit(0)

step.{STEP_STOPS[step]} = stop
argv = ["--threads", "1", "--model", "m", "--train", "t", "--valid", "v", "--out", "o",
        "--outdir", "d", "--posterior", "p", "input"]
parser = step.build_parser()
known = {{a.option_strings[0] for a in parser._actions if a.option_strings}}
args = []
for i, a in enumerate(argv):
    if a.startswith("--") and a in known:
        args += [a, argv[i + 1]]
positional = [a.dest for a in parser._actions if not a.option_strings]
main(step.build_parser, step.run, args + (["input"] if positional else []))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert "THREADS 1 1" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "cuInit" not in out.stderr and "cuda drivers" not in out.stderr, out.stderr


# --------------------------------------------------------------------------- console command
def test_console_command_is_installed_and_names_itself():
    import tomllib

    from pipeline.steps import console

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["stellar-laplace"] == "pipeline.steps.console:main"
    for name in [*console.STEPS, "info"]:
        with pytest.raises(SystemExit) as stop:
            console.main([name, "--help"])
        assert stop.value.code == 0
    assert console.main(["no-such-command"]) == 2


def test_console_help_shows_the_command_as_typed(capsys):
    from pipeline.steps import console

    with pytest.raises(SystemExit):
        console.main(["predict", "--help"])
    assert capsys.readouterr().out.startswith("usage: stellar-laplace predict ")
    assert console.main([]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in console.SUMMARY)


def test_console_help_starts_tensorflow_quietly():
    """The installed command imports the steps; TensorFlow's CUDA probing stays off stderr."""
    out = subprocess.run([sys.executable, "-c", "from pipeline.steps import console; "
                          "console.main(['paper', '--help'])"], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0 and "stellar-laplace paper" in out.stdout, out.stderr[-3000:]
    assert "cuda drivers" not in out.stderr and "cpu_feature_guard" not in out.stderr, out.stderr


def test_console_info_describes_a_model(tiny_model_dir, tiny_posterior_file, capsys):
    from pipeline.steps import console

    assert console.main(["info", str(tiny_model_dir), "--posterior",
                         str(tiny_posterior_file)]) == 0
    out = capsys.readouterr().out
    assert "wavelength grid" in out and "TEFF" in out and "posterior" in out
