"""pytest-benchmark view of the fused losses (forward + backward) at one realistic size.

Not part of CI (it lives in bench/, not tests/). On a GPU machine:

    python -m pytest bench/test_bench_kernels.py --benchmark-columns=median,iqr,ops

The CSV harness (`fastonestep bench kernels`) is the reference measurement: it uses triton's do_bench
(L2 flushed between calls), records peak memory and bandwidth, and tags rows for the README. This file is a
cross-check with pytest-benchmark's own statistics. CPU runs are smoke runs, never performance claims.
"""
import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from fastonestep.benchmark import kernels as K  # noqa: E402

ON_GPU = torch.cuda.is_available()
SIZE = "B128-3x64x64" if ON_GPU else "cpu-small-8x3x32x32"
SHAPE = K.GPU_SIZES.get(SIZE) or K.CPU_SIZES[SIZE]


@pytest.mark.parametrize("provider", K.PROVIDERS)
@pytest.mark.parametrize("loss", K.LOSSES)
def test_kernel(benchmark, loss, provider):
    mode = "full" if "full" in K.modes_of(loss) else "forward"
    try:
        fn = K.prepare(loss, provider, SHAPE, torch.float32, mode=mode)
    except K.ProviderUnavailable as e:
        pytest.skip(f"{provider} unavailable: {e}")
    fn()  # warm (compiles for the compile provider)
    benchmark.group = f"{loss} {SIZE} fp32 {mode}"
    benchmark.extra_info.update(provider=provider, device=K._device_info(torch.device("cuda" if ON_GPU else "cpu"))[0],
                                is_claim=ON_GPU)
    if ON_GPU:
        def step():
            fn()
            torch.cuda.synchronize()
        benchmark(step)
    else:
        benchmark(fn)
