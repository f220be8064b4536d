"""stellar-laplace: stellar labels from spectra with Laplace error bars and input Jacobians.

The package is organised one concern per module (see docs/architecture.md). Importing the
package itself is cheap and never imports TensorFlow, so the Snakefile and command-line
helpers stay fast; modules that need TensorFlow import it themselves.
"""

__version__ = "0.1.0"

LABELS = ("TEFF", "LOGG", "FE_H")
"""Label order used everywhere: outputs, Jacobians, covariances."""

LABEL_UNITS = {"TEFF": "K", "LOGG": "log10(cm s-2)", "FE_H": "dex"}
"""Units of the labels (FITS units in pipeline.artifacts.catalog.FITS_UNITS; the others go
into the column descriptions, as 'dex' is not a FITS unit)."""
