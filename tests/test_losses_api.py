"""The public loss API (fastonestep.losses) across its implementations, torch / ext / triton (the Triton kernels
through the interpreter on CPU), against formulas written out here in float64: the latent-sampling RNG streams,
per-sample argument shapes, the first-order-only backward of the fused paths, fp16 under loss scaling, constants
that require grad, and the argument checks every implementation shares."""
import collections

import pytest
import torch
import torch.nn.functional as Fn
from torch.utils._python_dispatch import TorchDispatchMode

from fastonestep import losses
from fastonestep.kernels import reference as ref

IMPLS = ["torch", "ext", "triton"]
FUSED = ["ext", "triton"]


def _available(name):
    if name == "ext":
        from fastonestep.kernels import ext

        if ext.compiler() is None or ext.ninja() is None:
            pytest.skip("no C++ compiler or ninja to build csrc/")
    ok, why = losses.impl_available(name)
    if not ok:
        pytest.skip(why)
    return name


@pytest.fixture(params=IMPLS)
def impl(request, cache_dir):  # cache_dir: the C++ op is built in the session's cache, never ~/.cache
    return _available(request.param)


@pytest.fixture(params=FUSED)
def fused(request, cache_dir):
    return _available(request.param)


# ------------------------------------------------------------------------------------- independent formulas


def rows(t):
    t = t.double()
    return t.reshape(t.shape[0], -1)


def dmd_exact(x, x_real_hat, x_fake_hat):
    """(value, gradient w.r.t. x): g = (p_real - p_fake) / (mean|p_real| + 1e-8), value 0.5 mean g^2, grad g/numel."""
    p_real = rows(x) - rows(x_real_hat)
    g = (rows(x_fake_hat) - rows(x_real_hat)) / (p_real.abs().mean(1, keepdim=True) + 1e-8)
    return 0.5 * g.square().mean(), (g / x.numel()).reshape(x.shape)


def h_exact(logits, divergence, clamp=10.0):
    r = torch.exp(-logits.double().clamp(-clamp, clamp))
    return {"rkl": torch.ones_like(r), "dijs": r / (1 + r), "fkl": r, "hellinger": r.sqrt() / 2}[divergence]


def ratio_generator_exact(x, logit_grad, logits, weight, divergence, clamp=10.0):
    B = x.shape[0]
    c = h_exact(torch.as_tensor(logits, dtype=torch.float64).reshape(-1).expand(B), divergence, clamp)
    if weight is not None:
        c = c * torch.as_tensor(weight, dtype=torch.float64).reshape(-1).expand(B)
    lg = rows(logit_grad)
    g = c[:, None] * lg / (lg.abs().mean(1, keepdim=True) + 1e-8)
    return 0.5 * g.square().mean(), (g / x.numel()).reshape(x.shape)


def denoising_exact(F, x_t, x0, sigma, sd):
    """(per-sample value, gradients w.r.t. F, x_t, x0 of the sum of the values)."""
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(F.shape[0])[:, None]
    c_skip, c_out, lam = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), (s**2 + sd**2) / (s * sd) ** 2
    err = c_skip * rows(x_t) + c_out * rows(F) - rows(x0)
    d_err = 2 * lam * err / err.shape[1]
    return ((lam * err.square()).mean(1),
            *[(k * d_err).reshape(F.shape) for k in (c_out, c_skip, -torch.ones_like(s))])


def classifier_exact(logits_gen, logits_real, weight):
    """(value, gradient w.r.t. logits_gen, w.r.t. logits_real), one logit per sample."""
    lg, lr = logits_gen.double().reshape(-1), logits_real.double().reshape(-1)
    w = torch.ones_like(lg) if weight is None else torch.as_tensor(weight, dtype=torch.float64).reshape(-1).expand(
        lg.numel())
    value = (w * (Fn.softplus(-lg) + Fn.softplus(lr))).mean()
    return (value, (-w * torch.sigmoid(-lg) / lg.numel()).reshape(logits_gen.shape),
            (w * torch.sigmoid(lr) / lg.numel()).reshape(logits_real.shape))


def close(got, want, rtol=1e-5):
    """Relative to the largest expected magnitude (gradients of size 1/numel are compared fairly)."""
    want = torch.as_tensor(want, dtype=torch.float64)
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.detach().double(), want, rtol=rtol, atol=rtol * max(scale, 1e-30))


def leaf(t):
    return t.detach().clone().requires_grad_(True)


class AtenOps(TorchDispatchMode):
    """Counts the aten ops run inside it by name ("aten.zeros", "aten.full", ...)."""

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def zero_fills(self):
        return {name: n for name, n in self.count.items() if "zero" in name}


class NoGradient(torch.autograd.Function):
    """The identity, whose backward gives its input no gradient (None)."""

    @staticmethod
    def forward(t):
        return t.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, _grad):
        return None


# ------------------------------------------------------------------------------------- add_noise latent path


def test_latent_z_and_eps_are_independent_streams_of_one_seed(impl):
    """x_t = alpha (mean + std z) + sigma eps with z and eps both drawn from `seed`: they must be independent
    (torch's CPU generator keeps only the low 32 bits of a seed, and z used to be seeded with seed + 2**32:
    z == eps, Var x_t = (alpha std + sigma)^2 instead of alpha^2 std^2 + sigma^2)."""
    shape, alpha, sigma, std = (16, 4, 32, 32), 0.8, 0.6, 0.5
    mean = torch.zeros(shape)
    x_t, clean = losses.add_noise(mean, alpha, sigma, seed=11, latent_std=torch.full(shape, std), return_x0=True,
                                  impl=impl)
    z = ((clean.double() - mean.double()) / std).flatten()
    eps = ((x_t.double() - alpha * clean.double()) / sigma).flatten()
    for draw in (z, eps):
        assert abs(draw.mean().item()) < 0.03 and abs(draw.std().item() - 1) < 0.03
    assert abs(torch.corrcoef(torch.stack([z, eps]))[0, 1].item()) < 0.03  # 65536 pairs: std error 0.004
    want_var = alpha**2 * std**2 + sigma**2  # 0.52 (z == eps gave 1.0)
    assert abs(x_t.double().var().item() - want_var) < 0.03


def test_latent_z_is_fresh_for_each_unseeded_call_with_given_noise(impl):
    """noise= given, no seed: eps is the given tensor, but z must still be drawn afresh each call (it used to be
    seed 0 every time on the torch/ext path), reproducibly under torch.manual_seed."""
    mean, std, noise = torch.zeros(4, 3, 8), torch.ones(4, 3, 8), torch.randn(4, 3, 8)

    def draw():
        return losses.add_noise(mean, 1.0, 0.5, noise=noise, latent_std=std, impl=impl)

    torch.manual_seed(5)
    first, second = draw(), draw()
    assert not torch.equal(first, second)
    torch.manual_seed(5)
    assert torch.equal(draw(), first)


# ------------------------------------------------------------------------------------- per-sample shapes


@pytest.mark.parametrize("gen_shape, real_shape", [("B", "B"), ("B1", "B1"), ("B1", "B")])
def test_classifier_takes_one_logit_per_sample_in_any_shape(impl, gen_shape, real_shape):
    """(B, 1) logits (a network's usual output) are B samples, as (B,) are, next to a (B,) or (B, 1) weight or a
    float: the reference used to broadcast (B, 1) against a (B,) weight to (B, B)."""
    B = 5
    reshape = {"B": lambda t: t, "B1": lambda t: t[:, None]}
    gen, real, w = reshape[gen_shape](torch.randn(B) * 3), reshape[real_shape](torch.randn(B) * 3), torch.rand(B)
    for weight in (None, w, w[:, None], 0.7):
        g, r = leaf(gen), leaf(real)
        loss = losses.ratio_classifier_loss(g, r, weight, impl=impl)
        loss.backward()
        want, want_g, want_r = classifier_exact(gen, real, weight)
        assert loss.shape == () and g.grad.shape == gen.shape and r.grad.shape == real.shape
        close(loss, want)
        close(g.grad, want_g)
        close(r.grad, want_r)


@pytest.mark.parametrize("divergence", ["dijs", "fkl"])
def test_ratio_generator_takes_per_sample_logits_and_weights_in_any_shape(impl, divergence):
    """logits and weight as (B,), (B, 1) or a float (the reference used to fail on (B, 1) logits and on a float)."""
    B = 3
    x, logit_grad = torch.randn(B, 2, 5), torch.randn(B, 2, 5)
    logits, w = torch.tensor([-1.5, 0.2, 2.0]), torch.tensor([0.5, 1.0, 2.0])
    for lo, weight in ((logits[:, None], w), (logits, w[:, None]), (0.3, 2.0), (logits[:, None], 0.5)):
        xl = leaf(x)
        loss = losses.ratio_generator_loss(xl, logit_grad, lo, weight, divergence, impl=impl)
        loss.backward()
        want, want_grad = ratio_generator_exact(x, logit_grad, lo, weight, divergence)
        close(loss, want)
        close(xl.grad, want_grad)


def test_per_sample_arguments_of_the_wrong_size_are_named(impl):
    x, g = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"logits must hold one value per sample \(B=3.*got shape \(3, 2\)"):
        losses.ratio_generator_loss(x, g, torch.randn(3, 2), impl=impl)
    with pytest.raises(ValueError, match=r"weight must hold one value per sample \(B=3.*got shape \(2,\)"):
        losses.ratio_classifier_loss(torch.randn(3, 1), torch.randn(3), torch.rand(2), impl=impl)
    with pytest.raises(ValueError, match=r"logits_gen \(3,\) and logits_real \(4,\)"):
        losses.ratio_classifier_loss(torch.randn(3), torch.randn(4), impl=impl)
    with pytest.raises(ValueError, match=r"sigma must hold one value per sample \(B=3"):
        losses.denoising_loss(x, x, x, torch.rand(2), 0.5, impl=impl)


# ------------------------------------------------------------------------------------- batch and dtype rules


def test_one_dimensional_inputs_are_batches_of_scalars(impl):
    """A (B,) tensor is B samples of one element in every implementation (the reference used to raise
    IndexError)."""
    x, rh, fh = torch.randn(5), torch.randn(5), torch.randn(5)
    xl = leaf(x)
    loss = losses.dmd_loss(xl, rh, fh, impl=impl)
    loss.backward()
    want, want_grad = dmd_exact(x, rh, fh)
    close(loss, want)
    close(xl.grad, want_grad)
    sigma = torch.rand(5) + 0.2
    Fl = leaf(x)
    per = losses.denoising_loss(Fl, rh, fh, sigma, 0.5, impl=impl)
    per.sum().backward()
    want, want_F, _, _ = denoising_exact(x, rh, fh, sigma, 0.5)
    close(per, want)
    close(Fl.grad, want_F)


def test_a_0d_input_or_integer_data_is_refused_with_its_name(impl):
    with pytest.raises(ValueError, match="add_noise: x0 must have a batch dimension"):
        losses.add_noise(torch.tensor(1.0), 1.0, 0.5, seed=1, impl=impl)
    with pytest.raises(ValueError, match="dmd_loss: x must have a batch dimension"):
        losses.dmd_loss(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(2.0), impl=impl)
    ints = torch.randint(0, 5, (3, 4))
    with pytest.raises(TypeError, match="dmd_loss: x must be a floating-point tensor, got torch.int64"):
        losses.dmd_loss(ints, ints, ints, impl=impl)
    with pytest.raises(TypeError, match="add_noise: x0 must be a floating-point tensor"):
        losses.add_noise(ints, 1.0, 0.5, seed=1, impl=impl)
    with pytest.raises(TypeError, match="ratio_classifier_loss: logits_gen must be a floating-point tensor"):
        losses.ratio_classifier_loss(torch.tensor([1, 2]), torch.tensor([1.0, 2.0]), impl=impl)
    with pytest.raises(TypeError, match="denoising_loss: x0 must be a floating-point tensor"):
        losses.denoising_loss(torch.randn(3, 4), torch.randn(3, 4), ints, 1.0, 0.5, impl=impl)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the Triton interpreter
def test_clamp_inf_turns_the_clamp_off(impl):
    """clamp=inf: no clamp (logits beyond 10 count), and a value beyond fp32's range is inf, not an error (the
    C++ op refused to store it)."""
    x, g = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    logits = torch.tensor([12.0, -12.0, 0.0])
    want, _ = ratio_generator_exact(x, g, logits, None, "fkl", clamp=float("inf"))
    close(losses.ratio_generator_loss(x, g, logits, None, "fkl", clamp=float("inf"), impl=impl), want)
    huge = losses.ratio_generator_loss(x, g, torch.tensor([50.0, -50.0, 0.0]), None, "fkl", clamp=float("inf"),
                                       impl=impl)
    assert huge.item() == float("inf")


# ------------------------------------------------------------------------------------- autograd


def test_fused_backward_refuses_a_second_derivative(fused):
    """create_graph=True, then a gradient of the gradient: the fused backward returns the gradient the forward
    wrote (a constant to autograd), so the second derivative would silently lack every input-dependent term. It
    raises instead; the first-order gradient under create_graph is unchanged."""
    B = 3
    x, rh, fh, lg = torch.randn(B, 2, 4), torch.randn(B, 2, 4), torch.randn(B, 2, 4), torch.randn(B, 2, 4)
    sigma = torch.rand(B) + 0.2
    calls = {
        "dmd_loss": (lambda t: losses.dmd_loss(t, rh, fh, impl=fused), lambda: dmd_exact(x, rh, fh)[1]),
        "ratio_generator_loss": (lambda t: losses.ratio_generator_loss(t, lg, torch.randn(B), None, "rkl",
                                                                       impl=fused),
                                 lambda: ratio_generator_exact(x, lg, 0.0, None, "rkl")[1]),
        "denoising_loss": (lambda t: losses.denoising_loss(t, rh, fh, sigma, 0.5, impl=fused).sum(),
                           lambda: denoising_exact(x, rh, fh, sigma, 0.5)[1]),
        "ratio_classifier_loss": (lambda t: losses.ratio_classifier_loss(t[:, 0, 0], rh[:, 0, 0], impl=fused),
                                  None),
    }
    for name, (loss_of, first_order) in calls.items():
        xl = leaf(x)
        (g,) = torch.autograd.grad(loss_of(xl), xl, create_graph=True)
        if first_order is not None:
            close(g, first_order())
        with pytest.raises(RuntimeError, match=rf"{name} \(impl='{fused}'\) has no second derivative"):
            (g * g).sum().backward()


def test_a_gradient_penalty_through_a_fused_classifier_raises(fused):
    """The case that was silently wrong: the classifier's logits come from a network, the penalty is on the
    input gradient (grad_output of the loss is 1 and does not require grad, where once_differentiable alone
    would not step in)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    loss = losses.ratio_classifier_loss(net(a), net(b), impl=fused)
    (ga,) = torch.autograd.grad(loss, a, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        ga.square().sum().backward()


def test_constants_that_require_grad_get_no_gradient(impl):
    """x_real_hat, x_fake_hat, logit_grad, logits, sigma and the weights are constants in every implementation:
    alone they leave the loss without a gradient (the Triton backward used to crash on them), next to a
    trained input they get None and the trained input its usual gradient."""
    B = 3
    x, rh, fh, lg = torch.randn(B, 2, 4), torch.randn(B, 2, 4), torch.randn(B, 2, 4), torch.randn(B, 2, 4)
    sigma, w, lo = torch.rand(B) + 0.2, torch.rand(B), torch.randn(B)
    constants_only = [
        losses.dmd_loss(x, rh, leaf(fh), impl=impl),
        losses.ratio_generator_loss(x, leaf(lg), leaf(lo), leaf(w), impl=impl),
        losses.denoising_loss(x, rh, fh, leaf(sigma), 0.5, impl=impl),
        losses.ratio_classifier_loss(lo, -lo, leaf(w), impl=impl),
    ]
    assert not any(loss.requires_grad for loss in constants_only)

    xl, sl, fl = leaf(x), leaf(sigma), leaf(fh)
    losses.denoising_loss(xl, rh, fh, sl, 0.5, impl=impl).sum().backward()
    assert sl.grad is None
    close(xl.grad, denoising_exact(x, rh, fh, sigma, 0.5)[1])
    xl = leaf(x)
    losses.dmd_loss(xl, rh, fl, impl=impl).backward()
    assert fl.grad is None
    close(xl.grad, dmd_exact(x, rh, fh)[1])
    gen, wl = leaf(lo), leaf(w)
    losses.ratio_classifier_loss(gen, -lo, wl, impl=impl).backward()
    assert wl.grad is None
    close(gen.grad, classifier_exact(lo, -lo, w)[1])


def test_a_fused_backward_allocates_no_zero_gradient_for_the_gradient_it_wrote(fused):
    """The forward returns the gradient it wrote as a second, non-differentiable output, which never gets a
    gradient. Autograd used to materialise a zero tensor of its size for the backward (an fp32 allocation and a
    memset as large as the trained input, every step); no zeros are made now."""
    for name, loss_of, x, _ in loss_calls(3, fused):
        loss = loss_of(leaf(x)).sum()
        with AtenOps() as ops:
            loss.backward()
        assert not ops.zero_fills(), (name, ops.zero_fills())


def test_a_loss_that_gets_no_gradient_gives_its_inputs_none(impl):
    """A backward called with None for the loss (a later node gave it no gradient; autograd no longer turns that
    into zeros) returns None for every input instead of failing: the trained input gets only its other terms."""
    for name, loss_of, x, _ in loss_calls(3, impl):
        xl = leaf(x)
        (g,) = torch.autograd.grad(NoGradient.apply(loss_of(xl)).sum() + xl.sum(), xl)
        close(g, torch.ones_like(x))


# ------------------------------------------------------------------------------------- fp16 under loss scaling

SCALE = 65536.0  # a typical dynamic loss scale: above fp16's largest finite value (65504)


def fp16_close(got, want):
    """Within fp16 rounding of the exact value (one rounding: 2^-11 relative, here 2e-3 of the largest)."""
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    close(got, want, rtol=2e-3)


def test_fp16_gradients_under_loss_scaling(impl):
    """fp16 inputs, the loss multiplied by 2^16. The fused paths used to round g/numel to fp16 in the forward
    (subnormals here: 1e-2 relative error once scaled) and the C++ op cast grad_output to fp16 (inf)."""
    torch.manual_seed(3)
    B, shape = 4, (4, 8, 16)
    x, rh = torch.randn(shape).half(), torch.randn(shape).half()
    fh = (rh.float() + 1e-3 * torch.randn(shape)).half()  # real and fake scores nearly agree: |g| ~ 1e-3
    xl = leaf(x)
    (losses.dmd_loss(xl, rh, fh, impl=impl) * SCALE).backward()
    fp16_close(xl.grad, dmd_exact(x, rh, fh)[1] * SCALE)

    lg, logits = (1e-2 * torch.randn(shape)).half(), torch.randn(B)
    xl = leaf(x)
    (losses.ratio_generator_loss(xl, lg, logits, 1e-2, "dijs", impl=impl) * SCALE).backward()
    fp16_close(xl.grad, ratio_generator_exact(x, lg, logits, 1e-2, "dijs")[1] * SCALE)

    F, x_t, x0, sigma = torch.randn(shape).half(), torch.randn(shape).half(), torch.randn(shape).half(), torch.rand(B)
    leaves = [leaf(t) for t in (F, x_t, x0)]
    per = losses.denoising_loss(*leaves, sigma + 0.5, 0.5, impl=impl)
    per.backward(torch.full((B,), SCALE))
    for got, want in zip(leaves, denoising_exact(F, x_t, x0, sigma + 0.5, 0.5)[1:]):
        fp16_close(got.grad, want * SCALE)

    gen, real = leaf(torch.randn(B).half()), leaf(torch.randn(B).half())
    (losses.ratio_classifier_loss(gen, real, impl=impl) * SCALE).backward()
    _, want_gen, want_real = classifier_exact(gen, real, None)
    fp16_close(gen.grad, want_gen * SCALE)
    fp16_close(real.grad, want_real * SCALE)


def test_a_nonfinite_row_of_x_gives_the_same_finite_value_in_every_implementation(impl):
    """The row is dropped (zero gradient); the value is 0.5 mean g^2 over the other rows' g, as the fused kernels
    compute it (the reference gave NaN: its surrogate multiplied the NaN by the row's zero)."""
    x, x_real_hat, x_fake_hat, logit_grad = (torch.randn(3, 2, 4) for _ in range(4))
    x[1, 0, 2] = float("nan")
    x[2, 1, 1] = float("inf")
    finite = torch.tensor([True, False, False])
    want_value, want_grad = dmd_exact(x[finite], x_real_hat[finite], x_fake_hat[finite])
    x_ = leaf(x)
    value = losses.dmd_loss(x_, x_real_hat, x_fake_hat, impl=impl)
    value.backward()
    close(value, want_value * finite.sum() / 3)  # the dropped rows count in the mean as zeros
    close(x_.grad[finite], want_grad * finite.sum() / 3)
    assert torch.equal(x_.grad[~finite], torch.zeros_like(x_.grad[~finite]))
    value = losses.ratio_generator_loss(x, logit_grad, torch.randn(3), None, "dijs", impl=impl)
    assert torch.isfinite(value)


# ------------------------------------------------------------------------------------- empty batches


EMPTY_SHAPES = [(0, 2, 4), (0,), (3, 0)]  # no samples, no samples of one element, samples of no elements


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_an_empty_batch_gives_a_zero_scalar_loss_and_empty_gradients(impl, shape):
    """A scalar loss over no elements is 0 (finite, differentiable, zero-size gradients) in every implementation:
    a rank whose shard is empty must not send NaN into the DDP all-reduce. Triton used to give 0 for dmd_loss
    and ratio_generator_loss but NaN for the classifier; torch and the C++ op gave NaN for all three."""
    x, rh, fh, lg = (torch.randn(shape) for _ in range(4))
    B = shape[0]
    calls = {
        "dmd_loss": lambda t: losses.dmd_loss(t, rh, fh, impl=impl),
        "ratio_generator_loss": lambda t: losses.ratio_generator_loss(t, lg, torch.randn(B), torch.rand(B), "dijs",
                                                                      impl=impl),
        "ratio_classifier_loss": lambda t: losses.ratio_classifier_loss(t.reshape(-1)[:B], rh.reshape(-1)[:B],
                                                                        impl=impl),
    }
    for name, loss_of in calls.items():
        xl = leaf(x)
        value = loss_of(xl)
        assert value.shape == () and value.dtype == torch.float32 and value.requires_grad, name
        assert value.item() == 0.0, f"{name}: {value.item()}"
        (g,) = torch.autograd.grad(value, xl)
        assert g.shape == x.shape and not g.any(), name


def test_an_empty_batch_gives_empty_per_sample_losses_and_noised_samples(impl):
    """denoising_loss and add_noise of no samples: shape-(0,) values and zero-size gradients for every input that
    requires grad (alpha and sigma included), through the latent path too."""
    shape = (0, 3, 4)
    F, x_t, x0 = leaf(torch.randn(shape)), leaf(torch.randn(shape)), leaf(torch.randn(shape))
    per = losses.denoising_loss(F, x_t, x0, torch.rand(0) + 0.2, 0.5, impl=impl)
    assert per.shape == (0,) and per.dtype == torch.float32
    for got, want in zip(torch.autograd.grad(per.sum(), (F, x_t, x0)), (F, x_t, x0)):
        assert got.shape == want.shape
    alpha, sigma = leaf(torch.rand(0)), leaf(torch.rand(0))
    noised = losses.add_noise(x0, alpha, sigma, seed=3, impl=impl, latent_std=torch.ones(shape),
                              latent_scale=torch.ones(3))
    assert noised.shape == shape
    for got, want in zip(torch.autograd.grad(noised.sum(), (x0, alpha, sigma)), (x0, alpha, sigma)):
        assert got.shape == want.shape


# ------------------------------------------------------------------------------------- add_noise: alpha, sigma


def noising_cases(B, shape):
    """(name, add_noise keyword arguments): eps drawn from the seed or given, and the latent path (z drawn from
    the seed, per-channel scale and bias)."""
    return [
        ("seeded", dict(seed=7)),
        ("given noise", dict(noise=torch.randn(shape))),
        ("latent", dict(seed=7, latent_std=torch.rand(shape) + 0.5, latent_scale=torch.rand(shape[1]) + 0.5,
                        latent_bias=torch.randn(shape[1]))),
    ]


@pytest.mark.parametrize("per_sample", ["B", "B1", "one"])
def test_add_noise_gives_alpha_and_sigma_their_gradients(impl, per_sample):
    """d/dalpha_i = sum_j x0_ij g_ij (x0: the clean sample, the latent path's sampled one) and d/dsigma_i =
    sum_j eps_ij g_ij (eps regenerated from the seed when it was not stored), in alpha's and sigma's own shapes,
    against torch autograd of the reference noising the same clean sample with the same eps (read back from
    the call's outputs). The Triton path used to give alpha and sigma no gradient at all."""
    B, shape = 4, (4, 3, 2, 5)
    make = {"B": lambda v: v, "B1": lambda v: v[:, None], "one": lambda v: v[:1].reshape(())}[per_sample]
    alpha, sigma = make(torch.rand(B) + 0.5), make(torch.rand(B) + 0.5)
    x0, w = torch.randn(shape), torch.randn(shape)  # w: the incoming gradient g
    for name, kwargs in noising_cases(B, shape):
        a, s = leaf(alpha), leaf(sigma)
        x_t, clean = losses.add_noise(x0, a, s, impl=impl, return_x0=True, **kwargs)
        got = torch.autograd.grad((x_t * w).sum(), (a, s))

        a64, s64 = alpha.double().reshape(-1, 1, 1, 1), sigma.double().reshape(-1, 1, 1, 1)
        eps = kwargs.get("noise", (x_t.double() - a64 * clean.double()) / s64)
        a_ref, s_ref = leaf(alpha.double()), leaf(sigma.double())
        x_ref = ref.add_noise(clean.double(), a_ref, s_ref, noise=eps.double())
        want = torch.autograd.grad((x_ref * w.double()).sum(), (a_ref, s_ref))
        for g, wg, arg in zip(got, want, ("alpha", "sigma")):
            assert g.shape == wg.shape and g.dtype == torch.float32, (name, arg)
            close(g, wg, rtol=1e-4)


# ------------------------------------------------------------------------------------- add_noise: latent gradients


def drawn(impl, shape, seed, stream):
    """The eps or z (`stream` "eps" / "latent") an implementation drew for `seed`, exactly: Triton's Philox streams,
    or torch's generator (torch and ext draw through the reference, z seeded with latent_seed)."""
    if impl == "triton":
        from fastonestep.kernels import triton_noise

        return triton_noise.regenerate_noise(shape, seed, stream=stream)
    gen = torch.Generator().manual_seed(ref.latent_seed(seed) if stream == "latent" else seed)
    return torch.randn(shape, generator=gen)


def latent_affines(C):
    """(name, latent_scale, latent_bias) in the shapes add_noise accepts: one value per channel, as (C,) or
    (1, C, 1, 1), and one value for every channel, as a 0-d or a (1,) tensor."""
    return [
        ("per-channel", torch.rand(C) + 0.5, torch.randn(1, C, 1, 1)),
        ("scalar", torch.rand(()) + 0.5, torch.randn(1)),
    ]


def latent_reference_grads(trained, constants, w, w2):
    """torch.autograd.grad of the eager reference (latent_sample, then add_noise) for the loss
    sum(x_t w) + sum(clean w2): {name: gradient} for each argument in `trained`, taken as a float64 leaf;
    `constants` holds the others (a drawn z or eps, alpha or sigma given as numbers)."""
    leaves = {k: leaf(v.double()) for k, v in trained.items()}
    args = {**{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in constants.items()}, **leaves}
    clean = ref.latent_sample(args["mean"], args["std"], args["z"], args["scale"], args["bias"])
    x_t = ref.add_noise(clean, args["alpha"], args["sigma"], noise=args["noise"])
    loss = (x_t * w.double()).sum() + (clean * w2.double()).sum()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("per_sample", ["number", "B", "B1"])
@pytest.mark.parametrize("z_from", ["seed", "given"])
def test_add_noise_latent_path_gives_every_input_its_gradient(impl, dtype, per_sample, z_from):
    """The mean, latent_std, latent_scale, latent_bias (and a given latent_noise z, and noise) get the eager
    reference's gradients, in their own shapes and dtypes, with z and eps regenerated from the seed when they
    were drawn, through x_t and the returned clean sample. The Triton path used to refuse std, scale and bias
    that require grad, and gave a given z none."""
    B, shape, seed = 4, (4, 3, 2, 5), 9
    make = {"number": lambda v: 0.8, "B": lambda v: v, "B1": lambda v: v[:, None]}[per_sample]
    alpha, sigma = make(torch.rand(B) + 0.5), make(torch.rand(B) + 0.5)
    mean, std, w, w2 = (torch.randn(shape).to(dtype), (torch.rand(shape) + 0.5).to(dtype),
                        torch.randn(shape).to(dtype), torch.randn(shape).to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for name, scale, bias in latent_affines(shape[1]):
        inputs = dict(mean=mean, std=std, scale=scale, bias=bias)
        if z_from == "given":
            inputs.update(z=torch.randn(shape).to(dtype), noise=torch.randn(shape).to(dtype))
        per = dict(alpha=alpha, sigma=sigma)
        trained = {k: leaf(v) for k, v in {**inputs, **per}.items() if isinstance(v, torch.Tensor)}
        x_t, clean = losses.add_noise(
            trained["mean"], trained.get("alpha", alpha), trained.get("sigma", sigma), noise=trained.get("noise"),
            seed=seed, impl=impl, latent_std=trained["std"], latent_noise=trained.get("z"),
            latent_scale=trained["scale"], latent_bias=trained["bias"], return_x0=True)
        loss = (x_t.float() * w.float()).sum() + (clean.float() * w2.float()).sum()
        got = dict(zip(trained, torch.autograd.grad(loss, list(trained.values()))))

        drawn_ones = dict(z=drawn(impl, shape, seed, "latent"), noise=drawn(impl, shape, seed, "eps"))
        constants = {k: v for k, v in {**drawn_ones, **per}.items() if k not in trained}
        want = latent_reference_grads({k: v.detach() for k, v in trained.items()}, constants, w, w2)
        for k, g in got.items():
            arg = trained[k]
            assert g.shape == arg.shape and g.dtype == arg.dtype, (name, k, g.shape, g.dtype)
            close(g, want[k], rtol=tol)


def test_triton_add_noise_keeps_a_full_size_input_only_for_a_gradient_that_reads_it(cache_dir):
    """The latent gradients cost the forward no memory unless asked for: with only the mean trained, nothing of
    the sample's size is saved for the backward; std's gradient keeps a given z (a drawn one is regenerated),
    z's keeps std, scale's the mean, std and z."""
    _available("triton")
    shape = (2, 3, 4)
    mean, std, z, scale = torch.randn(shape), torch.rand(shape) + 0.5, torch.randn(shape), torch.rand(3) + 0.5

    def full_size_saved(**trained):
        args = dict(dict(mean=mean, std=std, z=z, scale=scale), **{k: leaf(v) for k, v in trained.items()})
        x_t = losses.add_noise(args["mean"], 0.8, 0.6, seed=1, latent_std=args["std"], latent_noise=args["z"],
                               latent_scale=args["scale"], impl="triton")
        return sum(t is not None and t.shape == shape for t in x_t.grad_fn.saved_tensors)

    assert full_size_saved(mean=mean) == 0
    assert full_size_saved(std=std) == 1
    assert full_size_saved(z=z) == 1
    assert full_size_saved(scale=scale) == 3


def test_triton_add_noise_builds_its_kernel_vectors_once(monkeypatch):
    """alpha and sigma become (B,) fp32 vectors and the latent scale and bias per-channel ones, once per call: a number
    takes one fill (and alpha and sigma one copy of the expanded fill). The autograd Function's forward and its
    setup_context used to build each twice, under no_grad too, where every training step calls add_noise."""
    from fastonestep.kernels import triton_noise

    monkeypatch.setattr(triton_noise, "_launch", lambda *args, **kwargs: None)  # count the wrapper, not the kernel
    B, shape = 4, (4, 3, 2)
    x0, sigma, noise, std = torch.randn(shape), torch.rand(B), torch.randn(shape), torch.rand(shape)

    def ops_of(x0, alpha, sigma, **kwargs):
        with AtenOps() as ops:
            triton_noise.add_noise(x0, alpha, sigma, **kwargs)
        return ops.count

    with torch.no_grad():
        ops = ops_of(x0, 1.0, sigma, noise=noise)  # one number: alpha
        assert (ops["aten.full"], ops["aten.clone"]) == (1, 1), ops
        ops = ops_of(x0, 1.0, 0.5, seed=3, latent_std=std, latent_scale=0.5, latent_bias=0.1)  # four numbers
        assert (ops["aten.full"], ops["aten.clone"]) == (4, 2), ops
        ops = ops_of(x0, torch.rand(B), sigma, noise=noise)  # none: the (B,) tensors are used as they are
        assert (ops["aten.full"], ops["aten.clone"]) == (0, 0), ops
    ops = ops_of(leaf(x0), 1.0, sigma, noise=noise)  # recording the graph builds nothing again
    assert (ops["aten.full"], ops["aten.clone"]) == (1, 1), ops


@pytest.mark.parametrize("used", ["x_t", "clean"])
def test_triton_add_noise_backward_makes_no_zeros_for_an_unused_output(used):
    """return_x0=True and only one of (x_t, clean sample) in the loss: the other output gets no gradient, and the
    backward used to receive a zero tensor for it (and start the clean sample's gradient from another); the gradient
    is unchanged, now without any zero fill."""
    _available("triton")
    shape = (3, 2, 4)
    mean, std, w = torch.randn(shape), torch.rand(shape) + 0.5, torch.randn(shape)
    scale = torch.rand(2) + 0.5
    alpha = 0.8

    def loss(m):
        x_t, clean = losses.add_noise(m, alpha, 0.6, seed=1, latent_std=std, latent_scale=scale, return_x0=True,
                                      impl="triton")
        return ((x_t if used == "x_t" else clean) * w).sum()

    m = leaf(mean)
    out = loss(m)
    with AtenOps() as ops:
        out.backward()
    assert not ops.zero_fills(), ops.zero_fills()
    want = w * scale.view(1, -1, 1) * (alpha if used == "x_t" else 1.0)  # d/dmean = (alpha) * scale_c * w
    close(m.grad, want)


def test_triton_add_noise_gradients_follow_their_arguments_device():
    """alpha, sigma, the latent scale and bias may live on another device than x0 (a CPU 0-d or (B,) alpha next to
    a CUDA x0: the kernel reads a copy on x0's). Their gradients are returned on the argument's own device, which
    autograd requires of a (B,) gradient. The helpers, with the meta device standing for the other one."""
    from fastonestep.kernels import triton_noise

    meta = torch.empty(4, device="meta", dtype=torch.float64)
    values, g = torch.randn(4, 3), torch.randn(4, 3)
    grad = triton_noise._per_sample_grad(values, g, triton_noise._grad_like(meta))
    assert (grad.device.type, grad.dtype, grad.shape) == ("meta", torch.float64, (4,))
    meta_scale = torch.empty(1, 3, 1, device="meta")
    grad = triton_noise._channel_grad(torch.randn(4, 3, 2), triton_noise._grad_like(meta_scale))
    assert (grad.device.type, grad.shape) == ("meta", (1, 3, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA x0 next to CPU per-sample arguments")
def test_triton_add_noise_gives_cpu_alpha_and_sigma_their_gradients_with_a_cuda_x0():
    _available("triton")
    B = 4
    x0 = torch.randn(B, 3, 8, device="cuda")
    alpha, sigma = leaf(torch.rand(B) + 0.5), leaf(torch.rand(()) + 0.5)
    x_t = losses.add_noise(x0, alpha, sigma, seed=2, impl="triton")
    x_t.sum().backward()
    assert alpha.grad.device.type == "cpu" and sigma.grad.device.type == "cpu"
    close(alpha.grad, x0.sum(dim=(1, 2)).cpu(), rtol=1e-4)


# ------------------------------------------------------------------------------------- torch.func


def loss_calls(B, impl):
    """(name, loss of the trained input, trained input, cotangent for vjp): each fused loss as torch.func sees it."""
    torch.manual_seed(1)
    x, rh, fh, lg = (torch.randn(B, 2, 4) for _ in range(4))
    logits, w, sigma = torch.randn(B), torch.rand(B), torch.rand(B) + 0.2
    return [
        ("dmd_loss", lambda t: losses.dmd_loss(t, rh, fh, impl=impl), x, torch.tensor(3.0)),
        ("ratio_generator_loss", lambda t: losses.ratio_generator_loss(t, lg, logits, w, "dijs", impl=impl), x,
         torch.tensor(-2.0)),
        ("denoising_loss", lambda t: losses.denoising_loss(t, rh, fh, sigma, 0.5, impl=impl), x, torch.randn(B)),
        ("ratio_classifier_loss", lambda t: losses.ratio_classifier_loss(t, logits, w, impl=impl), lg[:, 0, 0],
         torch.tensor(0.5)),
    ]


def test_torch_func_grad_and_vjp_of_the_fused_losses_match_torch(fused):
    """torch.func.grad and torch.func.vjp (a cotangent other than 1) through the fused autograd formulas give the
    torch implementation's gradients; they used to raise (the autograd Functions had no setup_context)."""
    for (name, fused_loss, x, cotangent), (_, torch_loss, _, _) in zip(loss_calls(3, fused), loss_calls(3, "torch")):
        want = torch.func.vjp(torch_loss, x)[1](cotangent)[0]
        got = torch.func.vjp(fused_loss, x)[1](cotangent)[0]
        close(got, want)
        if cotangent.ndim == 0:
            close(torch.func.grad(fused_loss)(x), torch.func.grad(torch_loss)(x))
        assert got.shape == x.shape, name


def test_torch_func_grad_of_add_noise_matches_autograd(impl):
    """torch.func.grad of a loss of add_noise's x_t w.r.t. x0 and alpha, through the latent path with the eps and z
    drawn from a seed, equals what torch.autograd.grad gives for the same call."""
    shape = (3, 2, 4)
    x0, alpha, w = torch.randn(shape), torch.rand(3) + 0.5, torch.randn(shape)
    std, scale = torch.rand(shape), torch.rand(2) + 0.5

    def loss(x0, alpha):
        return (losses.add_noise(x0, alpha, 0.7, seed=5, latent_std=std, latent_scale=scale, impl=impl) * w).sum()

    got = torch.func.grad(loss, argnums=(0, 1))(x0, alpha)
    xl, al = leaf(x0), leaf(alpha)
    want = torch.autograd.grad(loss(xl, al), (xl, al))
    for g, wg in zip(got, want):
        close(g, wg)


@pytest.mark.parametrize("z_from", ["seed", "given"])
def test_torch_func_grad_of_add_noise_reaches_the_latent_inputs(impl, z_from):
    """torch.func.grad w.r.t. the mean, latent_std, latent_scale, latent_bias (and a given z) through the latent
    path, the clean sample in the loss too, equals torch.autograd.grad of the same call (Triton used to refuse)."""
    shape = (3, 2, 4)
    mean, std, w, w2 = torch.randn(shape), torch.rand(shape) + 0.5, torch.randn(shape), torch.randn(shape)
    scale, bias = torch.rand(2) + 0.5, torch.randn(1, 2, 1)
    args = (mean, std, scale, bias) + ((torch.randn(shape),) if z_from == "given" else ())

    def loss(mean, std, scale, bias, z=None):
        x_t, clean = losses.add_noise(mean, torch.rand(3) + 0.5, 0.7, seed=5, latent_std=std, latent_noise=z,
                                      latent_scale=scale, latent_bias=bias, return_x0=True, impl=impl)
        return (x_t * w).sum() + (clean * w2).sum()

    torch.manual_seed(2)  # the same alpha in both calls
    got = torch.func.grad(loss, argnums=tuple(range(len(args))))(*args)
    leaves = [leaf(t) for t in args]
    torch.manual_seed(2)
    want = torch.autograd.grad(loss(*leaves), leaves)
    for g, wg, arg in zip(got, want, args):
        assert g.shape == arg.shape
        close(g, wg)


def test_torch_func_refuses_a_second_derivative_and_vmap_of_the_fused_losses(fused):
    """grad of grad raises the fused paths' no-second-derivative error (it used to be silently 0 once grad ran);
    vmap raises an error that says so and names the loss."""
    for name, loss_of, x, _ in loss_calls(3, fused):
        scalar = (lambda t, f=loss_of: f(t).sum())
        with pytest.raises(RuntimeError, match=rf"{name} \(impl='{fused}'\) has no second derivative"):
            torch.func.grad(lambda t: torch.func.grad(scalar)(t).square().sum())(x)
        with pytest.raises(NotImplementedError, match=rf"{name} \(impl='{fused}'\) does not support torch.func.vmap"):
            torch.func.vmap(scalar)(x[None].expand(2, *x.shape))


def test_torch_func_grad_of_a_create_graph_gradient_taken_inside_it(impl):
    """torch.func.grad of a function that takes a create_graph=True torch.autograd.grad of the loss itself (a
    gradient penalty written eagerly inside the transform): the fused paths used to return zeros silently, since the
    backward's gradient is a constant to the transform; they raise now. torch gives what eager autograd gives (0 for
    the surrogate losses, whose gradient does not depend on x). Likewise eager autograd through torch.func.grad's
    result (it used to raise that the result does not require grad)."""
    for name, loss_of, x, _ in loss_calls(3, impl):
        def penalty(t, f=loss_of):
            (g,) = torch.autograd.grad(f(t).sum(), t, create_graph=True)
            return g.square().sum()

        if impl in FUSED:
            with pytest.raises(RuntimeError, match=rf"{name} \(impl='{impl}'\) has no second derivative"):
                torch.func.grad(penalty)(x)
            xl = leaf(x)
            with pytest.raises(RuntimeError, match=rf"{name} \(impl='{impl}'\) has no second derivative"):
                torch.func.grad(lambda t, f=loss_of: f(t).sum())(xl).square().sum().backward()
            continue
        xl = leaf(x)
        eager = penalty(xl)
        want = torch.autograd.grad(eager, xl)[0] if eager.requires_grad else torch.zeros_like(x)
        close(torch.func.grad(penalty)(x), want)
