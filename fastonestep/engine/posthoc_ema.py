"""Post-hoc EMA (EDM2, Karras et al. 2024): during training, track power-function EMAs of the network and save
snapshots of them; afterwards, build the EMA of any width as a linear combination of the snapshots, without
training again (`fastonestep ema RUN --std 0.07`).

A power-function EMA with exponent gamma averages, when T images have been seen, the weights seen at t <= T
with density p(t) = (gamma + 1) t^gamma / T^(gamma + 1). Its width relative to T (config key train.ema_stds) is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))),   gamma >= 0, so sigma_rel <= 1 / sqrt(12).

After a batch of b images that ends at T the update is ema <- beta ema + (1 - beta) theta with
beta = (1 - b / T)^(gamma + 1). With this beta the k-th batch gets exactly p's mass over its images,
((k b)^(gamma+1) - ((k-1) b)^(gamma+1)) / T^(gamma+1) (a product of betas telescopes), whatever the batch size.

Reconstruction: with the snapshots' profiles p_i (gamma_i, T_i) and the target profile p*, the coefficients c
minimise || sum_i c_i p_i - p* || in L2(0, inf) subject to sum_i c_i = 1 (every profile has mass 1, so a weight
that does not change is reproduced exactly); the weights are sum_i c_i theta_i. The inner products are in
closed form, with m = min(T_a, T_b):

    <p_a, p_b> = (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) T_a^(g_a + 1) T_b^(g_b + 1)).

The power EMAs are EMAs (engine/ema.py) with another beta, so under ZeRO they are sharded like the optimizer's
master weights too, and checkpoints hold them whole.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fastonestep.engine.ema import EMA

MAX_STD = 1.0 / math.sqrt(12.0)  # gamma = 0: the uniform average of the whole run
SNAPSHOT_DIR = "posthoc_ema"
_SNAPSHOT_NAME = re.compile(r"^ema-(?P<std>\d+\.\d+)-(?P<nimg>\d+)\.safetensors$")


def gamma_to_std(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_gamma(std: float) -> float:
    """The exponent gamma >= 0 whose profile has relative width `std` (the cubic's root in [0, inf))."""
    if not 0 < std <= MAX_STD:
        raise ValueError(f"a power-function EMA's relative std must be in (0, {MAX_STD:.4f}]; got {std!r}")
    s2 = std * std  # sigma^2 (g+2)^2 (g+3) - (g+1) = 0, expanded
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = [float(r.real) for r in roots if abs(r.imag) < 1e-9 and r.real > -1e-9]
    return max(max(real), 0.0)


class PowerEMA(EMA):
    """An EMA whose average over the run has a power-function profile of relative width `std`."""

    def __init__(self, net: nn.Module, std: float):
        super().__init__(net, halflife_kimg=1.0, rampup=0.0)
        self.std, self.gamma = float(std), std_to_gamma(std)

    def beta(self, nimg: int, batch_size: int) -> float:
        """`nimg`: images seen after this batch (as the methods pass it)."""
        return max(1.0 - batch_size / nimg, 0.0) ** (self.gamma + 1)


def _key(std: float) -> str:
    """A width as text: in checkpoints and file names (train.ema_stds are given to 4 decimals at most)."""
    return f"{std:.4f}"


def snapshot_name(std: float, nimg: int) -> str:
    return f"ema-{_key(std)}-{nimg:012d}.safetensors"


class PowerEMAs:
    """The power EMAs a run tracks (train.ema_stds; none: every call is a no-op)."""

    def __init__(self, net: nn.Module | None = None, stds=()):
        self.emas = [PowerEMA(net, std) for std in stds]
        self._held: dict | None = None  # inside gathered(): the whole states, CPU copies

    def __bool__(self) -> bool:
        return bool(self.emas)

    def shard_like(self, trainable, part: str = "") -> None:
        for ema in self.emas:
            ema.shard_like(trainable, part)

    def update_from(self, trainable, nimg: int, batch_size: int, part: str = "") -> None:
        for ema in self.emas:
            ema.update_from(trainable, nimg, batch_size, part=part)

    @contextlib.contextmanager
    def gathered(self, everywhere: bool = False):
        """Collective, every rank enters: inside, `state_dict()` holds every power EMA whole on rank 0
        (`everywhere`: on every rank). They are assembled one at a time (EMA.gathered) and kept as CPU copies, so
        the device holds one whole copy at most, next to the EMA that a checkpoint assembles too."""
        held = {}
        for ema in self.emas:
            with ema.gathered(everywhere) as net:
                if net is not None:
                    held[_key(ema.std)] = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        self._held = held
        try:
            yield
        finally:
            self._held = None

    def state_dict(self) -> dict:
        """{std as text: whole EMA state}; sharded, only on rank 0 inside `gathered()`."""
        if self._held is not None:
            return self._held
        return {_key(ema.std): ema.state_dict() for ema in self.emas}

    def load_state_dict(self, state: dict) -> None:
        missing = [_key(ema.std) for ema in self.emas if _key(ema.std) not in state]
        if missing:
            raise ValueError(f"the checkpoint has no post-hoc EMA of std {', '.join(missing)} (it holds "
                             f"{', '.join(state) or 'none'}): config key 'train.ema_stds' differs from its run's")
        for ema in self.emas:
            ema.load_state_dict(state[_key(ema.std)])

    def write_snapshots(self, run_dir: str, nimg: int, info, is_main: bool = True) -> list[str]:
        """Collective, every rank calls it: each power EMA as a self-contained model file (sampleable as it is)
        in RUN_DIR/posthoc_ema/, written by rank 0 (`is_main`). Sharded, they are assembled one at a time, so
        rank 0 holds one whole copy at most. `info()`: the model metadata (export_model)."""
        from fastonestep.engine.export import export_model

        paths = []
        for ema in self.emas:
            with ema.gathered():
                if is_main:
                    path = os.path.join(run_dir, SNAPSHOT_DIR, snapshot_name(ema.std, nimg))
                    export_model(path, ema.net, {**info(), "posthoc_ema": {"std": ema.std, "nimg": nimg}})
                    paths.append(path)
        return paths


# -- reconstruction ---------------------------------------------------------------------------------------------
def profile_products(nimg_a, gamma_a, nimg_b, gamma_b) -> np.ndarray:
    """<p_a, p_b> for every pair (rows a, columns b), in float64, computed in logs (T^(gamma+1) overflows)."""
    ta, ga = np.asarray(nimg_a, np.float64)[:, None], np.asarray(gamma_a, np.float64)[:, None]
    tb, gb = np.asarray(nimg_b, np.float64)[None, :], np.asarray(gamma_b, np.float64)[None, :]
    m = np.minimum(ta, tb)
    log = (np.log(ga + 1) + np.log(gb + 1) - np.log(ga + gb + 1) + (ga + gb + 1) * np.log(m)
           - (ga + 1) * np.log(ta) - (gb + 1) * np.log(tb))
    return np.exp(log)


def solve_coefficients(in_nimg, in_std, out_nimg: float, out_std: float) -> tuple[np.ndarray, float]:
    """Coefficients of the snapshots (in_nimg[i], in_std[i]) whose combination best matches the power profile
    (out_nimg, out_std), and the fit's relative L2 error ||sum c_i p_i - p*|| / ||p*|| (0: exact)."""
    in_gamma = [std_to_gamma(s) for s in in_std]
    out_gamma = std_to_gamma(out_std)
    scale = max(max(in_nimg), out_nimg)  # times in units of the latest: products of order 1 / T stay near 1
    t_in = np.asarray(in_nimg, np.float64) / scale
    gram = profile_products(t_in, in_gamma, t_in, in_gamma)
    target = profile_products(t_in, in_gamma, [out_nimg / scale], [out_gamma])[:, 0]
    # Least squares with sum(c) = 1 (a weight held constant stays exactly that; unconstrained, sparse snapshots
    # scale every weight by sum(c), 1.003 in the tests' 9-step run): the KKT system of the constrained problem.
    n = len(t_in)
    kkt = np.block([[gram, np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    coefficients = np.linalg.lstsq(kkt, np.append(target, 1.0), rcond=None)[0][:n]
    norm2 = float(profile_products([out_nimg / scale], [out_gamma], [out_nimg / scale], [out_gamma])[0, 0])
    residual2 = float(coefficients @ gram @ coefficients - 2 * coefficients @ target + norm2)
    return coefficients, math.sqrt(max(residual2, 0.0) / norm2)


@dataclass(frozen=True)
class Snapshot:
    path: str
    std: float
    nimg: int


def list_snapshots(run_dir: str) -> list[Snapshot]:
    """The snapshots a run wrote (RUN_DIR/posthoc_ema/ema-STD-NIMG.safetensors), by images seen, then std."""
    folder = os.path.join(run_dir, SNAPSHOT_DIR)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"'{run_dir}' has no post-hoc EMA snapshots (no folder '{folder}'): train with config "
                                f"keys train.ema_stds (e.g. [0.05, 0.1]) and train.ema_snapshot_kimg")
    found = [(m, name) for name in os.listdir(folder) if (m := _SNAPSHOT_NAME.match(name))]
    snapshots = [Snapshot(os.path.join(folder, name), float(m["std"]), int(m["nimg"])) for m, name in found]
    if not snapshots:
        raise FileNotFoundError(f"folder '{folder}' holds no snapshot files (ema-STD-NIMG.safetensors)")
    return sorted(snapshots, key=lambda s: (s.nimg, s.std))


def reconstruct(run_dir: str, std: float, nimg: int | None = None, out: str | None = None) -> tuple[str, float]:
    """Writes the post-hoc EMA of relative width `std` at `nimg` images (a snapshot time; default the last) from
    the snapshots taken up to then, as a model file like the run's model.safetensors (default path
    RUN_DIR/model-ema{std}.safetensors). Parameters are combined; buffers are not averaged by an EMA (it copies
    them), so they are the latest snapshot's. Returns (path, relative L2 error of the profile fit)."""
    from safetensors import safe_open

    from fastonestep.engine.checkpoint import atomic_write_json
    from fastonestep.engine.export import export_model, read_info

    std_to_gamma(std)  # the range check, before any file is read
    snapshots = list_snapshots(run_dir)
    times = sorted({s.nimg for s in snapshots})
    nimg = times[-1] if nimg is None else int(nimg)
    if nimg not in times:  # the weights after the last snapshot before nimg are not known
        before = max((t for t in times if t < nimg), default=None)
        after = min((t for t in times if t > nimg), default=None)
        near = " or ".join(f"{t / 1000:g}" for t in (before, after) if t is not None)
        raise ValueError(f"'{run_dir}' has no snapshot at {nimg / 1000:g} kimg: a post-hoc EMA is built at a "
                         f"snapshot time ({near} kimg is nearest; {len(times)} snapshot times from "
                         f"{times[0] / 1000:g} to {times[-1] / 1000:g} kimg)")
    used = [s for s in snapshots if s.nimg <= nimg]
    coefficients, error = solve_coefficients([s.nimg for s in used], [s.std for s in used], nimg, std)
    info = read_info(used[-1].path)
    averaged = parameter_names(info)
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for snapshot, c in zip(used, coefficients):  # one snapshot in memory at a time, sums in float64
        with safe_open(snapshot.path, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                dtypes.setdefault(key, tensor.dtype)
                if key in averaged:
                    total[key] = total.get(key, 0) + float(c) * tensor.double()
                else:  # a buffer (fixed Fourier frequencies, a counter): not averaged, the latest snapshot's
                    total[key] = tensor
    info["posthoc_ema"] = {"std": std, "nimg": nimg, "snapshots": len(used), "fit_error": error}
    path = out or os.path.join(run_dir, f"model-ema{_key(std)}.safetensors")
    export_model(path, _TensorDict({k: v.to(dtypes[k]) for k, v in total.items()}), info)
    atomic_write_json(os.path.splitext(path)[0] + ".json", {**info["posthoc_ema"], "coefficients": coefficients.tolist(),
                                                           "from": [os.path.basename(s.path) for s in used]})
    return path, error


def parameter_names(info: dict) -> set[str]:
    """The parameters (not buffers) of the network a model file's metadata describes, built on the meta device."""
    from fastonestep.engine.export import build_from_info

    with torch.device("meta"):
        return {name for name, _ in build_from_info(info).named_parameters()}


class _TensorDict(nn.Module):
    """What export_model needs of a network: a state_dict."""

    def __init__(self, tensors: dict):
        super().__init__()
        self._tensors = tensors

    def state_dict(self, *args, **kwargs):
        return dict(self._tensors)
