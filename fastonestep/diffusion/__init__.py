"""Diffusion math shared by every method: schedules, EDM preconditioning, conversions, samplers."""
from fastonestep.diffusion.conversions import convert, from_x0, score_from_x0, to_x0
from fastonestep.diffusion.precond import EDMPrecond, denoise_with_schedule, edm_coefficients, edm_loss_weight
from fastonestep.diffusion.samplers import edm_sample, karras_sigmas, ode_solve, student_sample
from fastonestep.diffusion.schedules import (
    EDMSchedule,
    FlowSchedule,
    Schedule,
    VPSchedule,
    make_schedule,
    sample_lognormal_sigma,
    sample_loguniform_sigma,
)
