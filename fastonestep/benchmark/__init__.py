"""Benchmarks. `fastonestep.benchmark.kernels`: the fused-loss harness behind `fastonestep bench kernels`.

Only numbers measured on a GPU are performance claims; CPU rows are smoke runs of the harness and are
tagged `is_claim=false`.
"""
