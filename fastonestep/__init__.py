"""fastonestep: train one-step and few-step diffusion generators (DiffRatio, DMD/DMD2, DP-DMD,
backward distillation) at full throughput. See README.md and design notes for the math."""

__version__ = "0.1.0"
