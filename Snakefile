# stellar-laplace: spectra -> labels with Laplace error bars and input Jacobians.
# Rules are thin: each shells out to `python -m pipeline.<step>`; no TensorFlow here.
# DAG: data -> train -> laplace -> predict / jacobian -> tables -> figures.
import json
import os
import shlex

import yaml

from snakemake.utils import min_version, validate

from pipeline.config import coerce_types

min_version("9.0")


configfile: "config/config.yaml"


coerce_types(config)  # `--config section='{key: 5}'` delivers nested values as strings
validate(config, "config/schema.yaml")


report: "docs/report/workflow.rst"


OUT = "results"
SPLITS = ["train", "valid", "test"]
INPUTS = {item["name"]: item for item in config["predict"]["inputs"]}
PREDICT_NAMES = list(dict.fromkeys(config["predict"]["splits"] + list(INPUTS)))
JACOBIAN_NAMES = list(dict.fromkeys(config["jacobian"]["splits"] + list(INPUTS)))
SHARDS = range(config["jacobian"]["shards"])
with open(workflow.source_path("docs/report/captions.yaml")) as _fh:
    CAPTIONS = yaml.safe_load(_fh)
FIGURES = list(CAPTIONS)
FIGURE_FORMATS = config["figures"]["formats"]
TABLE_FORMATS = ["fits", "parquet", "csv"]
ENV = "config/envs/pipeline.yaml"


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
        INPUTS[wildcards.name].get("format", "fits")
        if wildcards.name in INPUTS
        else "fits"
    )


wildcard_constraints:
    name="[A-Za-z0-9_.-]+",
    i=r"\d+",
    fig="|".join(FIGURES),


rule all:
    default_target: True
    input:
        expand(
            f"{OUT}/predictions/{{name}}.{{ext}}",
            name=PREDICT_NAMES,
            ext=TABLE_FORMATS,
        ),
        expand(
            f"{OUT}/jacobians/{{name}}/shard-{{i}}.fits", name=JACOBIAN_NAMES, i=SHARDS
        ),
        expand(f"{OUT}/tables/jacobian_summary.{{ext}}", ext=TABLE_FORMATS),
        f"{OUT}/tables/calibration.csv",
        f"{OUT}/tables/metrics.json",
        expand(f"{OUT}/figures/{{fig}}.{{ext}}", fig=FIGURES, ext=FIGURE_FORMATS),


rule data:
    output:
        expand(f"{OUT}/data/{{split}}.fits", split=SPLITS),
    log:
        f"{OUT}/logs/data.log",
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
    params:
        config=step_config(),
        outdir=lambda w, output: os.path.dirname(output[0]),
    shell:
        "python -m pipeline.steps.data --config-json {params.config} --outdir {params.outdir} "
        "> {log} 2>&1"


rule train:
    input:
        train=f"{OUT}/data/train.fits",
        valid=f"{OUT}/data/valid.fits",
    output:
        model=f"{OUT}/model/model.keras",
        scaler=f"{OUT}/model/scaler.json",
        history=f"{OUT}/model/history.csv",
        wave=f"{OUT}/model/wave.npy",
    log:
        f"{OUT}/logs/train.log",
    conda:
        ENV
    threads: config["threads"]
    resources:
        mem_mb=8000,
        gpu=config["gpus"],
    params:
        config=step_config("model", "train"),
        outdir=lambda w, output: os.path.dirname(output.model),
    shell:
        "python -m pipeline.steps.train --config-json {params.config} --train {input.train} "
        "--valid {input.valid} --outdir {params.outdir} > {log} 2>&1"


rule laplace:
    input:
        model=rules.train.output.model,
        scaler=rules.train.output.scaler,
        train=f"{OUT}/data/train.fits",
        valid=f"{OUT}/data/valid.fits",
    output:
        posterior=f"{OUT}/laplace/posterior.npz",
    log:
        f"{OUT}/logs/laplace.log",
    conda:
        ENV
    threads: config["threads"]
    resources:
        mem_mb=8000,
        gpu=config["gpus"],
    params:
        config=step_config("laplace"),
        model=lambda w, input: os.path.dirname(input.model),
    shell:
        "python -m pipeline.steps.laplace --config-json {params.config} "
        "--model {params.model} --train {input.train} --valid {input.valid} "
        "--out {output.posterior} > {log} 2>&1"


rule predict:
    input:
        spectra=spectra_input,
        model=rules.train.output.model,
        scaler=rules.train.output.scaler,
        posterior=rules.laplace.output.posterior,
    output:
        expand(f"{OUT}/predictions/{{{{name}}}}.{{ext}}", ext=TABLE_FORMATS),
    log:
        f"{OUT}/logs/predict/{{name}}.log",
    conda:
        ENV
    threads: config["threads"]
    resources:
        mem_mb=6000,
    params:
        config=step_config("predict"),
        model=lambda w, input: os.path.dirname(input.model),
        outdir=lambda w, output: os.path.dirname(output[0]),
        format=spectra_format,
    shell:
        "python -m pipeline.steps.predict --config-json {params.config} --model {params.model} "
        "--posterior {input.posterior} --format {params.format} --name {wildcards.name} "
        "--out {params.outdir} {input.spectra} > {log} 2>&1"


rule jacobian:
    input:
        spectra=spectra_input,
        model=rules.train.output.model,
        scaler=rules.train.output.scaler,
    output:
        f"{OUT}/jacobians/{{name}}/shard-{{i}}.fits",
    log:
        f"{OUT}/logs/jacobian/{{name}}-{{i}}.log",
    conda:
        ENV
    threads: config["threads"]
    resources:
        mem_mb=4000,
        gpu=config["gpus"],
    params:
        config=step_config("jacobian"),
        model=lambda w, input: os.path.dirname(input.model),
        format=spectra_format,
        shards=config["jacobian"]["shards"],
    shell:
        "python -m pipeline.steps.jacobian --config-json {params.config} --model {params.model} "
        "--format {params.format} --shard {wildcards.i} --shards {params.shards} "
        "--out {output} {input.spectra} > {log} 2>&1"


rule tables:
    input:
        predictions=expand(
            f"{OUT}/predictions/{{name}}.fits", name=config["predict"]["splits"]
        ),
        jacobians=expand(
            f"{OUT}/jacobians/{{name}}/shard-{{i}}.fits",
            name=config["jacobian"]["splits"][-1],
            i=SHARDS,
        ),
        history=rules.train.output.history,
        data=expand(f"{OUT}/data/{{name}}.fits", name=config["predict"]["splits"]),
    output:
        summary=report(
            expand(f"{OUT}/tables/jacobian_summary.{{ext}}", ext=["csv"]),
            caption="docs/report/jacobian_summary.rst",
            category="Tables",
        ),
        summary_other=expand(
            f"{OUT}/tables/jacobian_summary.{{ext}}", ext=["fits", "parquet"]
        ),
        calibration=report(
            f"{OUT}/tables/calibration.csv",
            caption="docs/report/calibration_table.rst",
            category="Tables",
        ),
        metrics=report(
            f"{OUT}/tables/metrics.json",
            caption="docs/report/metrics.rst",
            category="Tables",
        ),
    log:
        f"{OUT}/logs/tables.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
    params:
        config=step_config("predict", "jacobian"),
        outdir=lambda w, output: os.path.dirname(output.calibration),
    shell:
        "python -m pipeline.steps.tables --config-json {params.config} "
        "--predictions {input.predictions} --jacobians {input.jacobians} --data {input.data} "
        "--outdir {params.outdir} > {log} 2>&1"


rule figure:
    input:
        data=expand(f"{OUT}/data/{{split}}.fits", split=SPLITS),
        history=rules.train.output.history,
        posterior=rules.laplace.output.posterior,
        predictions=rules.tables.input.predictions,
        jacobians=rules.tables.input.jacobians,
        summary=f"{OUT}/tables/jacobian_summary.fits",
        calibration=rules.tables.output.calibration,
    output:
        report(
            f"{OUT}/figures/{{fig}}.{FIGURE_FORMATS[0]}",
            caption="docs/report/figure.rst",
            category="Figures",
            labels={"figure": "{fig}"},
        ),
        expand(f"{OUT}/figures/{{{{fig}}}}.{{ext}}", ext=FIGURE_FORMATS[1:]),
    log:
        f"{OUT}/logs/figures/{{fig}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
    params:
        config=step_config("predict", "jacobian", "figures"),
        caption=lambda w: CAPTIONS[w.fig],
        results=lambda w, input: os.path.dirname(os.path.dirname(input.history)),
        outdir=lambda w, output: os.path.dirname(output[0]),
    shell:
        "python -m pipeline.steps.figures --config-json {params.config} --figure {wildcards.fig} "
        "--results {params.results} --outdir {params.outdir} > {log} 2>&1"
