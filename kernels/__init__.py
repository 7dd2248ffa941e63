"""fastonestep.kernels: fused loss kernels (Triton, csrc op) and their eager PyTorch references.

This folder is installed as the subpackage `fastonestep.kernels`; it is never a top-level module.
"""
