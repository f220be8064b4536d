"""The label network: architectures, label scaler, training loop, Laplace callback and
derivative utilities (input Jacobians and Hessians, curvature w.r.t. chosen weights)."""
