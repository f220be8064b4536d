"""stellar-laplace: stellar labels from spectra with Laplace error bars and input Jacobians.

The package is organised one concern per module (see docs/architecture.md). Importing the
package itself is cheap and never imports TensorFlow, so the Snakefile and command-line
helpers stay fast; modules that need TensorFlow import it themselves.
"""

import os

# OpenBLAS (NumPy's and SciPy's BLAS) keeps its idle threads spinning for 2**28 cycles, about
# a tenth of a second, after every BLAS call, on the cores that TensorFlow's next Jacobian
# batch and the NumPy work after it need (predict alternates the two every batch; measured in
# docs/performance.md). Threads that sleep at once, the shortest timeout, give the cores back.
# OpenBLAS reads it when NumPy loads it, so it is set here, before (``python -m
# pipeline.<step>`` imports this package first), and only where the user has not set it.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"

LABELS = ("TEFF", "LOGG", "FE_H")
"""Label order used everywhere: outputs, Jacobians, covariances."""

LABEL_UNITS = {"TEFF": "K", "LOGG": "log10(cm s-2)", "FE_H": "dex"}
"""Units of the labels (FITS units in pipeline.artifacts.catalog.FITS_UNITS; the others go
into the column descriptions, as 'dex' is not a FITS unit)."""
