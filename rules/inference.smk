# Stage 3: labels with error budgets and input Jacobians for every split and input.


rule predict:
    input:
        **MODEL_FILES,
        spectra=spectra_input,
        posterior=rules.laplace.output.posterior,
        emulator=rules.emulator.output.emulator,
    output:
        expand(f"{OUT}/predictions/{{{{name}}}}.{{ext}}", ext=TABLE_FORMATS),
    log:
        f"{OUT}/logs/predict/{{name}}.log",
    benchmark:
        f"{OUT}/benchmarks/predict/{{name}}.tsv"
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
        "python -m pipeline.steps.predict --config-json {params.config} --threads {threads} "
        "--model {params.model} "
        "--posterior {input.posterior} --emulator {input.emulator} "
        "--format {params.format} --name {wildcards.name} "
        "--out {params.outdir} {input.spectra} > {log} 2>&1"


rule jacobian:
    input:
        **MODEL_FILES,
        spectra=spectra_input,
    output:
        f"{OUT}/jacobians/{{name}}/shard-{{i}}.fits",
    log:
        f"{OUT}/logs/jacobian/{{name}}-{{i}}.log",
    benchmark:
        f"{OUT}/benchmarks/jacobian/{{name}}-{{i}}.tsv"
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
        "python -m pipeline.steps.jacobian --config-json {params.config} --threads {threads} "
        "--model {params.model} "
        "--format {params.format} --shard {wildcards.i} --shards {params.shards} "
        "--out {output} {input.spectra} > {log} 2>&1"
