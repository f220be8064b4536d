"""Paper figures, one module per theme; ``pipeline.steps.figures`` is the command line.

Every plotting function has the signature ``plot(results: FigureInputs, cfg: dict) -> Figure``:
it reads (and checks) its inputs through :class:`pipeline.plots.inputs.FigureInputs` before
drawing anything, uses the shared style of :mod:`pipeline.plots.style`, and returns the figure
for :func:`pipeline.plots.style.save_figure` to write atomically in every configured format.
"""
