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
# the model directory, file names from its one writer and reader (pipeline.artifacts.model_dir)
MODEL_DIR = f"{OUT}/model"
MODEL_FILES = {
    "model": f"{MODEL_DIR}/{MODEL_FILE}",
    "scaler": f"{MODEL_DIR}/{SCALER_FILE}",
    "wave": f"{MODEL_DIR}/{WAVE_FILE}",
}
HISTORY = f"{MODEL_DIR}/{HISTORY_FILE}"
DIAGNOSTICS = f"{MODEL_DIR}/{DIAGNOSTICS_FILE}"
# reference of the label-free shift flags (pipeline.evaluation.shift)
EMULATOR = f"{MODEL_DIR}/{EMULATOR_FILE}"


def step_config(*sections):
    """The validated config sections a step reads, as a shell-quoted JSON argument.

    Passing only these sections means Snakemake reruns a step when its own settings change.
    """
    keys = ("seed", "deterministic", "data") + sections
    return shlex.quote(json.dumps({k: config[k] for k in dict.fromkeys(keys)}))


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
