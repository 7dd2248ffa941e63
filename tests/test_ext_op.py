"""The csrc fused-loss ops (fastonestep.kernels.ext) against the eager references of kernels/reference.py.

The C++ library is built once per session (in the session's temporary FASTONESTEP_CACHE, never ~/.cache).
CPU tests run everywhere a C++ compiler exists; the CUDA tests run on a GPU machine, where the build includes
csrc/fused_losses_cuda.cu.
"""
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

from fastonestep.kernels import ext as ext_module
from fastonestep.kernels import reference as ref

DIVS = ("rkl", "dijs", "fkl", "hellinger")
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


@pytest.fixture(scope="module")
def ext(cache_dir):
    from fastonestep.kernels import ext as mod

    if mod.compiler() is None:
        pytest.skip("no C++ compiler (CXX or c++) on this machine to build csrc/")
    if mod.ninja() is None:
        pytest.skip("ninja (torch's extension builder) is not installed")
    ok, reason = mod.available()
    assert ok, reason
    return mod


def close(actual, expected, tol):
    """Relative to the largest expected magnitude: gradients of size 1/numel are compared fairly."""
    expected = expected.to(actual.dtype) if expected.dtype != actual.dtype else expected
    scale = expected.detach().abs().nan_to_num(0.0, 0.0, 0.0).max().clamp_min(1e-30) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=tol, atol=float(tol * scale),
                               equal_nan=True)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def grads_of(fn, inputs, weight=None):
    """Value of fn(*inputs) and the gradients of (value * weight).sum() (weight: grad_output != 1)."""
    value = fn(*inputs)
    out = value * weight if weight is not None else value
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out.sum(), diff, allow_unused=True)
    return value.detach(), grads


def denoising_inputs(shape, dtype, device="cpu"):
    B = shape[0]
    F, x_t, x0 = (torch.randn(shape, device=device).to(dtype) for _ in range(3))
    sigma = torch.exp(torch.randn(B, device=device) * 1.2 - 1.2)
    return F, x_t, x0, sigma


# ------------------------------------------------------------------------------------------------ CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (5, 17), (3, 2, 33, 9)])
def test_denoising_loss(ext, dtype, shape):
    F, x_t, x0, sigma = denoising_inputs(shape, dtype)
    w = torch.rand(shape[0]) + 0.5  # per-sample grad_output
    for s in (sigma, 0.7):  # per-sample sigma and a float broadcast to (B,)
        a_val, a_grads = grads_of(lambda F, xt, x0: ext.denoising_loss(F, xt, x0, s, 0.5), leaves(F, x_t, x0), w)
        r_val, r_grads = grads_of(lambda F, xt, x0: ref.denoising_loss(F, xt, x0, s, 0.5), leaves(F, x_t, x0), w)
        assert a_val.dtype == torch.float32 and a_val.shape == (shape[0],)
        close(a_val, r_val, TOL[dtype])
        for a, r in zip(a_grads, r_grads):
            assert a.dtype == dtype and a.shape == shape
            close(a, r, 3 * TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (6, 2, 17)])
def test_dmd_loss(ext, dtype, shape):
    x, xr, xf = (torch.randn(shape).to(dtype) for _ in range(3))
    if shape[0] > 1:  # a NaN row and an Inf row are zeroed
        xf[1, 0] = float("nan")
        if shape[0] > 2:
            xr[2, -1] = float("inf")
    for scale in (None, torch.tensor(3.0)):
        a_val, (a_grad,) = grads_of(lambda x: ext.dmd_loss(x, xr, xf), leaves(x), scale)
        r_val, (r_grad,) = grads_of(lambda x: ref.dmd_loss(x, xr, xf), leaves(x), scale)
        assert a_val.shape == () and a_val.dtype == torch.float32 and torch.isfinite(a_val)
        close(a_val, r_val, TOL[dtype])
        close(a_grad, r_grad, 3 * TOL[dtype])
    # The gradient is exactly g / numel (the reference's direction), rows with NaN/Inf at 0.
    g = ref.dmd_gradient(x, xr, xf) / x.numel()
    _, (a_grad,) = grads_of(lambda x: ext.dmd_loss(x, xr, xf), leaves(x))
    close(a_grad, g, TOL[dtype])
    if shape[0] > 2:
        assert (a_grad[1:3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVS)
def test_ratio_generator_loss(ext, dtype, divergence):
    shape = (5, 3, 7)
    x, lg = torch.randn(shape).to(dtype), (torch.randn(shape) * 3).to(dtype)
    logits = torch.randn(shape[0]) * 8  # some beyond the clamp at 10
    logits[0] = 14.0
    weight = torch.rand(shape[0]) + 0.1
    lg[3, 1, 2] = float("inf")  # row 3 zeroed
    if divergence != "rkl":
        logits[4] = float("nan")  # row 4 zeroed (h(r) is NaN; rkl ignores the logit)
    for w in (None, weight):
        for normalize in (True, False):
            kw = dict(weight=w, divergence=divergence, normalize=normalize, clamp=10.0)
            a_val, (a_grad,) = grads_of(lambda x: ext.ratio_generator_loss(x, lg, logits, **kw), leaves(x),
                                        torch.tensor(0.5))
            r_val, (r_grad,) = grads_of(lambda x: ref.ratio_generator_loss(x, lg, logits, **kw), leaves(x),
                                        torch.tensor(0.5))
            close(a_val, r_val, TOL[dtype])
            assert a_grad.dtype == dtype
            close(a_grad, r_grad, 3 * TOL[dtype])
            g = ref.ratio_generator_gradient(lg, logits, w, divergence, normalize, 10.0) / x.numel()
            _, (a_grad,) = grads_of(lambda x: ext.ratio_generator_loss(x, lg, logits, **kw), leaves(x))
            close(a_grad, g, TOL[dtype])


def test_ratio_generator_mixed_dtypes(ext):
    """A bf16 generator output with an fp32 logit gradient: computed in fp32, gradient returned in bf16."""
    x, lg, logits = torch.randn(4, 9).bfloat16(), torch.randn(4, 9), torch.randn(4)
    a_val, (a_grad,) = grads_of(lambda x: ext.ratio_generator_loss(x, lg, logits, divergence="fkl"), leaves(x))
    r_val, (r_grad,) = grads_of(lambda x: ref.ratio_generator_loss(x, lg, logits, divergence="fkl"), leaves(x))
    assert a_grad.dtype == torch.bfloat16
    close(a_val, r_val, 1e-5)
    close(a_grad, r_grad, 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 9000])
def test_ratio_classifier_loss(ext, dtype, n):
    gen, real = (torch.randn(n) * 6).to(dtype), (torch.randn(n) * 6).to(dtype)
    if n > 1:
        gen[0], real[-1] = -30.0, 25.0  # softplus beyond its threshold of 20
    weight = torch.rand(n) + 0.2
    for w in (None, weight):
        a_val, a_grads = grads_of(lambda g, r: ext.ratio_classifier_loss(g, r, w), leaves(gen, real),
                                  torch.tensor(2.0))
        r_val, r_grads = grads_of(lambda g, r: ref.ratio_classifier_loss(g, r, w), leaves(gen, real),
                                  torch.tensor(2.0))
        close(a_val, r_val, TOL[dtype])
        for a, r in zip(a_grads, r_grads):
            assert a.dtype == dtype
            close(a, r, 3 * TOL[dtype])


def test_nonfinite_classifier_and_denoising_propagate(ext):
    """No row zeroing outside the surrogate losses: NaN propagates like the reference."""
    gen, real = torch.tensor([0.3, float("nan")]), torch.tensor([0.1, 0.2])
    assert torch.isnan(ext.ratio_classifier_loss(gen, real))
    F, x_t, x0, sigma = denoising_inputs((3, 4), torch.float32)
    F[1, 2] = float("inf")
    a, r = ext.denoising_loss(F, x_t, x0, sigma, 0.5), ref.denoising_loss(F, x_t, x0, sigma, 0.5)
    torch.testing.assert_close(a, r, equal_nan=True)


def test_grad_output_one_is_not_copied(ext):
    g = torch.randn(3, 4)
    assert ext._scale(g, torch.ones(())) is g
    assert ext._scale(g, torch.ones(3), per_row=True) is g
    torch.testing.assert_close(ext._scale(g, torch.tensor([1.0, 2.0, 3.0]), per_row=True),
                               g * torch.tensor([1.0, 2.0, 3.0])[:, None])


def test_fp16_gradient_is_written_in_fp32_and_scaled_without_overflow(ext):
    """The op writes the gradient of fp16 inputs in fp32 (an fp16 g / numel is a subnormal); the backward scales it
    by grad_output in fp32 (a loss scale of 65536 is inf in fp16) and returns fp16."""
    x, xr = torch.randn(2, 300).half(), torch.randn(2, 300).half()
    xf = (xr.float() + 1e-3 * torch.randn(2, 300)).half()
    _, grad = torch.ops.fastonestep.dmd_loss_fwd(x, xr, xf)
    assert grad.dtype == torch.float32
    scaled = ext._scale(grad, torch.tensor(65536.0), dtype=torch.float16)
    p_real = x.double() - xr.double()
    want = (xf.double() - xr.double()) / (p_real.abs().mean(1, keepdim=True) + 1e-8) / x.numel() * 65536.0
    assert scaled.dtype == torch.float16 and torch.isfinite(scaled).all()
    torch.testing.assert_close(scaled.double(), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
    # a loss beyond fp32's range is inf, not an error (fkl with clamp=inf and large logits)
    loss, _ = torch.ops.fastonestep.ratio_generator_loss_fwd(x.float(), x.float(), torch.tensor([50.0, -50.0]), None,
                                                             2, True, float("inf"))
    assert loss.item() == float("inf")


def test_gradcheck_fp64(ext):
    """The registered autograd formulas against finite differences, where they are true derivatives."""
    F, x_t, x0, sigma = denoising_inputs((3, 2, 3), torch.float64)
    assert torch.autograd.gradcheck(lambda F, xt, x0: ext.denoising_loss(F, xt, x0, sigma.double(), 0.5),
                                    leaves(F, x_t, x0))
    assert torch.autograd.gradcheck(lambda xt: ext.denoising_loss(F, xt, x0, sigma.double(), 0.5), leaves(x_t))
    gen, real, w = torch.randn(5, dtype=torch.float64) * 3, torch.randn(5, dtype=torch.float64) * 3, torch.rand(5).double()
    assert torch.autograd.gradcheck(lambda g, r: ext.ratio_classifier_loss(g, r, w), leaves(gen, real))
    # dmd / ratio_generator: the surrogate's gradient is g / numel by definition (not the derivative of its
    # value 0.5*mean(g^2)); check it against the reference's autograd gradient instead.
    x, xr, xf, lg = (torch.randn(3, 2, 5, dtype=torch.float64) for _ in range(4))
    logits = torch.randn(3, dtype=torch.float64)
    for fn_a, fn_r in ((lambda x: ext.dmd_loss(x, xr, xf), lambda x: ref.dmd_loss(x, xr, xf)),
                       (lambda x: ext.ratio_generator_loss(x, lg, logits, w[:3], "hellinger"),
                        lambda x: ref.ratio_generator_loss(x, lg, logits, w[:3], "hellinger"))):
        xa, xr_ = leaves(x, x)
        (a,) = torch.autograd.grad(fn_a(xa) * 1.5, [xa])
        (r,) = torch.autograd.grad(fn_r(xr_) * 1.5, [xr_])
        assert a.dtype == torch.float64
        close(a, r, 2e-6)  # the reference itself works in fp32


def op_samples(device="cpu"):
    F, x_t, x0, sigma = denoising_inputs((3, 2, 5), torch.float32, device)
    x, xr, xf, lg = (torch.randn(4, 3, 3, device=device) for _ in range(4))
    logits, w = torch.randn(4, device=device), torch.rand(4, device=device)
    gen, real = torch.randn(6, device=device), torch.randn(6, device=device)
    ops = torch.ops.fastonestep
    return [
        (ops.denoising_loss_fwd.default, (*leaves(F, x_t, x0), sigma, 0.5)),
        (ops.dmd_loss_fwd.default, (*leaves(x), xr, xf)),
        (ops.ratio_generator_loss_fwd.default, (*leaves(x), lg, logits, w, 1, True, 10.0)),
        (ops.ratio_generator_loss_fwd.default, (*leaves(x), lg, logits, None, 3, False, 5.0)),
        (ops.ratio_classifier_loss_fwd.default, (*leaves(gen, real), w.repeat(2)[:6])),
        (ops.ratio_classifier_loss_fwd.default, (*leaves(gen, real), None)),
    ]


def test_opcheck(ext):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of every op."""
    for op, args in op_samples():
        torch.library.opcheck(op, args)


def all_losses(ext_or_ref, F, x_t, x0, sigma, x, xr, xf, lg, logits, w, gen, real):
    a = ext_or_ref.denoising_loss(F, x_t, x0, sigma, 0.5)
    b = ext_or_ref.dmd_loss(x, xr, xf)
    c = ext_or_ref.ratio_generator_loss(x, lg, logits, w, "dijs")
    d = ext_or_ref.ratio_classifier_loss(gen, real, w)
    return (a * w).sum() + b + 2.0 * c + d


def test_torch_compile_fullgraph(ext):
    torch._dynamo.reset()
    F, x_t, x0, _ = denoising_inputs((4, 6), torch.float32)
    sigma = torch.rand(4) + 0.1
    x, xr, xf, lg = (torch.randn(4, 6) for _ in range(4))
    logits, w, gen, real = torch.randn(4), torch.rand(4), torch.randn(4), torch.randn(4)
    compiled = torch.compile(lambda *a: all_losses(ext, *a), fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, lambda *a: all_losses(ref, *a)):
        F_, x_, gen_, real_ = leaves(F, x, gen, real)
        value = fn(F_, x_t, x0, sigma, x_, xr, xf, lg, logits, w, gen_, real_)
        results.append((value.detach(), torch.autograd.grad(value, [F_, x_, gen_, real_])))
    (a_val, a_grads), (r_val, r_grads) = results
    close(a_val, r_val, 1e-5)
    for a, r in zip(a_grads, r_grads):
        close(a, r, 1e-5)


def test_the_public_api_compiles_fullgraph_after_impl_available(ext):
    """What the README tells a user: impl_available first (it loads the op), then fullgraph through losses."""
    from fastonestep import losses

    torch._dynamo.reset()
    assert losses.impl_available("ext") == (True, "")
    x, xr, xf = (torch.randn(3, 2, 5) for _ in range(3))
    compiled = torch.compile(lambda *a: losses.dmd_loss(*a, impl="ext"), fullgraph=True, backend="aot_eager")
    got, want = leaves(x, x)
    close(compiled(got, xr, xf), losses.dmd_loss(want, xr, xf, impl="torch"), 1e-5)


def test_errors(ext):
    with pytest.raises(ValueError, match="divergence"):
        ext.ratio_generator_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2), divergence="kl")
    with pytest.raises(RuntimeError, match="one value per sample"):
        ext.denoising_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.rand(3), 0.5)
    with pytest.raises(RuntimeError, match="shape"):
        ext.dmd_loss(torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 3))


def test_build_errors_name_the_failing_line_and_a_missing_cuda_runtime():
    """What a failed JIT build reports: the compiler's / linker's error lines, not ninja's command lines (this
    linker output is what a CUDA torch printed here when CUDA_HOME pointed at a folder without libcudart)."""
    ninja_output = (
        "[1/3] c++ -MMD -MF fused_losses.o.d -O3 -c csrc/fused_losses.cpp -o fused_losses.o\n"
        "[3/3] c++ fused_losses.o fused_losses_cuda.cuda.o -shared -L/usr/local/lib -lcudart -o ext.so\n"
        "FAILED: [code=1] ext.so\n"
        "/usr/bin/ld: cannot find -lcudart: No such file or directory\n"
        "collect2: error: ld returned 1 exit status\n"
        "ninja: build stopped: subcommand failed.\n")
    report = ext_module._first_errors(ninja_output)
    assert "cannot find -lcudart" in report and "collect2: error" in report
    assert "-MMD" not in report
    assert "set CUDA_HOME" in report
    compile_error = "[1/2] c++ -c a.cpp\na.cpp:3:1: error: expected ';' before '}' token\nninja: build stopped"
    assert ext_module._first_errors(compile_error) == "a.cpp:3:1: error: expected ';' before '}' token"


# ------------------------------------------------------------------------------------------------ CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def ext_cuda(ext):
    assert ext.has_cuda_kernels(), f"the extension has no CUDA kernels: {ext.cuda_build_possible()[1]}"
    return ext


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 7), (8, 3, 64, 64), (2, 3, 129, 257), (4097, 2)])
def test_cuda_against_reference(ext_cuda, dtype, shape):
    ext, dev, tol = ext_cuda, "cuda", TOL[dtype]
    B = shape[0]
    w = torch.rand(B, device=dev) + 0.5
    F, x_t, x0, sigma = denoising_inputs(shape, dtype, dev)
    a = grads_of(lambda F: ext.denoising_loss(F, x_t, x0, sigma, 0.5), leaves(F), w)
    r = grads_of(lambda F: ref.denoising_loss(F, x_t, x0, sigma, 0.5), leaves(F), w)
    close(a[0], r[0], tol)
    close(a[1][0], r[1][0], 3 * tol)

    x, xr, xf, lg = (torch.randn(shape, device=dev).to(dtype) for _ in range(4))
    if B > 2:
        xf.view(B, -1)[1, -1] = float("nan")
        lg.view(B, -1)[2, 0] = float("inf")
    a = grads_of(lambda x: ext.dmd_loss(x, xr, xf), leaves(x), torch.tensor(3.0, device=dev))
    r = grads_of(lambda x: ref.dmd_loss(x, xr, xf), leaves(x), torch.tensor(3.0, device=dev))
    close(a[0], r[0], tol)
    close(a[1][0], r[1][0], 3 * tol)

    logits = torch.randn(B, device=dev) * 8
    for divergence in DIVS:
        for weight, normalize in ((None, True), (w, False), (w, True)):
            kw = dict(weight=weight, divergence=divergence, normalize=normalize)
            a = grads_of(lambda x: ext.ratio_generator_loss(x, lg, logits, **kw), leaves(x))
            r = grads_of(lambda x: ref.ratio_generator_loss(x, lg, logits, **kw), leaves(x))
            close(a[0], r[0], tol)
            close(a[1][0], r[1][0], 3 * tol)

    n = int(torch.tensor(shape).prod())
    gen, real = (torch.randn(n, device=dev) * 6).to(dtype), (torch.randn(n, device=dev) * 6).to(dtype)
    ww = torch.rand(n, device=dev)
    a = grads_of(lambda g, r: ext.ratio_classifier_loss(g, r, ww), leaves(gen, real), torch.tensor(2.0, device=dev))
    r = grads_of(lambda g, r: ref.ratio_classifier_loss(g, r, ww), leaves(gen, real), torch.tensor(2.0, device=dev))
    close(a[0], r[0], tol)
    for ga, gr in zip(a[1], r[1]):
        close(ga, gr, 3 * tol)


@cuda
def test_cuda_gradcheck_and_opcheck(ext_cuda):
    ext = ext_cuda
    F, x_t, x0, sigma = denoising_inputs((3, 2, 3), torch.float64, "cuda")
    assert torch.autograd.gradcheck(lambda F, xt, x0: ext.denoising_loss(F, xt, x0, sigma.double(), 0.5),
                                    leaves(F, x_t, x0))
    gen, real = (torch.randn(5, dtype=torch.float64, device="cuda") for _ in range(2))
    assert torch.autograd.gradcheck(lambda g, r: ext.ratio_classifier_loss(g, r), leaves(gen, real))
    for op, args in op_samples("cuda"):
        torch.library.opcheck(op, args)


def _nvcc():
    home = os.environ.get("CUDA_HOME")
    found = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    return found if found and os.path.exists(found) else None


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc (CUDA_HOME or PATH) to compile csrc/fused_losses_cuda.cu")
def test_cuda_source_compiles_for_hopper(tmp_path):
    """Without a GPU the CUDA kernels cannot run, but they must still compile: nvcc -c for sm_90 against this
    torch's headers, with the flags torch's builder adds, and ptxas must report no register spills (a spill on
    these streaming kernels would cost bandwidth). On a GPU machine test_cuda_* run them."""
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(ext_module.CSRC)]
    generated = "c10/cuda/impl/cuda_cmake_macros.h"  # a CMake-generated header that only CUDA wheels ship
    if not any(os.path.exists(os.path.join(p, generated)) for p in includes):
        stub = tmp_path / "include" / generated
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")  # its content in every CUDA build
        includes.append(str(tmp_path / "include"))
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [_nvcc(), "-c", str(ext_module.CSRC / ext_module.CUDA_SOURCE), "-o", str(tmp_path / "kernels.o"),
           "-std=c++17", "-gencode=arch=compute_90,code=sm_90", "--compiler-options", "-fPIC",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=fastonestep_ext_cuda", "-Xptxas", "-v",
           *cpp_extension.COMMON_NVCC_FLAGS, *ext_module.CUDA_CFLAGS, *(f"-I{p}" for p in includes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert (tmp_path / "kernels.o").stat().st_size > 0
    assert "Compiling entry function" in log, log[-2000:]  # ptxas -v saw the kernels
    spills = [line for line in log.splitlines() if "spill" in line and not re.search(r"\b0 bytes spill", line)]
    assert not spills, "\n".join(spills[:10])


def test_a_cuda_build_needs_nvcc_of_torchs_cuda_major_version():
    """torch's just-in-time builder would link an nvcc 12 build into a torch built for CUDA 13 (and the reverse):
    the extension refuses that pairing with a reason, before any build."""
    assert ext_module.same_cuda_major("13.0", "13.0") and ext_module.same_cuda_major("12.8", "12.4")
    assert not ext_module.same_cuda_major("12.8", "13.0")
    assert not ext_module.same_cuda_major(None, "13.0") and not ext_module.same_cuda_major("13.0", None)
    nvcc = _nvcc()
    if nvcc is not None:  # the version as the check reads it from the real compiler
        assert re.fullmatch(r"\d+\.\d+", ext_module.nvcc_release(nvcc) or ""), nvcc
    assert ext_module.nvcc_release("/nonexistent/nvcc") is None
