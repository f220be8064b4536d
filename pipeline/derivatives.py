"""Derivative utilities under their documented short name; see :mod:`pipeline.nn.derivatives`.

    from pipeline.derivatives import input_jacobian, input_hessian, hessian_diagonal
"""

from pipeline.nn.derivatives import (
    hessian_diagonal,
    input_hessian,
    input_jacobian,
    loss_hessian,
)

__all__ = ["hessian_diagonal", "input_hessian", "input_jacobian", "loss_hessian"]
