"""Command-line steps, one module per Snakemake rule: ``python -m pipeline.steps.<step>``.

Each defines ``build_parser()`` and ``run(args, config)`` and ends with
``raise SystemExit(main(build_parser, run))``. Steps only glue library modules together:
no library module imports a step.
"""
