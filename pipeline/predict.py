"""``python -m pipeline.predict``: the predict step under its documented short name.

Labels with a full 3x3 error budget for any spectra; see :mod:`pipeline.steps.predict`.
"""

from pipeline.cli import main
from pipeline.steps.predict import build_parser, run

__all__ = ["build_parser", "run"]

if __name__ == "__main__":
    raise SystemExit(main(build_parser, run))
