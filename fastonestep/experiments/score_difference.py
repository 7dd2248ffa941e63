"""Score-difference accuracy on a 2-D Gaussian mixture (the DiffRatio paper's Figure 2 check).

p and q are known mixtures, so the score difference s_q - s_p of their noised versions is exact at every
noise level. Two estimators get the same budget (optimizer steps, batch, width, noise-level
distribution, optimizer and learning-rate schedule, and literally the same noised samples each step):

- DiffRatio: one time-conditional logistic classifier c(x_t, sigma) between noised q (label 1) and noised
  p (label 0). At its optimum c = log q_t - log p_t, so grad_x c is the score difference directly.
- VSD: two EDM denoisers trained separately on p and on q; the estimate is the difference of their
  Tweedie scores (D_q - x)/sigma^2 - (D_p - x)/sigma^2, so both networks' errors add up.

Noising is VE (x_t = x + sigma * eps). Everything is seeded and runs deterministically on CPU.

What to expect with the defaults: DiffRatio is far more accurate at small sigma (<= 0.01), where the
denoising targets behind VSD's scores grow like 1/sigma; VSD is more accurate from sigma ~ 0.05 up, and
at sigma >= 1 the classifier cannot resolve the nearly flat log-ratio (its error exceeds the signal).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastonestep.data.mixture import GaussianMixture
from fastonestep.diffusion.precond import EDMPrecond, edm_coefficients, edm_loss_weight
from fastonestep.diffusion.schedules import sample_loguniform_sigma
from fastonestep.networks.mlp import MLP

# From EDM's sigma_min up to about 4x the data std: the generator step samples noise levels over this
# whole range, and the small end is where score-matching targets are noisiest.
DEFAULT_SIGMAS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
SIGMA_DATA = 0.5  # per-coordinate std of p is close to this (see make_problem)


@dataclass
class Settings:
    steps: int = 5000
    batch_size: int = 512  # samples per distribution per step
    hidden: int = 128
    depth: int = 3
    lr: float = 1e-3
    seed: int = 0
    problem_seed: int = 0
    perturbation: float = 1.0  # how far q is from p (see make_problem)
    num_eval: int = 4000  # evaluation points per noise level (half from p_t, half from q_t)
    sigma_min: float = 0.002
    sigma_max: float = 2.0


QUICK = dict(steps=300, batch_size=256, hidden=64, num_eval=1000)


# --------------------------------------------------------------------------------------------------
# The problem: p and a perturbed copy q


def make_problem(seed: int = 0, num_components: int = 6, perturbation: float = 1.0
                 ) -> tuple[GaussianMixture, GaussianMixture]:
    """p: modes on a jittered ring of radius ~0.65 (per-coordinate std ~0.43, near sigma_data).
    q: p with every mean shifted, every std rescaled and the weights re-drawn, as a student that is
    close to the data but not equal to it would be. `perturbation` scales how far q is from p
    (1.0: mean shifts of about one mode std)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    k = num_components
    angles = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k + uniform(-0.3, 0.3, k)
    radii = 0.65 * uniform(0.8, 1.2, k)
    means_p = torch.stack([radii * angles.cos(), radii * angles.sin()], dim=1)
    stds_p = uniform(0.06, 0.12, k)
    weights_p = uniform(0.5, 1.5, k)

    means_q = means_p + perturbation * 0.08 * torch.randn(k, 2, generator=g, dtype=torch.float64)
    stds_q = stds_p * torch.exp(perturbation * uniform(-0.3, 0.3, k))
    weights_q = weights_p * torch.exp(perturbation * uniform(-0.5, 0.5, k))
    return GaussianMixture(means_p, stds_p, weights_p), GaussianMixture(means_q, stds_q, weights_q)


# --------------------------------------------------------------------------------------------------
# Networks and losses


class RatioNetwork(nn.Module):
    """c(x_t, sigma) -> one logit per sample; EDM input scaling so every noise level sees unit-scale input."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        _, _, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        return self.net(c_in[:, None] * x, c_noise)


def logistic_ratio_loss(logit_q: torch.Tensor, logit_p: torch.Tensor) -> torch.Tensor:
    """q is class 1, p class 0; minimised by c = log q_t - log p_t (equal class sizes)."""
    return F.softplus(-logit_q).mean() + F.softplus(logit_p).mean()


def edm_denoising_loss(denoiser: EDMPrecond, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    x_t = x0 + sigma[:, None] * eps
    err = (denoiser(x_t, sigma) - x0).square().sum(dim=1)
    return (edm_loss_weight(sigma, denoiser.sigma_data) * err).mean()


def build_networks(s: Settings):
    """Same architecture, width and depth for all three networks; each seeded on its own."""

    def mlp(out_dim: int, seed_offset: int) -> MLP:
        torch.manual_seed(s.seed * 1000 + seed_offset)
        return MLP(dim=2, hidden=s.hidden, depth=s.depth, out_dim=out_dim, zero_init_output=True)

    ratio = RatioNetwork(mlp(1, 0))
    denoiser_p = EDMPrecond(mlp(2, 1), sigma_data=SIGMA_DATA)
    denoiser_q = EDMPrecond(mlp(2, 2), sigma_data=SIGMA_DATA)
    return ratio, denoiser_p, denoiser_q


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# Training: one loop, identical batches for both methods


def make_optimizer(module: nn.Module, s: Settings):
    opt = torch.optim.Adam(module.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.steps, eta_min=0.05 * s.lr)
    return opt, sched


def train(p: GaussianMixture, q: GaussianMixture, s: Settings, progress: bool = True):
    ratio, denoiser_p, denoiser_q = build_networks(s)
    modules = {"diffratio": ratio, "vsd_p": denoiser_p, "vsd_q": denoiser_q}
    optims = {name: make_optimizer(m, s) for name, m in modules.items()}
    g = torch.Generator().manual_seed(s.seed)
    losses = {name: 0.0 for name in modules}

    bar = tqdm(range(s.steps), desc="score-difference", disable=not progress, mininterval=1.0)
    for step in bar:
        x_p, x_q = p.sample(s.batch_size, generator=g), q.sample(s.batch_size, generator=g)
        # One noise level per pair, shared by both methods: the noise-level distribution is identical.
        sigma = sample_loguniform_sigma(s.batch_size, s.sigma_min, s.sigma_max, generator=g)
        eps_p, eps_q = torch.randn(2, s.batch_size, 2, generator=g)

        step_losses = {
            "diffratio": logistic_ratio_loss(ratio(x_q + sigma[:, None] * eps_q, sigma),
                                             ratio(x_p + sigma[:, None] * eps_p, sigma)),
            "vsd_p": edm_denoising_loss(denoiser_p, x_p, sigma, eps_p),
            "vsd_q": edm_denoising_loss(denoiser_q, x_q, sigma, eps_q),
        }
        for name, loss in step_losses.items():
            opt, sched = optims[name]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses[name] = 0.98 * losses[name] + 0.02 * loss.item() if step else loss.item()
        if progress and step % 100 == 0:
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
    bar.close()
    return ratio, denoiser_p, denoiser_q, losses


# --------------------------------------------------------------------------------------------------
# Estimators and evaluation


def diffratio_score_difference(ratio: RatioNetwork, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    """grad_x c(x, sigma); samples are independent, so the gradient of the summed logits is per-sample."""
    x = x_t.detach().requires_grad_(True)
    logit = ratio(x, torch.full((x.shape[0],), sigma))
    return torch.autograd.grad(logit.sum(), x)[0]


@torch.no_grad()
def vsd_score_difference(denoiser_p: EDMPrecond, denoiser_q: EDMPrecond, x_t: torch.Tensor, sigma: float):
    """s_q - s_p = (D_q - x)/sigma^2 - (D_p - x)/sigma^2 = (D_q - D_p)/sigma^2."""
    return (denoiser_q(x_t, sigma) - denoiser_p(x_t, sigma)) / sigma**2


def exact_score_difference(p: GaussianMixture, q: GaussianMixture, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    return (q.score(x_t.double(), sigma) - p.score(x_t.double(), sigma)).float()


def error_metrics(estimate: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """Mean L2 error and mean cosine similarity over the evaluation points."""
    l2 = (estimate.double() - truth.double()).norm(dim=1).mean().item()
    cosine = F.cosine_similarity(estimate.double(), truth.double(), dim=1, eps=1e-12).mean().item()
    return l2, cosine


def evaluation_points(p: GaussianMixture, q: GaussianMixture, sigma: float, n: int, seed: int) -> torch.Tensor:
    """A 50/50 mix of noised p and noised q: where both methods' gradients are used in practice."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([p.sample(n // 2, generator=g), q.sample(n - n // 2, generator=g)])
    return x + sigma * torch.randn(x.shape, generator=g)


def evaluate(p, q, ratio, denoiser_p, denoiser_q, sigmas, num_eval: int, seed: int) -> dict:
    """Per-sigma metrics for both methods, plus the mean norm of the exact difference (the scale an L2
    error should be read against). `seed` fixes the evaluation points."""
    results = {"diffratio": {"l2": [], "cosine": []}, "vsd": {"l2": [], "cosine": []}, "exact_norm": []}
    for i, sigma in enumerate(sigmas):
        x_t = evaluation_points(p, q, sigma, num_eval, seed=10_000 + 97 * seed + i)
        truth = exact_score_difference(p, q, x_t, sigma)
        results["exact_norm"].append(truth.double().norm(dim=1).mean().item())
        estimates = {
            "diffratio": diffratio_score_difference(ratio, x_t, sigma),
            "vsd": vsd_score_difference(denoiser_p, denoiser_q, x_t, sigma),
        }
        for method, est in estimates.items():
            l2, cosine = error_metrics(est, truth)
            results[method]["l2"].append(l2)
            results[method]["cosine"].append(cosine)
    return results


# --------------------------------------------------------------------------------------------------
# Output


def write_json_atomic(path: str, payload: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = result["sigmas"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"diffratio": ("DiffRatio (grad of log-ratio)", "C0", "o"), "vsd": ("VSD (two score networks)", "C1", "s")}
    for ax, metric, ylabel in zip(axes, ("l2", "cosine"), ("mean L2 error", "mean cosine similarity")):
        for method, (label, color, marker) in styles.items():
            ax.plot(sigmas, result[method][metric], marker=marker, color=color, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("noise level sigma")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].plot(sigmas, result["exact_norm"], ls="--", color="0.5", label="mean |s_q - s_p| (scale)")
    axes[0].set_yscale("log")
    axes[0].legend(loc="lower left", fontsize=8)
    axes[1].legend(loc="lower left", fontsize=8)
    fig.suptitle("Score difference s_q - s_p on a 2-D Gaussian mixture")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(out: str, steps: int | None = None, batch_size: int | None = None, seed: int = 0, sigmas=None,
        num_eval: int | None = None, quick: bool = False, hidden: int | None = None, problem_seed: int = 0,
        perturbation: float = 1.0, progress: bool = True, num_threads: int | None = 1) -> dict:
    """Train both estimators, evaluate them at each sigma, write `out` (JSON) and a PNG with the same stem.

    Arguments left as None take the defaults of `Settings` (or of QUICK when quick=True).
    num_threads: torch intra-op threads while running (restored afterwards). Networks this small gain
    nothing from more than one, and several threads slow down many-fold when the cores are shared.
    None keeps the current setting."""
    overrides = dict(QUICK) if quick else {}
    for key, value in dict(steps=steps, batch_size=batch_size, num_eval=num_eval, hidden=hidden).items():
        if value is not None:
            overrides[key] = value
    sigmas = [float(s) for s in (sigmas if sigmas is not None else DEFAULT_SIGMAS)]
    # Training noise levels cover exactly the evaluation range, for both methods.
    settings = Settings(seed=seed, problem_seed=problem_seed, perturbation=perturbation,
                        sigma_min=min(sigmas), sigma_max=max(sigmas), **overrides)

    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run(out, settings, sigmas, quick=quick, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out: str, s: Settings, sigmas: list[float], quick: bool, progress: bool) -> dict:
    start = time.time()
    torch.manual_seed(s.seed)
    p, q = make_problem(s.problem_seed, perturbation=s.perturbation)
    ratio, denoiser_p, denoiser_q, final_losses = train(p, q, s, progress=progress)
    for m in (ratio, denoiser_p, denoiser_q):
        m.eval()
    # Evaluation points depend on the problem only, so runs with different training seeds share them.
    metrics = evaluate(p, q, ratio, denoiser_p, denoiser_q, sigmas, s.num_eval, seed=s.problem_seed)

    result = {
        "sigmas": sigmas,
        **metrics,
        "settings": {
            **asdict(s),
            "quick": quick,
            "sigma_data": SIGMA_DATA,
            "noise_level_distribution": "log-uniform over [sigma_min, sigma_max], shared by both methods",
            "optimizer": "Adam, cosine decay to 5% of lr, same for every network",
            "params": {"diffratio": num_params(ratio), "vsd": num_params(denoiser_p) + num_params(denoiser_q)},
            "final_losses_ema": final_losses,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "wall_time_s": round(time.time() - start, 2),
        },
    }
    write_json_atomic(out, result)
    plot(result, os.path.splitext(out)[0] + ".png")
    return result
