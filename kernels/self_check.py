"""First-use check of a fused implementation against the eager reference, on the device it will run on.

Why: CI has no GPU, so the compiled Triton kernels and the CUDA op are tested there only through the Triton
interpreter and the C++ twin of the op. On a GPU, fastonestep.losses runs this once per process and
implementation before the first fused call: every public function on small odd-shaped inputs (values and
gradients, a non-unit grad_output, a NaN row, every divergence, the fused latent path), in fp32 and, on CUDA,
bf16. A wrong or miscompiled kernel then costs a warning and the eager path, never a run trained on wrong
gradients. The inputs are tiny; the cost is the kernels' compilation, which the first real call pays anyway.
"""
from __future__ import annotations

import torch

# Odd sizes: partial blocks, rows that do not divide the block width. The second has samples of more than one
# Triton chunk (4096 elements, the last one partial): the multi-chunk path every real image size takes.
SHAPES = ((3, 2, 5, 7), (2, 3, 41, 53))
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _mismatch(got, want, what: str, dtype) -> str | None:
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    tol = TOLERANCE[dtype]
    scale = float(want.nan_to_num().abs().max()) if want.numel() else 0.0
    if not torch.allclose(got, want, rtol=tol, atol=tol * max(scale, 1e-6), equal_nan=True):
        diff = float((got - want).nan_to_num(nan=float("inf")).abs().max())
        return f"{what}: differs from the eager reference by {diff:.3g} (scale {scale:.3g}, tolerance {tol:g})"
    return None


class _Inputs:
    """Seeded CPU draws, moved to the device in the dtype under test."""

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator().manual_seed(1234)

    def randn(self, *shape, grad=False, dtype=None):
        t = torch.randn(shape, generator=self.gen).to(self.device, dtype or self.dtype)
        return t.requires_grad_(grad)

    def positive(self, *shape):
        return (torch.rand(shape, generator=self.gen) + 0.2).to(self.device, torch.float32)


def _compare_calls(fn, impl, make_args, grads_of, grad_output, what, dtype):
    """fn(*args, impl) for the fused impl and for "torch" on identical inputs: output and gradients."""
    results = []
    for name in (impl, "torch"):
        args = make_args()
        out = fn(*args, impl=name)
        outs = out if isinstance(out, tuple) else (out,)
        leaves = [args[i] for i in grads_of]
        grads = torch.autograd.grad(outs[0], leaves, grad_output(outs[0])) if leaves else ()
        results.append((outs, grads))
    (got, got_grads), (want, want_grads) = results
    for i, (g, w) in enumerate(zip(got, want)):
        if (err := _mismatch(g, w, f"{what} output {i}", dtype)):
            return err
    for i, g, w in zip(grads_of, got_grads, want_grads):
        if (err := _mismatch(g, w, f"{what} gradient w.r.t. argument {i}", dtype)):
            return err
    return None


def _replayed(inputs: _Inputs, build):
    """A function returning the same freshly built arguments on every call (the generator state is replayed)."""
    state = inputs.gen.get_state()

    def make():
        inputs.gen.set_state(state)
        return build()

    return make


def _checks(losses, impl, device, dtype, shape):
    x = _Inputs(device, dtype)
    B = shape[0]

    yield _compare_calls(losses.add_noise, impl,
                         _replayed(x, lambda: (x.randn(*shape), x.positive(B), x.positive(B), x.randn(*shape))),
                         (), None, "add_noise", dtype)

    def latent_noise(*args, impl):
        mean, sigma, noise, std, z, scale, bias = args
        return losses.add_noise(mean, 1.0, sigma, noise=noise, latent_std=std, latent_noise=z, latent_scale=scale,
                                latent_bias=bias, return_x0=True, impl=impl)

    yield _compare_calls(latent_noise, impl, _replayed(x, lambda: (
        x.randn(*shape), x.positive(B), x.randn(*shape), x.randn(*shape).abs(), x.randn(*shape),
        x.positive(shape[1]), x.positive(shape[1]))), (), None, "add_noise (latent sampling)", dtype)

    x0, sigma = x.randn(*shape), x.positive(B)
    first = losses.add_noise(x0, 1.0, sigma, seed=7, impl=impl)
    again = losses.add_noise(x0, 1.0, sigma, seed=7, impl=impl)
    if not torch.equal(first, again) or not torch.isfinite(first).all():
        yield "add_noise with a seed: two calls with the same seed differ, or give non-finite values"

    yield _compare_calls(lambda F, x_t, x0, s, impl: losses.denoising_loss(F, x_t, x0, s, 0.5, impl=impl), impl,
                         _replayed(x, lambda: (x.randn(*shape, grad=True), x.randn(*shape), x.randn(*shape),
                                               x.positive(B))),
                         (0,), lambda out: torch.linspace(0.5, 2.0, out.numel(), device=device).to(out.dtype),
                         "denoising_loss", dtype)

    def dmd_inputs():
        real = x.randn(*shape)
        real[1].view(-1)[-1] = float("nan")  # a non-finite row (in its last chunk): gradient 0, others unaffected
        return x.randn(*shape, grad=True), real, x.randn(*shape)

    yield _compare_calls(losses.dmd_loss, impl, _replayed(x, dmd_inputs), (0,),
                         lambda out: torch.full_like(out, 0.7), "dmd_loss", dtype)

    for divergence in ("rkl", "dijs", "fkl", "hellinger"):
        def ratio_generator(*args, impl, divergence=divergence):
            return losses.ratio_generator_loss(*args, divergence=divergence, impl=impl)

        yield _compare_calls(ratio_generator, impl, _replayed(x, lambda: (
            x.randn(*shape, grad=True), x.randn(*shape), 4 * x.randn(B, dtype=torch.float32), x.positive(B))),
            (0,), lambda out: torch.full_like(out, 1.3), f"ratio_generator_loss ({divergence})", dtype)

    yield _compare_calls(losses.ratio_classifier_loss, impl, _replayed(x, lambda: (
        3 * x.randn(2 * B + 1, grad=True), 3 * x.randn(2 * B + 1, grad=True), x.positive(2 * B + 1))),
        (0, 1), lambda out: torch.full_like(out, 0.9), "ratio_classifier_loss", dtype)


def run(impl: str, device) -> str | None:
    """None when `impl` ("triton" or "ext") matches the eager reference on `device`, else what differed."""
    from fastonestep import losses

    device = torch.device(device)
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    for shape in SHAPES:
        for dtype in dtypes:
            for failure in _checks(losses, impl, device, dtype, shape):
                if failure:
                    return f"{failure} ({dtype}, shape {shape})"
    return None
