# Constants and input functions shared by the rule files.
import json
import os
import shlex

import yaml

from pipeline.artifacts.model_dir import (
    DIAGNOSTICS_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    SCALER_FILE,
    WAVE_FILE,
)
from pipeline.artifacts.members import (
    ensemble_scatter_path,
    log_name,
    member_seed,
    model_dir,
    posterior_path,
)
from pipeline.config import scatter_uses_emulator
from pipeline.evaluation.shift import EMULATOR_FILE

OUT = "results"
SPLITS = ["train", "valid", "test"]
INPUTS = {item["name"]: item for item in config["predict"]["inputs"]}
PREDICT_NAMES = list(dict.fromkeys(config["predict"]["splits"] + list(INPUTS)))
JACOBIAN_NAMES = list(dict.fromkeys(config["jacobian"]["splits"] + list(INPUTS)))
SHARDS = range(config["jacobian"]["shards"])
# the split whose Jacobians the tables and figures summarize
JACOBIAN_SPLIT = config["jacobian"]["splits"][-1]
# the prediction catalog of the paper figures
PREDICTED = config["predict"]["splits"]
FIGURE_SPLIT = "test" if "test" in PREDICTED else PREDICTED[-1]
with open(workflow.source_path("../docs/report/captions.yaml")) as _fh:
    CAPTIONS = yaml.safe_load(_fh)
FIGURES = list(CAPTIONS)
FIGURE_FORMATS = config["figures"]["formats"]
TABLE_FORMATS = ["fits", "parquet", "csv"]
# conda environment, relative to the rule files
ENV = "../config/envs/pipeline.yaml"
# the model directories and posteriors of the ensemble members (pipeline.artifacts.members):
# with ensemble.members = 1 the single-model paths, else patterns over the {member} wildcard
MEMBERS = config["ensemble"]["members"]
MEMBER_IDS = range(MEMBERS)
MODEL_DIR = model_dir(OUT, MEMBERS)
MODEL_FILES = {
    "model": f"{MODEL_DIR}/{MODEL_FILE}",
    "scaler": f"{MODEL_DIR}/{SCALER_FILE}",
    "wave": f"{MODEL_DIR}/{WAVE_FILE}",
}
HISTORY = f"{MODEL_DIR}/{HISTORY_FILE}"
DIAGNOSTICS = f"{MODEL_DIR}/{DIAGNOSTICS_FILE}"
POSTERIOR = posterior_path(OUT, MEMBERS)
# every member's files (predict combines them) and member 0's (Jacobians and figures)
ALL_MEMBERS = {
    key: expand(path, member=MEMBER_IDS)
    for key, path in {**MODEL_FILES, "posterior": POSTERIOR}.items()
}
FIRST_MEMBER = {
    key: expand(path, member=[0])[0]
    for key, path in {
        **MODEL_FILES,
        "history": HISTORY,
        "diagnostics": DIAGNOSTICS,
        "posterior": POSTERIOR,
    }.items()
}
# the mixture's own scatter model, refitted on its validation residuals once every member's
# laplace job is done (rule ensemble_scatter); none for one model or a 'likelihood' scatter
ENSEMBLE_SCATTER = (
    {"scatter": ensemble_scatter_path(OUT)}
    if MEMBERS > 1 and config["laplace"]["scatter"] != "likelihood"
    else {}
)
# reference of the label-free shift flags (pipeline.evaluation.shift), fitted for member 0
EMULATOR = f"{expand(MODEL_DIR, member=[0])[0]}/{EMULATOR_FILE}"
# the emulator file as an input of the scatter fits that take the offset of the predicted
# labels from the emulator's (laplace.scatter_emulator)
SCATTER_EMULATOR = (
    {"emulator": EMULATOR} if scatter_uses_emulator(config["laplace"]) else {}
)


def emulator_arg(wildcards, input):
    """``--emulator FILE `` (its trailing space keeps the command's spacing) when the rule's
    input has the emulator file, else nothing."""
    return f"--emulator {input.emulator} " if "emulator" in input.keys() else ""


def step_config(*sections, seed=None):
    """The validated config sections a step reads, as a shell-quoted JSON argument.

    Passing only these sections means Snakemake reruns a step when its own settings change.
    ``seed`` replaces the config seed (an ensemble member's).
    """
    keys = ("seed", "deterministic", "data") + sections
    cfg = {k: config[k] for k in dict.fromkeys(keys)}
    if seed is not None:
        cfg["seed"] = seed
    return shlex.quote(json.dumps(cfg))


def member_step_config(*sections):
    """``step_config`` of an ensemble member's job, with the member's seed.

    A string with one member (the seed is unchanged), else a function of the wildcards.
    """
    if MEMBERS == 1:
        return step_config(*sections)
    return lambda w: step_config(
        *sections, seed=member_seed(config["seed"], MEMBERS, int(w.member))
    )


def member_args(wildcards, input):
    """``--model DIR --posterior FILE`` of every member, in member order, then ``--scatter F``
    when the rule's input has the ensemble's scatter file."""
    pairs = [
        f"--model {os.path.dirname(m)} --posterior {p}"
        for m, p in zip(input.model, input.posterior)
    ]
    if "scatter" in input.keys():
        pairs.append(f"--scatter {input.scatter}")
    return " ".join(pairs)


def spectra_input(wildcards):
    """Spectra file of a split or of a user input named in predict.inputs."""
    if wildcards.name in INPUTS:
        return INPUTS[wildcards.name]["path"]
    return f"{OUT}/data/{wildcards.name}.fits"


def spectra_format(wildcards):
    return (
        INPUTS[wildcards.name].get("format", "auto")
        if wildcards.name in INPUTS
        else "fits"
    )
