"""Convergence: the same tiny training run with the fused Triton losses and with the eager references.

Unit tests compare one call; these compare whole trajectories, where a small precision bug (a wrong
accumulation dtype, a missed rescale, a stale saved gradient) compounds step after step. Each run is 32
optimisation steps of 2-D toy networks, seeded identically; the only difference between the two runs is
`impl="triton"` versus `impl="torch"` in every fastonestep.losses call (noising included).

Tolerance: every recorded loss agrees within a relative 1e-4 (absolute 1e-6 for losses near zero) at every
step. Both implementations compute in fp32 and differ only in summation order (about 1e-7 relative per step);
1e-4 leaves room for that to grow through 32 Adam steps, and is far below what a real bug produces (a missing
grad_output rescale or a wrong normaliser changes the losses at the percent level within a few steps).

Under the interpreter (CPU CI) each fused call is a single program: 2-D samples are whole rows, many per tile.
"""
import pytest
import torch

from fastonestep import losses
from fastonestep.diffusion.precond import EDMPrecond
from fastonestep.kernels import triton_common as tc
from fastonestep.networks.build import build_ratio
from fastonestep.networks.mlp import MLP

if not tc.INTERPRETED and not torch.cuda.is_available():
    pytest.skip("compiled Triton kernels need CUDA", allow_module_level=True)

DEV = "cpu" if tc.INTERPRETED else "cuda"
STEPS, BATCH, SIGMA_G = 32, 64, 2.5
RTOL, ATOL = 1e-4, 1e-6


def _data(n, gen):
    """A 4-mode Gaussian mixture in 2-D (fixed by `gen`)."""
    centers = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    idx = torch.randint(0, 4, (n,), generator=gen)
    return (centers[idx] + 0.1 * torch.randn(n, 2, generator=gen)).to(DEV)


def _denoiser(seed):
    torch.manual_seed(seed)
    return EDMPrecond(MLP(dim=2, hidden=32, depth=1, emb_dim=16)).to(DEV)


def _sigma(n, gen):
    return torch.exp(torch.randn(n, generator=gen) * 1.2 - 1.2).clamp(0.002, 80).to(DEV)


def _generate(G, z):
    return G(SIGMA_G * z, torch.full((z.shape[0],), SIGMA_G, device=z.device))


def run_diffratio(impl):
    """Ratio classifier step then generator step (4.1(b): grad_x of the logit, DiJS, sigma^2 weighting)."""
    G = _denoiser(0)
    torch.manual_seed(1)
    ratio = build_ratio("mlp", (2,), hidden=32, depth=1, emb_dim=16).to(DEV)
    # SGD for the generator: unlike Adam it is not invariant to the gradient's scale, so a wrong
    # grad_output rescale in the fused backward would show
    opt_g = torch.optim.SGD(G.parameters(), lr=0.01, momentum=0.9)
    opt_r = torch.optim.Adam(ratio.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(2)
    out = []
    for _ in range(STEPS):
        # ratio (classifier) step, generator output detached
        with torch.no_grad():
            x_gen = _generate(G, torch.randn(BATCH, 2, generator=gen).to(DEV))
        x = torch.cat([x_gen, _data(BATCH, gen)])
        sigma = _sigma(2 * BATCH, gen)
        x_t = losses.add_noise(x, 1.0, sigma, noise=torch.randn(2 * BATCH, 2, generator=gen).to(DEV), impl=impl)
        logits = ratio(x_t, sigma)
        loss_r = losses.ratio_classifier_loss(logits[:BATCH], logits[BATCH:], impl=impl)
        opt_r.zero_grad()
        loss_r.backward()
        opt_r.step()
        # generator step, ratio frozen, gradient through its input
        ratio.requires_grad_(False)
        x = _generate(G, torch.randn(BATCH, 2, generator=gen).to(DEV))
        sigma = _sigma(BATCH, gen)
        x_t = losses.add_noise(x.detach(), 1.0, sigma, noise=torch.randn(BATCH, 2, generator=gen).to(DEV),
                               impl=impl).requires_grad_(True)
        logits = ratio(x_t, sigma)
        (logit_grad,) = torch.autograd.grad(logits.sum(), x_t)
        loss_g = losses.ratio_generator_loss(x, logit_grad, logits.detach(), sigma.square(), "dijs", impl=impl)
        opt_g.zero_grad()
        (2.0 * loss_g).backward()  # grad_output != 1 on the fused backward
        opt_g.step()
        ratio.requires_grad_(True)
        out.append((loss_r.item(), loss_g.item(), logits.mean().item()))
    return torch.tensor(out, dtype=torch.float64)


def run_dmd(impl):
    """Fake-denoiser step (EDM denoising loss on the detached generator output) then a DMD generator step."""
    G, D_fake, D_real = _denoiser(0), _denoiser(0), _denoiser(3)  # "real" teacher: frozen, independent init
    D_real.requires_grad_(False)
    opt_g = torch.optim.SGD(G.parameters(), lr=0.01, momentum=0.9)
    opt_f = torch.optim.SGD(D_fake.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(4)
    out = []
    for _ in range(STEPS):
        with torch.no_grad():
            x = _generate(G, torch.randn(BATCH, 2, generator=gen).to(DEV))
        sigma = _sigma(BATCH, gen)
        x_t = losses.add_noise(x, 1.0, sigma, noise=torch.randn(BATCH, 2, generator=gen).to(DEV), impl=impl)
        F, _, _ = D_fake.raw(x_t, sigma)
        loss_f = losses.denoising_loss(F, x_t, x, sigma, D_fake.sigma_data, impl=impl).mean()
        opt_f.zero_grad()
        loss_f.backward()
        opt_f.step()

        x = _generate(G, torch.randn(BATCH, 2, generator=gen).to(DEV))
        sigma = _sigma(BATCH, gen)
        with torch.no_grad():
            x_t = losses.add_noise(x, 1.0, sigma, noise=torch.randn(BATCH, 2, generator=gen).to(DEV), impl=impl)
            real_hat, fake_hat = D_real(x_t, sigma), D_fake(x_t, sigma)
        loss_g = losses.dmd_loss(x, real_hat, fake_hat, impl=impl)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        out.append((loss_f.item(), loss_g.item(), x.detach().abs().mean().item()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("run", [run_diffratio, run_dmd], ids=["diffratio", "dmd"])
def test_fused_and_eager_training_agree(run, monkeypatch):
    monkeypatch.delenv("FASTONESTEP_IMPL", raising=False)
    fused, eager = run("triton"), run("torch")
    assert torch.isfinite(eager).all()
    # the run actually trains: the recorded quantities move
    assert (eager[-1] - eager[0]).abs().max() > 1e-3
    torch.testing.assert_close(fused, eager, rtol=RTOL, atol=ATOL)
