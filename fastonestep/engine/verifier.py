"""Verifier sampling with DiffRatio's ratio network (design 4.1): draw several candidates per output sample,
score each by the estimated log density ratio, keep the best or resample by weight.

The ratio network is trained with generated = 1, real = 0, so at its optimum c(x_t, sigma) = log q_t - log p_t
(q: generator, p: data). A candidate's score is s = -c(x + sigma * eps, sigma), the estimated log p/q of the
candidate seen at a small noise level sigma (the classifier is trained on noised inputs only; eps comes from
a fixed-seed generator, so scores are reproducible). "best" keeps argmax_k s_k; "resample" draws candidate k
with probability softmax(s)_k, i.e. importance resampling with weights p/q, which in the limit of many
candidates turns samples of q into samples of p.
"""
from __future__ import annotations

import os

import torch

from fastonestep.engine.checkpoint import CheckpointError

VERIFIER_MODES = ("best", "resample")
RATIO_FILE = "ratio.safetensors"


@torch.no_grad()
def verifier_scores(ratio_net, x: torch.Tensor, sigma: float, labels=None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Estimated log p/q of each row of x: -c(x + sigma * eps, sigma) as float64 (B,). eps is drawn on the CPU
    from `generator` (so the same seed gives the same scores on any device)."""
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
    sig = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=torch.float32)
    return -ratio_net(x + float(sigma) * eps, sig, labels).double().cpu()


def select(scores: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Chosen candidate per row of scores (n, K): argmax ("best") or one draw from softmax(scores)
    ("resample"). Non-finite scores are never chosen unless a whole row is non-finite (then candidate 0)."""
    if mode not in VERIFIER_MODES:
        raise ValueError(f"verifier mode must be one of {', '.join(VERIFIER_MODES)}; got {mode!r}")
    s = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -torch.inf))
    all_bad = torch.isinf(s).all(dim=1)
    s[all_bad] = 0.0
    if mode == "best":
        return s.argmax(dim=1)
    probs = torch.softmax(s, dim=1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def verifier_sample(generate_fn, ratio_net, n: int, num_candidates: int, sigma: float, mode: str = "best",
                    generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
                    batch_size: int = 256):
    """n samples, each the chosen one of num_candidates candidates.

    generate_fn(m, labels_m) -> m candidate samples (labels_m: None or (m,) labels; it draws its own noise).
    Candidates of output i share its label labels[i]. `generator` (CPU) drives the scoring noise and the
    resampling draw. Candidates are made in chunks of about batch_size. Returns (samples (n, ...),
    {"scores": (n, K) float64, "chosen": (n,) int64}).
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    if not sigma > 0:
        raise ValueError(f"verifier sigma must be positive, got {sigma}")
    if mode not in VERIFIER_MODES:
        raise ValueError(f"verifier mode must be one of {', '.join(VERIFIER_MODES)}; got {mode!r}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} samples")
    k = num_candidates
    per_chunk = max(1, batch_size // k)
    outputs, all_scores, all_chosen = [], [], []
    for start in range(0, n, per_chunk):
        b = min(per_chunk, n - start)
        lab = None if labels is None else labels[start:start + b].repeat_interleave(k)
        cand = generate_fn(b * k, lab)
        scores = verifier_scores(ratio_net, cand, sigma, lab, generator).reshape(b, k)
        chosen = select(scores, mode, generator)
        cand = cand.reshape(b, k, *cand.shape[1:])
        outputs.append(cand[torch.arange(b, device=cand.device), chosen.to(cand.device)])
        all_scores.append(scores)
        all_chosen.append(chosen)
    return torch.cat(outputs), {"scores": torch.cat(all_scores), "chosen": torch.cat(all_chosen)}


def ratio_path(model: str) -> str:
    """ratio.safetensors of a run directory, or next to a model file."""
    folder = model if os.path.isdir(model) else os.path.dirname(os.path.abspath(model))
    return os.path.join(folder, RATIO_FILE)


def load_verifier(model: str, device="cpu"):
    """(ratio network in eval mode, info) for the run that `model` names (a run directory or its model file)."""
    from fastonestep.engine.export import load_model

    path = ratio_path(model)
    if not os.path.isfile(path):
        raise CheckpointError(f"verifier sampling needs {path!r}, which does not exist: only DiffRatio runs export "
                              f"a ratio network ({RATIO_FILE}, written at the end of training)")
    net, info = load_model(path, device)
    if info.get("role") != "ratio":
        raise CheckpointError(f"{path!r} is not a ratio network (role {info.get('role')!r})")
    return net.requires_grad_(False), info


def sample_with_verifier(sampler, model: str, n: int, shape, num_classes: int, device, num_candidates: int,
                         mode: str = "best", sigma: float | None = None, seed: int = 0, batch_size: int = 256):
    """`fastonestep sample RUN --verifier K`: n samples of sampler(noise, labels), each the chosen one of K
    candidates scored by the run's ratio.safetensors. Labels are those of plain sampling (i % num_classes);
    candidate noise comes from seed, scoring/resampling noise from seed + 1. sigma None: the exported default."""
    from fastonestep.engine.evaluate import fixed_labels

    ratio, info = load_verifier(model, device)
    sigma = float(info["verifier_sigma"] if sigma is None else sigma)
    noise_gen = torch.Generator().manual_seed(seed)
    score_gen = torch.Generator().manual_seed(seed + 1)

    def generate_fn(m, labels):
        noise = torch.randn((m, *shape), generator=noise_gen).to(device)
        return sampler(noise, labels).float()

    labels = fixed_labels(n, num_classes, device)
    samples, _ = verifier_sample(generate_fn, ratio, n, num_candidates, sigma, mode, score_gen, labels, batch_size)
    return samples.cpu()
