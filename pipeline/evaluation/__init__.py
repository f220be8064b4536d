"""How good the labels and their error bars are: calibration statistics, per-star quality
flags, and the per-pixel summary of the input Jacobians."""
