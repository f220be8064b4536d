# Stage 1: the train / valid / test spectra.


rule data:
    output:
        **{split: f"{OUT}/data/{split}.fits" for split in SPLITS},
    log:
        f"{OUT}/logs/data.log",
    benchmark:
        f"{OUT}/benchmarks/data.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
    params:
        config=step_config(),
    shell:
        "python -m pipeline.steps.data --config-json {params.config} --train {output.train} "
        "--valid {output.valid} --test {output.test} > {log} 2>&1"
