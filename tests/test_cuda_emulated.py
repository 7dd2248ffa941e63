"""The CUDA kernels of csrc/fused_losses_cuda.cu, run on the CPU under emulation, against the C++ CPU op.

Why: CI has no GPU, and without this the CUDA file is only compiled. Here its unchanged kernels and host code are
compiled as C++ against tests/cuda_emulation/emulated_cuda.h, with every `kernel<<<grid, block, 0, stream>>>(args)`
launch rewritten into a call of the emulator: each block's 256 threads run as fibers with their own threadIdx,
__syncthreads is a block barrier, __shfl_down_sync a full-warp exchange, and a barrier some threads never reach
(a divergent __syncthreads, a shuffle in part of a warp) raises instead of hanging. The ops register on the CPU
under the namespace fastonestep_emulated, so each input goes through the CUDA code and through the CPU op of
csrc/fused_losses.cpp, and the results must agree: values, gradients, dtypes, shapes and non-finite positions.

What this cannot show: nvcc's code generation, the GPU memory model beyond barriers, speed. The GPU tests
(tests/test_ext_op.py::test_cuda_*) stay the real check; this one catches logic errors (indexing, chunking,
reductions, the NaN-row rule, barrier placement) on every change, on any machine with a C++ compiler.
"""
import hashlib
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCE = ROOT / "csrc" / "fused_losses_cuda.cu"
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
NAMESPACE = "fastonestep_emulated"
DIVERGENCES = range(4)  # rkl, dijs, fkl, hellinger
# (relative to the largest expected magnitude) the CUDA code sums in the accumulation dtype, the CPU op in double
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def launches_rewritten(source: str) -> str:
    """`name<T...><<<config>>>(args)` -> `emulated_launch(config, [&] { name<T...>(args); })`."""
    out, i = [], 0
    while (at := source.find("<<<", i)) >= 0:
        start, depth = at - 1, 0  # back over the kernel's name and template arguments
        while start >= 0:
            c = source[start]
            depth += (c == ">") - (c == "<")
            if depth == 0 and not (c.isalnum() or c in "_:<>"):
                break
            start -= 1
        start += 1
        config_end = source.index(">>>", at)
        if source[config_end + 3] != "(":
            raise AssertionError(f"a launch without arguments at offset {at}")
        end, depth = config_end + 3, 0
        while True:  # the matching parenthesis of the argument list
            depth += (source[end] == "(") - (source[end] == ")")
            if depth == 0:
                break
            end += 1
        kernel, config, args = source[start:at], source[at + 3:config_end], source[config_end + 4:end]
        out += [source[i:start], f"emulated_launch({config}, [&]() {{ {kernel}({args}); }})"]
        i = end + 1
    return "".join(out + [source[i:]])


def emulated_source() -> str:
    """fused_losses_cuda.cu for the emulator: launches rewritten, CUDA headers and the CUDA dispatch key swapped
    for the emulation and the CPU key, the op schemas (from fused_losses.cpp) defined under NAMESPACE."""
    cuda = CUDA_SOURCE.read_text()
    for include in ("#include <c10/cuda/CUDAException.h>", "#include <c10/cuda/CUDAGuard.h>",
                    "#include <c10/cuda/CUDAStream.h>"):
        assert include in cuda, include
        cuda = cuda.replace(include, "")
    cuda = '#include "emulated_cuda.h"\n' + cuda
    replacements = {"c10::DeviceType::CUDA": "c10::DeviceType::CPU", ".is_cuda()": ".is_cpu()",
                    "TORCH_LIBRARY_IMPL(fastonestep, CUDA, m)": f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)"}
    for old, new in replacements.items():
        assert old in cuda, old
        cuda = cuda.replace(old, new)
    cuda = launches_rewritten(cuda)
    assert "<<<" not in cuda
    schemas = re.search(r"TORCH_LIBRARY\(fastonestep, m\) \{.*?\n\}", (ROOT / "csrc" / "fused_losses.cpp").read_text(),
                        re.S)
    return cuda + "\n" + schemas[0].replace("TORCH_LIBRARY(fastonestep, m)", f"TORCH_LIBRARY({NAMESPACE}, m)") + "\n"


@pytest.fixture(scope="module")
def ops(cache_dir):
    """(the emulated CUDA ops, the CPU ops): the emulation built once per source version into the test cache."""
    from torch.utils import cpp_extension

    from fastonestep.kernels import ext

    if ext.compiler() is None or ext.ninja() is None:
        pytest.skip("needs a C++ compiler and ninja")
    ok, why = ext.available()
    assert ok, why
    source = emulated_source()
    digest = hashlib.sha256((source + (EMULATION / "emulated_cuda.h").read_text() + torch.__version__).encode())
    build = Path(cache_dir) / f"cuda-emulated-{digest.hexdigest()[:16]}"
    build.mkdir(parents=True, exist_ok=True)
    (build / "fused_losses_emulated.cpp").write_text(source)
    cpp_extension.load(name="fastonestep_cuda_emulated", sources=[str(build / "fused_losses_emulated.cpp")],
                       extra_cflags=["-O1", "-w", f"-I{ROOT / 'csrc'}", f"-I{EMULATION}"],
                       build_directory=str(build), is_python_module=False, verbose=False)
    return getattr(torch.ops, NAMESPACE), torch.ops.fastonestep


def assert_same(got, want, dtype, what):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    g, w = got.double(), want.double()
    assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isinf(), w.isinf()), what
    if w.numel():
        scale = float(w.nan_to_num(0, 0, 0).abs().max())
        torch.testing.assert_close(g.nan_to_num(0, 0, 0), w.nan_to_num(0, 0, 0), rtol=TOL[dtype],
                                   atol=TOL[dtype] * max(scale, 1e-30), msg=what)


def both(ops, name, *args):
    emulated, cpu = ops
    return getattr(emulated, name)(*args), getattr(cpu, name)(*args)


def check(ops, name, dtype, *args):
    for i, (got, want) in enumerate(zip(*both(ops, name, *args))):
        assert_same(got, want, dtype, f"{name} output {i}")


# (3, 5, 7): one chunk per row; (3, 4096 * 2 + 5): three chunks per row, the last one partial (kChunk = 4096).
SHAPES = [(1, 1), (3, 5, 7), (3, 4096 * 2 + 5)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_emulated_cuda_kernels_match_the_cpu_op(ops, shape, dtype):
    torch.manual_seed(0)
    B = shape[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    randn = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
    sigma = torch.exp(torch.randn(B) * 1.2 - 1.2).to(acc)
    check(ops, "denoising_loss_fwd", dtype, randn(*shape), randn(*shape), randn(*shape), sigma, 0.5)

    x, x_real, x_fake, logit_grad = (randn(*shape) for _ in range(4))
    if B >= 3:  # non-finite rows: their gradient is zeroed, the other rows are untouched
        x_fake.view(B, -1)[1, -1] = float("nan")
        x_real.view(B, -1)[0, 0] = float("inf")
        logit_grad.view(B, -1)[2, 0] = float("inf")
    check(ops, "dmd_loss_fwd", dtype, x, x_real, x_fake)

    logits = (torch.randn(B) * 8).to(acc)
    weight = (torch.rand(B) + 0.5).to(acc)
    for divergence in DIVERGENCES:
        for w, normalize in ((None, True), (weight, False), (weight, True)):
            check(ops, "ratio_generator_loss_fwd", dtype, x, logit_grad, logits, w, divergence, normalize, 10.0)

    n = x.numel()
    gen, real = (torch.randn(n) * 6).to(dtype), (torch.randn(n) * 6).to(dtype)
    for w in (None, torch.rand(n).to(acc)):
        check(ops, "ratio_classifier_loss_fwd", dtype, gen, real, w)


def test_emulated_cuda_kernels_on_empty_inputs(ops):
    """No block is launched for an empty batch or empty samples (a launch of 0 blocks is an error on a GPU)."""
    for shape in [(0, 3), (3, 0), (2, 0, 5)]:
        t = torch.randn(shape)
        check(ops, "denoising_loss_fwd", torch.float32, t, t, t, torch.ones(shape[0]), 0.5)
        check(ops, "dmd_loss_fwd", torch.float32, t, t, t)
        check(ops, "ratio_generator_loss_fwd", torch.float32, t, t, torch.zeros(shape[0]), None, 1, True, 10.0)
    empty = torch.randn(0)
    check(ops, "ratio_classifier_loss_fwd", torch.float32, empty, empty, None)


def test_the_emulation_catches_a_divergent_barrier(cache_dir, tmp_path):
    """The emulator is a check only if a kernel bug that would hang or race a GPU fails here: a block reduction
    whose warp-level step runs in lane 0 of each warp only (a shuffle in part of a warp) must raise."""
    from torch.utils import cpp_extension

    from fastonestep.kernels import ext

    if ext.compiler() is None or ext.ninja() is None:
        pytest.skip("needs a C++ compiler and ninja")
    program = tmp_path / "divergent.cpp"
    program.write_text('#include "emulated_cuda.h"\n#include <torch/library.h>\n' + launches_rewritten(r"""
__global__ void reduce(float* out) {
  float v = 1.0f;
  if ((threadIdx.x & 31) == 0) v += __shfl_down_sync(0xffffffffu, v, 1);  // the bug: one lane of 32 shuffles
  if (threadIdx.x == 0) *out = v;
}
void run(at::Tensor out) { reduce<<<2, 64, 0, 0>>>(out.data_ptr<float>()); }
TORCH_LIBRARY(fastonestep_emulated_divergent, m) { m.def("run(Tensor out) -> ()"); m.impl("run", &run); }
"""))
    cpp_extension.load(name="fastonestep_emulated_divergent", sources=[str(program)],
                       extra_cflags=["-O1", "-w", f"-I{EMULATION}"], build_directory=str(tmp_path),
                       is_python_module=False, verbose=False)
    with pytest.raises(RuntimeError, match="deadlock in block 0.*shuffle of warp 0: 1 arrived"):
        torch.ops.fastonestep_emulated_divergent.run(torch.zeros(1))
