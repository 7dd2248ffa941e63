"""The module wrappers of fastonestep.losses: each passes its settings through to the function (non-default
settings, whose result differs from the defaults', so a dropped or swapped setting shows), reduces as asked,
holds no state, and refuses bad settings at construction, naming them."""
import pytest
import torch

from fastonestep import losses
from test_losses_api import _available

IMPLS = ["torch", "ext", "triton"]


@pytest.fixture(params=IMPLS)
def impl(request, cache_dir):  # cache_dir: the C++ op is built in the session's cache, never ~/.cache
    return _available(request.param)


def _leaf(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(True)


def _value_and_grads(fn, *inputs):
    value = fn()
    leaves = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(value.sum(), leaves)
    return value.detach(), grads


def _assert_same(a, b):
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, rtol=0, atol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_ratio_generator_module_passes_its_settings(impl):
    x, lg = _leaf(3, 2, 5, seed=1), torch.randn(3, 2, 5)
    logits, weight = torch.tensor([-4.0, 0.5, 6.0]), torch.tensor([0.2, 1.0, 3.0])
    module = losses.RatioGeneratorLoss(divergence="hellinger", normalize=False, clamp=3.0, impl=impl)
    got = _value_and_grads(lambda: module(x, lg, logits, weight), x)
    want = _value_and_grads(lambda: losses.ratio_generator_loss(x, lg, logits, weight, "hellinger", False, 3.0,
                                                                impl=impl), x)
    _assert_same(got, want)
    default = _value_and_grads(lambda: losses.ratio_generator_loss(x, lg, logits, weight, impl=impl), x)
    assert not torch.allclose(got[1][0], default[1][0])  # the settings change the gradient


def test_dmd_and_classifier_modules_equal_their_functions(impl):
    x, real, fake = _leaf(4, 3, seed=2), torch.randn(4, 3), torch.randn(4, 3)
    _assert_same(_value_and_grads(lambda: losses.DMDLoss(impl=impl)(x, real, fake), x),
                 _value_and_grads(lambda: losses.dmd_loss(x, real, fake, impl=impl), x))
    lg, lr, w = _leaf(5, seed=3), _leaf(5, 1, seed=4), torch.rand(5)
    _assert_same(_value_and_grads(lambda: losses.RatioClassifierLoss(impl=impl)(lg, lr, w), lg, lr),
                 _value_and_grads(lambda: losses.ratio_classifier_loss(lg, lr, w, impl=impl), lg, lr))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_denoising_module_reduces_the_per_sample_losses(impl, reduction):
    F, x_t, x0 = _leaf(3, 4, seed=5), torch.randn(3, 4), torch.randn(3, 4)
    sigma = torch.tensor([0.1, 1.0, 7.0])
    module = losses.DenoisingLoss(sigma_data=1.3, reduction=reduction, impl=impl)
    per_sample = losses.denoising_loss(F, x_t, x0, sigma, 1.3, impl=impl)
    reduce = {"mean": lambda t: t.sum() / t.numel(), "sum": torch.sum, "none": lambda t: t}[reduction]
    _assert_same(_value_and_grads(lambda: module(F, x_t, x0, sigma), F),
                 _value_and_grads(lambda: reduce(losses.denoising_loss(F, x_t, x0, sigma, 1.3, impl=impl)), F))
    assert not torch.allclose(per_sample, losses.denoising_loss(F, x_t, x0, sigma, 0.5, impl=impl))


def test_an_empty_batch_has_mean_denoising_loss_zero():
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = losses.DenoisingLoss(impl="torch")(empty, empty.detach(), empty.detach(), 1.0)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, empty)
    assert grad.shape == (0, 4)


def test_modules_hold_no_state_and_show_their_settings():
    modules = [losses.DenoisingLoss(0.7, "sum"), losses.DMDLoss("torch"),
               losses.RatioGeneratorLoss("dijs", clamp=5.0), losses.RatioClassifierLoss()]
    for m in modules:
        assert m.state_dict() == {} and list(m.parameters()) == []
    assert "sigma_data=0.7, reduction='sum', impl='auto'" in repr(modules[0])
    assert "divergence='dijs', normalize=True, clamp=5.0" in repr(modules[2])


@pytest.mark.parametrize("make, named", [
    (lambda: losses.DenoisingLoss(sigma_data=0.0), "sigma_data"),
    (lambda: losses.DenoisingLoss(reduction="avg"), "reduction='avg'"),
    (lambda: losses.DMDLoss(impl="cuda"), "impl='cuda'"),
    (lambda: losses.RatioGeneratorLoss(divergence="kl"), "divergence='kl'"),
    (lambda: losses.RatioGeneratorLoss(clamp=-1.0), "clamp must be positive"),
    (lambda: losses.RatioClassifierLoss(impl="fused"), "impl='fused'"),
])
def test_bad_settings_are_refused_at_construction(make, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        make()
