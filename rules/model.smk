# Stage 2: the network and the Laplace posterior of its last layers; with ensemble.members > 1
# one train and one laplace job per {member}, independent of each other, then one
# ensemble_scatter job that refits the scatter model on the mixture's validation residuals.


rule train:
    input:
        train=f"{OUT}/data/train.fits",
        valid=f"{OUT}/data/valid.fits",
    output:
        **MODEL_FILES,
        history=HISTORY,
        diagnostics=DIAGNOSTICS,
    log:
        f"{OUT}/logs/{log_name('train', MEMBERS)}.log",
    benchmark:
        f"{OUT}/benchmarks/{log_name('train', MEMBERS)}.tsv"
    conda:
        ENV
    threads: config["threads"]
    resources:
        mem_mb=8000,
        gpu=config["gpus"],
    params:
        config=member_step_config("model", "train"),
        outdir=lambda w, output: os.path.dirname(output.model),
    shell:
        "python -m pipeline.steps.train --config-json {params.config} --threads {threads} "
        "--train {input.train} --valid {input.valid} --outdir {params.outdir} > {log} 2>&1"


rule laplace:
    input:
        **MODEL_FILES,
        **SCATTER_EMULATOR,
        train=f"{OUT}/data/train.fits",
        valid=f"{OUT}/data/valid.fits",
    output:
        posterior=POSTERIOR,
    log:
        f"{OUT}/logs/{log_name('laplace', MEMBERS)}.log",
    benchmark:
        f"{OUT}/benchmarks/{log_name('laplace', MEMBERS)}.tsv"
    conda:
        ENV
    threads: config["threads"]
    resources:
        mem_mb=8000,
        gpu=config["gpus"],
    params:
        config=member_step_config("laplace"),
        model=lambda w, input: os.path.dirname(input.model),
        emulator=emulator_arg,
    shell:
        "python -m pipeline.steps.laplace --config-json {params.config} --threads {threads} "
        "--model {params.model} --train {input.train} --valid {input.valid} "
        "{params.emulator}--out {output.posterior} > {log} 2>&1"


rule ensemble_scatter:
    input:
        **ALL_MEMBERS,
        **SCATTER_EMULATOR,
        valid=f"{OUT}/data/valid.fits",
    output:
        scatter=ensemble_scatter_path(OUT),
    log:
        f"{OUT}/logs/ensemble_scatter.log",
    benchmark:
        f"{OUT}/benchmarks/ensemble_scatter.tsv"
    conda:
        ENV
    threads: config["threads"]
    resources:
        mem_mb=6000,
    params:
        config=step_config("laplace", "predict"),
        members=member_args,
        emulator=emulator_arg,
    shell:
        "python -m pipeline.steps.ensemble_scatter --config-json {params.config} "
        "--threads {threads} {params.members} --valid {input.valid} "
        "{params.emulator}--out {output.scatter} > {log} 2>&1"


rule emulator:
    input:
        **{key: FIRST_MEMBER[key] for key in MODEL_FILES},
        train=f"{OUT}/data/train.fits",
        valid=f"{OUT}/data/valid.fits",
    output:
        emulator=EMULATOR,
    log:
        f"{OUT}/logs/emulator.log",
    benchmark:
        f"{OUT}/benchmarks/emulator.tsv"
    conda:
        ENV
    threads: config["threads"]
    resources:
        mem_mb=8000,
    params:
        config=step_config("emulator"),
        model=lambda w, input: os.path.dirname(input.model),
    shell:
        "python -m pipeline.steps.emulator --config-json {params.config} --threads {threads} "
        "--model {params.model} --train {input.train} --valid {input.valid} "
        "--out {output.emulator} > {log} 2>&1"
