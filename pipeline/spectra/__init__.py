"""Spectra: the Spectra model, canonical FITS I/O and validation, wavelength grids, the
synthetic generator and its line list, and APOGEE apStar ingest. No TensorFlow here."""
