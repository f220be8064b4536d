"""Exceptions raised by the pipeline.

Every message names where the problem is (file, HDU, column, row or config key) and what would
fix it. The command-line entry points (pipeline.cli.main) print the message and exit non-zero
without a traceback.
"""


class PipelineError(Exception):
    """Base class of every error a user can meet."""


class ConfigError(PipelineError, ValueError):
    """A configuration value is missing, of the wrong type, out of range or unknown."""


class DataError(PipelineError, ValueError):
    """An input spectrum file is unreadable or violates the canonical data contract."""


class GridMismatchError(DataError):
    """Spectra are on a pixel grid that cannot be mapped onto the model's grid."""


class ModelFileError(PipelineError):
    """A model, scaler or posterior file is missing, corrupt or belongs to another model."""


class NumericalError(PipelineError, ArithmeticError):
    """A computation produced non-finite values or a matrix is not positive definite."""


class OutputError(PipelineError, OSError):
    """An output could not be written (unwritable directory, disk full)."""
