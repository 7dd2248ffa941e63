"""Diffusion math: preconditioning, conversions, schedules, the exact mixture, and the ODE samplers."""
import math

import pytest
import torch
from torch import nn

from fastonestep.data.mixture import GaussianMixture
from fastonestep.diffusion import (
    EDMPrecond,
    EDMSchedule,
    FlowSchedule,
    VPSchedule,
    convert,
    denoise_with_schedule,
    edm_coefficients,
    edm_loss_weight,
    from_x0,
    score_from_x0,
    to_x0,
)
from fastonestep.diffusion.samplers import edm_sample, karras_sigmas, ode_solve, student_sample


SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)
SCHEDULES = [EDMSchedule(), VPSchedule(), FlowSchedule()]


class MixtureDenoiser(nn.Module):
    """The exact E[x0 | x] of a GaussianMixture, called like EDMPrecond: D(x, sigma, labels)."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        if (sigma == sigma[0]).all():  # the samplers' case: one level for the whole batch
            return self.mixture.denoise(x, float(sigma[0]))
        out = torch.empty_like(x)
        for s in sigma.unique():  # the mixture takes one noise level per call
            rows = sigma == s
            out[rows] = self.mixture.denoise(x[rows], float(s))
        return out


# ---------------------------------------------------------------- preconditioning


def test_edm_coefficients_give_unit_variance_input_and_target():
    sd = 0.5
    c_skip, c_out, c_in, c_noise = [c.double() for c in edm_coefficients(SIGMAS, sd)]
    # Input x + n, x ~ (0, sd^2), n ~ (0, sigma^2), has unit variance after c_in.
    torch.testing.assert_close(c_in**2 * (sd**2 + SIGMAS**2), torch.ones_like(SIGMAS))
    # The effective training target (x - c_skip (x + n)) / c_out has unit variance.
    target_var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * SIGMAS**2) / c_out**2
    torch.testing.assert_close(target_var, torch.ones_like(SIGMAS))
    # lambda(sigma) * c_out^2 == 1: the loss weight equalises the effective loss across noise levels.
    torch.testing.assert_close(edm_loss_weight(SIGMAS, sd).double() * c_out**2, torch.ones_like(SIGMAS))
    torch.testing.assert_close(c_noise, SIGMAS.log() / 4)


class GaussianOptimalF(nn.Module):
    """The exact optimal F for data N(mu, std^2 I) under EDM preconditioning, from (x_in, c_noise) alone."""

    def __init__(self, mu: float, std: float, sigma_data: float):
        super().__init__()
        self.mu, self.std, self.sd = mu, std, sigma_data

    def forward(self, x_in, c_noise, labels=None):
        s = torch.exp(4 * c_noise.double())[:, None]
        c_skip, c_out, c_in, _ = edm_coefficients(s, self.sd)
        x = x_in.double() / c_in.double()
        posterior_mean = (self.std**2 * x + s**2 * self.mu) / (self.std**2 + s**2)
        return (posterior_mean - c_skip.double() * x) / c_out.double()


def test_edm_precond_optimal_f_is_zero_for_gaussian_data_at_sigma_data():
    """For data N(0, sigma_data^2 I) the skip path alone, c_skip * x, is the posterior mean."""
    sd = 0.5
    x = torch.randn(len(SIGMAS), 3, dtype=torch.float64) * 3
    zero_net = EDMPrecond(lambda x_in, c_noise, labels=None: torch.zeros_like(x_in), sd)
    torch.testing.assert_close(zero_net(x, SIGMAS), x * sd**2 / (sd**2 + SIGMAS[:, None] ** 2))


@pytest.mark.parametrize("mu,std", [(0.0, 0.5), (0.7, 1.3)])
def test_edm_precond_with_optimal_f_is_gaussian_posterior_mean(mu, std):
    sd = 0.5
    x = torch.randn(len(SIGMAS), 3, dtype=torch.float64) * 3
    D = EDMPrecond(GaussianOptimalF(mu, std, sd), sd)(x, SIGMAS)
    s2 = SIGMAS[:, None] ** 2
    posterior_mean = (std**2 * x + s2 * mu) / (std**2 + s2)
    torch.testing.assert_close(D, posterior_mean, rtol=1e-5, atol=1e-5)  # the wrapper computes in fp32


# ---------------------------------------------------------------- conversions and schedules


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_conversions_round_trip_and_match_definitions(schedule):
    t = SIGMAS if schedule.name == "edm" else torch.linspace(schedule.t_min, 0.99, 7, dtype=torch.float64)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    x0, eps = torch.randn(len(t), 2, 3, dtype=torch.float64), torch.randn(len(t), 2, 3, dtype=torch.float64)
    x_t = schedule.add_noise(x0, t, eps)
    a, s = alpha[:, None, None], sigma[:, None, None]
    truth = {"x0": x0, "eps": eps, "v": a * eps - s * x0, "flow": eps - x0}
    for kind, value in truth.items():
        torch.testing.assert_close(from_x0(x0, kind, x_t, alpha, sigma), value)
        torch.testing.assert_close(to_x0(value, kind, x_t, alpha, sigma), x0)
        for other in truth:
            torch.testing.assert_close(convert(value, kind, other, x_t, alpha, sigma), truth[other])


def test_flow_velocity_is_time_derivative_of_flow_path():
    schedule = FlowSchedule()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    x0, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    x_t = schedule.add_noise(x0, t, eps)
    # Column j of x_t depends only on t[i] of its own row, so one vjp per column gives d x_t / dt.
    velocity = torch.stack([torch.autograd.grad(x_t[:, j].sum(), t, retain_graph=True)[0] for j in range(4)], 1)
    torch.testing.assert_close(velocity, from_x0(x0, "flow", x_t.detach(), schedule.alpha(t.detach()), t.detach()))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_edm_sigma_round_trip(schedule):
    t = torch.linspace(schedule.t_min, schedule.t_max, 11, dtype=torch.float64)
    torch.testing.assert_close(schedule.t_from_edm_sigma(schedule.edm_sigma(t)), t)


def test_vp_is_variance_preserving():
    vp = VPSchedule()
    t = torch.linspace(vp.t_min, vp.t_max, 11, dtype=torch.float64)
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones_like(t))


# ---------------------------------------------------------------- the exact Gaussian mixture

MIXTURE = GaussianMixture([[-2.0, 0.5], [1.5, -1.0], [0.0, 2.0]], [0.3, 0.6, 0.4], weights=[0.2, 0.5, 0.3])


@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.0), (1.0, 0.3), (1.0, 5.0), (0.8, 0.6), (0.2, 0.98)])
def test_mixture_score_is_gradient_of_log_prob(alpha, sigma):
    x = (torch.randn(16, 2, dtype=torch.float64) * 2).requires_grad_()
    (autograd_score,) = torch.autograd.grad(MIXTURE.log_prob(x, sigma, alpha).sum(), x)
    torch.testing.assert_close(MIXTURE.score(x.detach(), sigma, alpha), autograd_score)


@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.3), (1.0, 5.0), (0.6, 0.8)])
def test_mixture_denoiser_single_gaussian_closed_form(alpha, sigma):
    mu, std = torch.tensor([0.4, -1.2], dtype=torch.float64), 0.7
    x_t = torch.randn(8, 2, dtype=torch.float64) * 2
    expected = mu + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (x_t - alpha * mu)
    torch.testing.assert_close(GaussianMixture(mu[None], std).denoise(x_t, sigma, alpha), expected)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_one_ve_denoiser_serves_every_schedule(schedule):
    """E[x0 | x_t] under (alpha, sigma) equals the VE denoiser at sigma/alpha applied to x_t/alpha; and
    Tweedie's score from it matches the exact noised score."""
    t = torch.tensor(0.4 if schedule.name != "edm" else 1.3, dtype=torch.float64)
    alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
    x_t = torch.randn(32, 2, dtype=torch.float64) * 2
    x0_hat = denoise_with_schedule(MixtureDenoiser(MIXTURE), x_t, t, schedule)
    torch.testing.assert_close(x0_hat, MIXTURE.denoise(x_t, sigma, alpha))
    torch.testing.assert_close(score_from_x0(x0_hat, x_t, alpha, sigma), MIXTURE.score(x_t, sigma, alpha))


# ---------------------------------------------------------------- samplers


def test_karras_sigmas_grid():
    sigmas = karras_sigmas(18)
    assert sigmas.shape == (19,) and sigmas.dtype == torch.float64
    assert sigmas[0] == 80.0 and sigmas[-1] == 0.0
    assert math.isclose(float(sigmas[-2]), 0.002, rel_tol=1e-12)
    assert (sigmas[1:] < sigmas[:-1]).all()
    # Evenly spaced in sigma^(1/rho).
    steps = sigmas[:-1] ** (1 / 7.0)
    torch.testing.assert_close(steps.diff(), steps.diff()[:1].expand(17))
    one = karras_sigmas(1, sigma_max=2.5, dtype=torch.float32)
    assert one.tolist() == [2.5, 0.0] and one.dtype == torch.float32
    with pytest.raises(ValueError):
        karras_sigmas(0)


def test_heun_solves_the_ode_exactly_for_a_gaussian():
    """For data N(mu, std^2 I) the probability-flow ODE is linear: x(sigma) - mu scales with
    sqrt(std^2 + sigma^2). So each sample's endpoint is known exactly, not only its distribution."""
    mu, std = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.6
    denoiser = MixtureDenoiser(GaussianMixture(mu[None], std))
    noise = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = mu + (80.0 * noise - mu) * std / math.sqrt(std**2 + 80.0**2)

    def error(num_steps, solver):
        return (edm_sample(denoiser, noise, num_steps=num_steps, solver=solver) - exact).abs().max().item()

    heun_40, heun_80 = error(40, "heun"), error(80, "heun")
    euler_40, euler_160 = error(40, "euler"), error(160, "euler")
    assert heun_40 < 0.03 and heun_80 < 0.3 * heun_40  # second order: twice the steps, ~1/4 the error
    assert euler_160 < 0.3 * euler_40  # first order: 4x the steps, ~1/4 the error
    assert heun_40 < 0.2 * euler_40


def test_heun_transports_noise_to_a_mixture():
    mixture = GaussianMixture([[-2.0, 0.0], [2.0, 1.0]], 0.4, weights=[0.3, 0.7])
    denoiser = MixtureDenoiser(mixture)
    n = 600
    noise = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    samples = edm_sample(denoiser, noise, num_steps=40)
    reference = mixture.sample(200_000, generator=torch.Generator().manual_seed(1)).double()
    mean_se = reference.std(0) / math.sqrt(n)
    assert ((samples.mean(0) - reference.mean(0)).abs() < 4 * mean_se).all()
    torch.testing.assert_close(samples.var(0), reference.var(0), rtol=0.15, atol=0.0)
    # Every sample lands on a mode, in the right proportions.
    to_right = samples[:, 0] > 0
    assert abs(to_right.double().mean().item() - 0.7) < 4 * math.sqrt(0.7 * 0.3 / n)
    modes = mixture.means[to_right.long()]
    assert (samples - modes).norm(dim=1).max() < 2.0
    # Euler with many steps reaches the same samples (the same deterministic ODE).
    euler = edm_sample(denoiser, noise, num_steps=200, solver="euler")
    assert (euler - samples).abs().median() < 0.02


def test_ode_solve_between_arbitrary_levels_and_solver_check():
    mu, std = torch.zeros(2, dtype=torch.float64), 1.0
    denoiser = MixtureDenoiser(GaussianMixture(mu[None], std))
    x = torch.randn(8, 2, dtype=torch.float64) * math.sqrt(std**2 + 10.0**2)
    out = ode_solve(denoiser, x, torch.linspace(10.0, 2.0, 40, dtype=torch.float64))
    torch.testing.assert_close(out, x * math.sqrt(std**2 + 4.0) / math.sqrt(std**2 + 100.0), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="solver"):
        ode_solve(denoiser, x, [10.0, 0.0], solver="rk4")


def test_student_sample_one_and_few_steps():
    calls = []

    def denoiser(x, sigma, labels=None):
        calls.append((float(sigma), labels))
        return 0.5 * x

    z = torch.randn(4, 3)
    torch.testing.assert_close(student_sample(denoiser, z, [2.5], labels="y"), 0.5 * 2.5 * z)
    assert calls == [(2.5, "y")]

    calls.clear()
    out_a = student_sample(denoiser, z, torch.tensor([80.0, 1.5, 0.3, 0.0]), generator=torch.Generator().manual_seed(3))
    out_b = student_sample(denoiser, z, [80.0, 1.5, 0.3], generator=torch.Generator().manual_seed(3))
    assert [c[0] for c in calls] == pytest.approx([80.0, 1.5, 0.3] * 2)  # a trailing 0 is dropped
    torch.testing.assert_close(out_a, out_b)
    g = torch.Generator().manual_seed(3)
    n1, n2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    x0 = 0.5 * (80.0 * z)
    x0 = 0.5 * (x0 + 1.5 * n1)
    x0 = 0.5 * (x0 + 0.3 * n2)
    torch.testing.assert_close(out_a, x0)
    with pytest.raises(ValueError):
        student_sample(denoiser, z, [1.0, -1.0])
