# Stage 3: labels with error budgets and input Jacobians for every split and input.


rule predict:
    input:
        **ALL_MEMBERS,
        **ENSEMBLE_SCATTER,
        spectra=spectra_input,
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
        # one --model DIR --posterior FILE pair per ensemble member (and its --scatter)
        members=member_args,
        outdir=lambda w, output: os.path.dirname(output[0]),
        format=spectra_format,
    shell:
        "python -m pipeline.steps.predict --config-json {params.config} --threads {threads} "
        "{params.members} --emulator {input.emulator} "
        "--format {params.format} --name {wildcards.name} "
        "--out {params.outdir} {input.spectra} > {log} 2>&1"


rule jacobian:
    input:
        model=FIRST_MEMBER["model"],
        scaler=FIRST_MEMBER["scaler"],
        wave=FIRST_MEMBER["wave"],
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
