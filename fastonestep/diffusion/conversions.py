"""Exact conversions between x0-, eps-, v- and flow-velocity predictions, given x_t = alpha x0 + sigma eps.

v follows Salimans & Ho (2022): v = alpha * eps - sigma * x0. The flow velocity is u = eps - x0
(d x_t / dt for the linear schedule alpha = 1 - t, sigma = t). All of them live here and nowhere else.
"""
from __future__ import annotations

import torch

from fastonestep.tensors import device_tensor

KINDS = ("x0", "eps", "v", "flow")


def _b(c, like):
    c = device_tensor(c, like.dtype, like.device)
    return c.reshape((-1,) + (1,) * (like.ndim - 1)) if c.ndim else c


def to_x0(pred: torch.Tensor, kind: str, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    a, s = _b(alpha, x_t), _b(sigma, x_t)
    if kind == "x0":
        return pred
    if kind == "eps":
        return (x_t - s * pred) / a
    if kind == "v":
        return (a * x_t - s * pred) / (a**2 + s**2)
    if kind == "flow":
        return (x_t - s * pred) / (a + s)
    raise ValueError(f"unknown prediction kind {kind!r}; expected one of {KINDS}")


def from_x0(x0: torch.Tensor, kind: str, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    a, s = _b(alpha, x_t), _b(sigma, x_t)
    if kind == "x0":
        return x0
    eps = (x_t - a * x0) / s
    if kind == "eps":
        return eps
    if kind == "v":
        return a * eps - s * x0
    if kind == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction kind {kind!r}; expected one of {KINDS}")


def convert(pred: torch.Tensor, src: str, dst: str, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    return from_x0(to_x0(pred, src, x_t, alpha, sigma), dst, x_t, alpha, sigma)


def score_from_x0(x0: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Tweedie: grad log p_t(x_t) = (alpha * D - x_t) / sigma^2."""
    a, s = _b(alpha, x_t), _b(sigma, x_t)
    return (a * x0 - x_t) / s**2
