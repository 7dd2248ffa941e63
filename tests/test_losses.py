"""The functional loss API against independent formulas: values and gradients."""
import math

import pytest
import torch

from fastonestep import losses

DIVS = ["rkl", "dijs", "fkl", "hellinger"]


def h_exact(logit, div):
    r = math.exp(-logit)
    return {"rkl": 1.0, "dijs": r / (1 + r), "fkl": r, "hellinger": math.sqrt(r) / 2}[div]


@pytest.mark.parametrize("div", DIVS)
def test_divergence_weight_is_f_second_derivative_times_r2(div):
    # h(r) = f''(r) r^2 with f of each divergence as a function of r = p/q: rkl -log r, dijs the
    # Jensen-Shannon generator, fkl r log r, squared Hellinger (sqrt(r) - 1)^2.
    f2 = {"rkl": lambda r: 1 / r**2, "dijs": lambda r: 1 / (r * (1 + r)), "fkl": lambda r: 1 / r,
          "hellinger": lambda r: 0.5 * r**-1.5}[div]
    logits = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0])
    got = losses.divergence_weight(logits, div)
    r = torch.exp(-logits.double())
    want = f2(r) * r**2
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("normalize", [True, False])
def test_ratio_generator_loss_gradient(div, normalize):
    torch.manual_seed(1)
    x = torch.randn(3, 2, 4, 5, requires_grad=True)
    logit_grad = torch.randn(3, 2, 4, 5)
    logits = torch.tensor([-2.0, 0.3, 1.5])
    weight = torch.tensor([0.5, 1.0, 2.0])
    loss = losses.ratio_generator_loss(x, logit_grad, logits, weight, div, normalize=normalize)
    (gx,) = torch.autograd.grad(loss, x)
    for i in range(3):
        g = weight[i].item() * h_exact(logits[i].item(), div) * logit_grad[i]
        if normalize:
            g = g / (logit_grad[i].abs().mean() + 1e-8)
        torch.testing.assert_close(gx[i], g / x.numel(), rtol=1e-5, atol=1e-9)
    # value of the surrogate: 0.5 * mean(g^2)
    assert loss.item() == pytest.approx(0.5 * (gx * x.numel()).square().mean().item(), rel=1e-5)


def test_ratio_generator_loss_zeroes_nonfinite_rows():
    x = torch.randn(2, 6, requires_grad=True)
    logit_grad = torch.randn(2, 6)
    logit_grad[0, 3] = float("nan")
    loss = losses.ratio_generator_loss(x, logit_grad, torch.zeros(2), divergence="rkl")
    (gx,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(gx).all()
    assert gx[0].abs().sum() == 0 and gx[1].abs().sum() > 0


def test_ratio_classifier_loss_matches_bce():
    lg, lr = torch.randn(7), torch.randn(7)
    w = torch.rand(7)
    want = (w * (torch.nn.functional.binary_cross_entropy_with_logits(lg, torch.ones(7), reduction="none")
                 + torch.nn.functional.binary_cross_entropy_with_logits(lr, torch.zeros(7), reduction="none"))).mean()
    torch.testing.assert_close(losses.ratio_classifier_loss(lg, lr, w), want)


def test_denoising_loss_matches_edm_formula():
    torch.manual_seed(2)
    x0, eps, F = torch.randn(4, 3, 5), torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    sigma, sd = torch.tensor([0.01, 0.5, 2.0, 40.0]), 0.5
    x_t = x0 + sigma[:, None, None] * eps
    got = losses.denoising_loss(F, x_t, x0, sigma, sd)
    for i, s in enumerate(sigma.tolist()):
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2)
        lam = (s**2 + sd**2) / (s * sd) ** 2
        want = lam * ((c_skip * x_t[i] + c_out * F[i] - x0[i]) ** 2).mean()
        assert got[i].item() == pytest.approx(want.item(), rel=1e-5)


def test_dmd_loss_gradient_is_normalised_score_difference():
    torch.manual_seed(3)
    x = torch.randn(2, 8, requires_grad=True)
    real_hat, fake_hat = torch.randn(2, 8), torch.randn(2, 8)
    (gx,) = torch.autograd.grad(losses.dmd_loss(x, real_hat, fake_hat), x)
    p_real, p_fake = x.detach() - real_hat, x.detach() - fake_hat
    want = (p_real - p_fake) / (p_real.abs().mean(1, keepdim=True) + 1e-8) / x.numel()
    torch.testing.assert_close(gx, want)


def test_add_noise_seeded_is_reproducible_and_fp32_accurate():
    x0 = torch.randn(3, 10, dtype=torch.float16)
    a = losses.add_noise(x0, torch.tensor([1.0, 0.5, 0.1]), torch.tensor([0.0, 1.0, 2.0]), seed=7)
    b = losses.add_noise(x0, torch.tensor([1.0, 0.5, 0.1]), torch.tensor([0.0, 1.0, 2.0]), seed=7)
    assert a.dtype == torch.float16 and torch.equal(a, b)
    torch.testing.assert_close(a[0], x0[0])


def test_impl_selection_errors_are_clear(monkeypatch):
    # Unavailable implementations fall back with a warning (tests/test_triton_kernels.py); unknown names raise.
    with pytest.raises(ValueError, match="impl"):
        losses.ratio_classifier_loss(torch.zeros(2), torch.zeros(2), impl="cuda")
    monkeypatch.setenv("FASTONESTEP_IMPL", "bogus")
    with pytest.raises(ValueError, match="FASTONESTEP_IMPL"):
        losses.ratio_classifier_loss(torch.zeros(2), torch.zeros(2))


def test_surrogate_gradient_is_exact_for_tiny_steps():
    """g far below ulp(x) must still arrive intact: x - sg(x - g) would round it away in fp32."""
    x = torch.full((2, 4), 100.0, requires_grad=True)
    logit_grad = torch.ones(2, 4)
    weight = torch.tensor([1e-9, 1.0])
    loss = losses.ratio_generator_loss(x, logit_grad, torch.zeros(2), weight, "rkl")
    (gx,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(gx[0], torch.full((4,), 1e-9 / 8), rtol=1e-6, atol=0)
    assert loss.item() == pytest.approx(0.5 * (1e-18 + 1.0) / 2, rel=1e-6)


@pytest.mark.parametrize("impl", ["torch", "ext"])
def test_ratio_generator_loss_refuses_a_clamp_that_is_not_positive(impl):
    """Logits are clamped to [-clamp, clamp]; for clamp < 0 that interval is empty, and torch.clamp and the fused
    kernels would each read it their own way."""
    x, g, logits = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2)
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="clamp must be positive"):
            losses.ratio_generator_loss(x, g, logits, clamp=bad, impl=impl)
