# Stage 1: the train / valid / test spectra.


rule data:
    output:
        expand(f"{OUT}/data/{{split}}.fits", split=SPLITS),
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
        outdir=lambda w, output: os.path.dirname(output[0]),
    shell:
        "python -m pipeline.steps.data --config-json {params.config} --outdir {params.outdir} "
        "> {log} 2>&1"
