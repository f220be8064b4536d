"""Spectra: the Spectra model, canonical FITS I/O and validation, wavelength grids, the
synthetic generator and its line list, APOGEE apStar and allStar ingest with the DR17 bitmasks.
No TensorFlow here."""
