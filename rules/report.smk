# Stage 4: tables and paper figures.


rule tables:
    input:
        predictions=expand(
            f"{OUT}/predictions/{{name}}.fits", name=config["predict"]["splits"]
        ),
        jacobians=expand(
            f"{OUT}/jacobians/{{name}}/shard-{{i}}.fits", name=JACOBIAN_SPLIT, i=SHARDS
        ),
        data=expand(f"{OUT}/data/{{name}}.fits", name=config["predict"]["splits"]),
        train=f"{OUT}/data/train.fits",  # the baselines of precision.csv
        valid=f"{OUT}/data/valid.fits",
        diagnostics=FIRST_MEMBER["diagnostics"],  # dead units etc. into metrics.json
    output:
        summary=report(
            expand(f"{OUT}/tables/jacobian_summary.{{ext}}", ext=["csv"]),
            caption="../docs/report/jacobian_summary.rst",
            category="Tables",
        ),
        summary_other=expand(
            f"{OUT}/tables/jacobian_summary.{{ext}}", ext=["fits", "parquet"]
        ),
        calibration=report(
            f"{OUT}/tables/calibration.csv",
            caption="../docs/report/calibration_table.rst",
            category="Tables",
        ),
        metrics=report(
            f"{OUT}/tables/metrics.json",
            caption="../docs/report/metrics.rst",
            category="Tables",
        ),
        precision=report(
            f"{OUT}/tables/precision.csv",
            caption="../docs/report/precision.rst",
            category="Tables",
        ),
    log:
        f"{OUT}/logs/tables.log",
    benchmark:
        f"{OUT}/benchmarks/tables.tsv"
    conda:
        ENV
    threads: config["threads"]  # BLAS threads of the baseline fits (OPENBLAS_NUM_THREADS)
    resources:
        mem_mb=4000,
    params:
        config=step_config("predict", "jacobian", "tables"),
        summary=lambda w, output: os.path.splitext(output.summary[0])[0],
    shell:
        "python -m pipeline.steps.tables --config-json {params.config} "
        "--predictions {input.predictions} --jacobians {input.jacobians} --data {input.data} "
        "--train {input.train} --valid {input.valid} --diagnostics {input.diagnostics} "
        "--summary {params.summary} "
        "--calibration {output.calibration} --metrics {output.metrics} "
        "--precision {output.precision} > {log} 2>&1"


rule figure:
    input:
        train=f"{OUT}/data/train.fits",
        jacobian_data=f"{OUT}/data/{JACOBIAN_SPLIT}.fits",
        history=FIRST_MEMBER["history"],
        posterior=FIRST_MEMBER["posterior"],
        catalog=f"{OUT}/predictions/{FIGURE_SPLIT}.fits",
        summary=f"{OUT}/tables/jacobian_summary.fits",
        jacobians=rules.tables.input.jacobians,
    output:
        report(
            f"{OUT}/figures/{{fig}}.{FIGURE_FORMATS[0]}",
            caption="../docs/report/figure.rst",
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
    shell:
        "python -m pipeline.steps.figures --config-json {params.config} --figure {wildcards.fig} "
        "--train {input.train} --jacobian-data {input.jacobian_data} "
        "--history {input.history} --posterior {input.posterior} --catalog {input.catalog} "
        "--summary {input.summary} --jacobians {input.jacobians} --out {output} "
        "> {log} 2>&1"
