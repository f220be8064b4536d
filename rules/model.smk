# Stage 2: the network and the Laplace posterior of its last layers.


rule train:
    input:
        train=f"{OUT}/data/train.fits",
        valid=f"{OUT}/data/valid.fits",
    output:
        **MODEL_FILES,
        history=HISTORY,
        diagnostics=DIAGNOSTICS,
    log:
        f"{OUT}/logs/train.log",
    benchmark:
        f"{OUT}/benchmarks/train.tsv"
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
        "python -m pipeline.steps.train --config-json {params.config} --threads {threads} "
        "--train {input.train} --valid {input.valid} --outdir {params.outdir} > {log} 2>&1"


rule laplace:
    input:
        **MODEL_FILES,
        train=f"{OUT}/data/train.fits",
        valid=f"{OUT}/data/valid.fits",
    output:
        posterior=f"{OUT}/laplace/posterior.npz",
    log:
        f"{OUT}/logs/laplace.log",
    benchmark:
        f"{OUT}/benchmarks/laplace.tsv"
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
        "python -m pipeline.steps.laplace --config-json {params.config} --threads {threads} "
        "--model {params.model} --train {input.train} --valid {input.valid} "
        "--out {output.posterior} > {log} 2>&1"


rule emulator:
    input:
        **MODEL_FILES,
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
