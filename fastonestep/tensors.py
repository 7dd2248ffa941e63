"""Python numbers as device tensors without a host synchronisation.

`torch.tensor(2.5, device="cuda")` and `torch.as_tensor(2.5, device="cuda")` build the value on the CPU and copy
it over with a blocking copy: the CPU waits until the GPU has drained its queue, once per call, and can no longer
run ahead launching kernels. `torch.full` passes the number to a fill kernel as an argument and never waits.
A training step makes such tensors every iteration (the generator's noise level, alpha = 1 of VE noising), so
every place that turns "a number or a tensor" into a device tensor goes through `device_tensor`.
"""
from __future__ import annotations

import numpy as np
import torch


def device_tensor(v, dtype: torch.dtype, device) -> torch.Tensor:
    """`v` (a Python or NumPy number, a tensor, or a sequence) as a tensor of `dtype` on `device`. A number
    becomes a 0-d fill (no copy, no synchronisation); a tensor is cast / moved as torch.as_tensor would. A
    sequence still takes a blocking copy to a GPU: build those once, outside the training loop."""
    if isinstance(v, (int, float)):  # bool and numpy.float64 included
        return torch.full((), float(v), dtype=dtype, device=device)
    return torch.as_tensor(v, dtype=dtype, device=device)


def python_floats(values, dtype: torch.dtype = torch.float32) -> list[float]:
    """A tensor, a number or a sequence of numbers as a list of Python floats, without making a tensor of Python
    data. Numbers are rounded to `dtype` first, exactly as torch.as_tensor(values, dtype) would round them; a
    tensor keeps its own values (reading one that lives on a GPU costs a synchronisation)."""
    if isinstance(values, torch.Tensor):
        return [float(v) for v in values.reshape(-1).tolist()]
    rounded = np.asarray(values, dtype={torch.float32: np.float32, torch.float64: np.float64}[dtype])
    return [float(v) for v in rounded.reshape(-1).tolist()]
