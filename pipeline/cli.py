"""Shared command-line plumbing for ``python -m pipeline.<step>``.

Each step module defines ``build_parser()`` and ``run(args)``; ``main(...)`` parses the
arguments, loads the configuration, and turns a :class:`PipelineError` into a one-line message
on stderr and exit status 1 (no traceback spam). Logging goes to stderr, which the Snakefile
redirects into each rule's ``log:`` file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from pipeline.config import load_config
from pipeline.exceptions import PipelineError

log = logging.getLogger("pipeline")


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the configuration options every step accepts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--configfile", help="YAML configuration (validated against the schema)")
    parser.add_argument("--config-json", help="configuration as JSON (used by the Snakefile)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set laplace.last_layers=3",
    )
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="threads for TensorFlow's op pools (Snakemake passes {threads}); "
                             "default: TensorFlow's choice")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def main(
    build_parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace, dict], None],
    argv: list[str] | None = None,
) -> int:
    """Parse ``argv``, load the config into ``run(args, config)``, map errors to exit codes."""
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        config = load_config(args.configfile, json_text=args.config_json, overrides=args.set)
        run(args, config)
    except PipelineError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
