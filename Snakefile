# stellar-laplace: spectra -> labels with Laplace error bars and input Jacobians.
# Rules (rules/*.smk, one file per stage) are thin: each shells out to
# `python -m pipeline.steps.<step>`; no TensorFlow here.
# DAG: data -> train -> laplace, emulator -> predict / jacobian -> tables -> figures; with
# ensemble.members > 1, train and laplace run once per member, ensemble_scatter refits the
# scatter model on the mixture's validation residuals, and predict combines them.
# `snakemake paper` adds the paper numbers (LaTeX macros) and the figures as journal PDFs
# (rules/paper.smk).
from snakemake.utils import min_version, validate

from pipeline.config import coerce_types

min_version("9.0")


configfile: "config/config.yaml"


coerce_types(config)  # `--config section='{key: 5}'` delivers nested values as strings
validate(config, "config/schema.yaml")


report: "docs/report/workflow.rst"


include: "rules/common.smk"


wildcard_constraints:
    name="[A-Za-z0-9_.-]+",
    i=r"\d+",
    member=r"\d+",
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
        f"{OUT}/tables/precision.csv",
        expand(f"{OUT}/figures/{{fig}}.{{ext}}", fig=FIGURES, ext=FIGURE_FORMATS),


include: "rules/data.smk"
include: "rules/model.smk"
include: "rules/inference.smk"
include: "rules/report.smk"
include: "rules/paper.smk"
