# Stage 5: the paper: every quoted number as a LaTeX macro, every figure as a journal PDF.
#   snakemake paper --configfile config/quick.yaml --cores all
#   snakemake paper --configfile config/quick.yaml --report results/paper/report.zip

PAPER = f"{OUT}/paper"
# the name a paper and the README quote the results under: the stem of the last --configfile
# (config/config.yaml when none), marked when --config overrides change it
_CONFIGFILES = workflow.config_settings.configfiles
_STEM = (
    os.path.splitext(os.path.basename(_CONFIGFILES[-1]))[0]
    if _CONFIGFILES
    else "config"
)
CONFIG_NAME = f"{_STEM}+overrides" if workflow.config_settings.config else _STEM
# the benchmark file of every job of the heavy rules, as RULE=FILE
BENCHMARKS = {
    "data": [rules.data.benchmark],
    "train": expand(rules.train.benchmark, member=MEMBER_IDS),
    "laplace": expand(rules.laplace.benchmark, member=MEMBER_IDS),
    "emulator": [rules.emulator.benchmark],
    "predict": expand(rules.predict.benchmark, name=PREDICT_NAMES),
    "jacobian": expand(rules.jacobian.benchmark, name=JACOBIAN_NAMES, i=SHARDS),
    "tables": [rules.tables.benchmark],
}


rule paper:
    input:
        f"{PAPER}/numbers.tex",
        expand(f"{PAPER}/figures/{{fig}}.pdf", fig=FIGURES),


rule paper_numbers:
    input:
        metrics=rules.tables.output.metrics,
        calibration=rules.tables.output.calibration,
        precision=rules.tables.output.precision,
        data=rules.data.output,
        catalog=f"{OUT}/predictions/{FIGURE_SPLIT}.fits",
        benchmarks=[path for paths in BENCHMARKS.values() for path in paths],
    output:
        report(
            f"{PAPER}/numbers.tex",
            caption="../docs/report/numbers.rst",
            category="Paper",
        ),
    log:
        f"{OUT}/logs/paper/numbers.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
    params:
        config=step_config(*config),  # the whole config: its hash names the run
        name=shlex.quote(CONFIG_NAME),
        data=" ".join(f"{split}={path}" for split, path in rules.data.output.items()),
        benchmarks=" ".join(
            f"{rule}={path}" for rule, paths in BENCHMARKS.items() for path in paths
        ),
    shell:
        "python -m pipeline.steps.paper --config-json {params.config} numbers "
        "--config-name {params.name} --metrics {input.metrics} "
        "--calibration {input.calibration} --precision {input.precision} "
        "--data {params.data} --catalog {input.catalog} "
        "--benchmarks {params.benchmarks} --out {output} > {log} 2>&1"


rule paper_figure:
    input:
        **rules.figure.input,
    output:
        report(
            f"{PAPER}/figures/{{fig}}.pdf",
            caption="../docs/report/figure.rst",
            category="Paper figures",
            labels={"figure": "{fig}"},
        ),
    log:
        f"{OUT}/logs/paper/figures/{{fig}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
    params:
        config=step_config("predict", "jacobian", "figures", "paper"),
        preset=config["paper"]["preset"],
        caption=lambda w: CAPTIONS[w.fig],
    shell:
        "python -m pipeline.steps.figures --config-json {params.config} --figure {wildcards.fig} "
        "--preset {params.preset} "
        "--train {input.train} --jacobian-data {input.jacobian_data} "
        "--history {input.history} --posterior {input.posterior} --catalog {input.catalog} "
        "--summary {input.summary} --jacobians {input.jacobians} --out {output} "
        "> {log} 2>&1"
