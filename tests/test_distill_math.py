"""The distillation methods' maths, term by term, against design.md 4.2-4.4 recomputed here by hand.

Each test replays one method update's random draws from the method's seeded generator, rebuilds the loss from
the design formulas with plain torch ops on the same networks, and compares the parameter gradients autograd
gives with those the method produced (through its engine, accumulation chunks included). Independent of
tests/test_dmd.py and tests/test_backward.py, which check single pieces (one loss, one output's gradient).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIGS, TOY_STUDENT, TOY_TEACHER
from fastonestep.config import load_config
from fastonestep.engine.loop import build

N = 16  # samples per update: small, but every per-sample term (normaliser, weights) is exercised


def dmd_method(teacher, preset, *extra):
    _, method = build(load_config(str(CONFIGS / "toy2d" / preset),
                                  TOY_STUDENT + [f"teacher={teacher}", f"train.batch_size={N}", *extra]))
    return method


def perturb(*modules, scale=0.05, seed=1):
    """Moves networks off the teacher's weights so every difference the losses measure is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))


def capture_step_grads(trainable, network):
    """Replaces the trainable's optimiser step by one that records the accumulated gradients (and skips the
    update, so the replay sees the same weights). Returns the dict the gradients land in."""
    seen = {}

    def record(step):
        seen["grads"] = {n: None if p.grad is None else p.grad.clone() for n, p in network.named_parameters()}
        network.zero_grad(set_to_none=True)
        return 0.0
    trainable.step = record
    return seen


def assert_grads_match(got: dict, network, rtol=1e-4, atol=1e-8):
    want = {n: p.grad for n, p in network.named_parameters()}
    assert got.keys() == want.keys()
    for name, g in got.items():
        assert g is not None and want[name] is not None, name
        torch.testing.assert_close(g, want[name], rtol=rtol, atol=atol, msg=name)
    assert max(g.abs().max() for g in got.values()) > 0


def karras_ascending(n, lo, hi, rho):
    """The n Karras levels from lo to hi, ascending: position i / (n - 1) along the grid."""
    pos = torch.arange(n, dtype=torch.float64) / (n - 1)
    return (lo ** (1 / rho) + pos * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho, pos


def lognormal_sigma(rng, n, p_mean, p_std, lo, hi):
    return torch.exp(p_mean + p_std * torch.randn(n, generator=rng)).clamp(lo, hi)


def edm_loss(D, x0, sigma, sd):
    """design 3: lambda(s) * mean (D - x0)^2 per sample, lambda = (s^2 + sd^2) / (s sd)^2."""
    return (sigma**2 + sd**2) / (sigma * sd) ** 2 * (D - x0).square().mean(1)


def dmd_direction(x, real_hat, fake_hat):
    """design 4.2: g = (p_real - p_fake) / mean |p_real|, p = x - D(x_t)."""
    p_real, p_fake = x - real_hat, x - fake_hat
    return (p_real - p_fake) / p_real.abs().mean(1, keepdim=True)


# -- DMD / DMD2 -----------------------------------------------------------------------------------------------
def test_fake_step_is_edm_loss_on_detached_samples_plus_discriminator(toy_teacher):
    """DMD2 critic update: EDM loss of D_fake on detached G(z) + gan_disc_weight * (softplus(-d(real_t)) +
    softplus(d(gen_t))), the discriminator on D_fake's features; the generator and teacher get nothing."""
    m = dmd_method(toy_teacher, "dmd2.yaml", "dmd.gan_disc_weight=0.3")
    perturb(m.critic, m.generator, scale=0.1)
    data = torch.randn(N, 2)
    got = capture_step_grads(m.critic_t, m.critic)
    state = m.rng.get_state()
    m.fake_step(lambda: (data, None), step=0)
    assert all(p.grad is None for p in [*m.generator.parameters(), *m.teacher.parameters()])

    m.rng.set_state(state)  # replay: z, fake sigma and noise, then the real side's sigma and noise
    d, dd, sd = m.cfg.dmd, m.cfg.diffusion, m.sigma_data
    z = torch.randn(N, 2, generator=m.rng)
    sigma = lognormal_sigma(m.rng, N, d.fake_p_mean, d.fake_p_std, dd.sigma_min, dd.sigma_max)
    noise = torch.randn(N, 2, generator=m.rng)
    sigma_r = lognormal_sigma(m.rng, N, d.fake_p_mean, d.fake_p_std, dd.sigma_min, dd.sigma_max)
    noise_r = torch.randn(N, 2, generator=m.rng)
    with torch.no_grad():
        x = m.generator(z * m.levels[0], m.levels[0])
    score, head = m.critic["score"], m.critic["gan_head"]
    x_t = x + sigma[:, None] * noise
    loss_fake = edm_loss(score(x_t, sigma), x, sigma, sd).mean()
    d_real = head(score.features(data + sigma_r[:, None] * noise_r, sigma_r))
    d_gen = head(score.features(x_t, sigma))
    (loss_fake + 0.3 * (F.softplus(-d_real).mean() + F.softplus(d_gen).mean())).backward()
    assert_grads_match(got["grads"], m.critic, atol=1e-7)


def advance_to_level(m, k_wanted):
    """Advances m.rng until the next generator update draws level k_wanted; returns that rng state."""
    if len(m.levels) == 1:
        return m.rng.get_state()
    for _ in range(100):
        state = m.rng.get_state()
        torch.randn(N, 2, generator=m.rng)  # z
        if int(torch.randint(len(m.levels), (1,), generator=m.rng)) == k_wanted:
            m.rng.set_state(state)
            return state
    raise AssertionError("level never drawn")


@pytest.mark.parametrize("levels", [[40.0], [40.0, 2.0, 0.5]])
def test_generator_step_is_dmd_gradient_plus_gan_term(toy_teacher, levels):
    """One DMD2 generator update through its engine (two accumulation chunks): the generator's gradient is that
    of sum(x * g) / numel + gan_weight * mean softplus(-d(x_t')), x the output at the drawn level k (made, for
    k > 0, by the student's own earlier levels without gradient: backward simulation); g from D_real and D_fake
    at a sigma of the Karras band; the critic and the teacher get no gradient."""
    m = dmd_method(toy_teacher, "dmd2.yaml", "dmd.gan_weight=0.5", "train.batch_per_gpu=8",
                   f"dmd.student_sigmas={levels}")
    perturb(m.critic, m.generator, scale=0.1)
    k_wanted = len(levels) - 1  # the deepest level: the whole backward simulation runs
    state = advance_to_level(m, k_wanted)
    got = capture_step_grads(m.gen, m.generator)
    m.generator_step(None, step=0, nimg=0)
    assert all(p.grad is None for p in [*m.critic.parameters(), *m.teacher.parameters()])

    m.rng.set_state(state)  # replay: z, k, re-noisings, band index, its noise, GAN sigma and noise
    d, dd = m.cfg.dmd, m.cfg.diffusion
    z = torch.randn(N, 2, generator=m.rng)
    k = 0 if len(levels) == 1 else int(torch.randint(len(levels), (1,), generator=m.rng))
    assert k == k_wanted
    renoise = [torch.randn(N, 2, generator=m.rng) for _ in range(k)]
    grid, pos = karras_ascending(d.num_grid_steps, dd.sigma_min, dd.sigma_max, dd.rho)
    band = grid[(pos >= d.t_min_frac - 1e-9) & (pos <= d.t_max_frac + 1e-9)].float()
    sigma = band[torch.randint(0, band.numel(), (N,), generator=m.rng)]
    noise = torch.randn(N, 2, generator=m.rng)
    sigma_gan = lognormal_sigma(m.rng, N, d.fake_p_mean, d.fake_p_std, dd.sigma_min, dd.sigma_max)
    noise_gan = torch.randn(N, 2, generator=m.rng)

    G = m.generator
    with torch.no_grad():  # backward simulation: levels[:k] from noise, then re-noise to levels[k]
        x_in = z * levels[0]
        for j in range(k):
            x_in = G(x_in, levels[j]) + levels[j + 1] * renoise[j]
    x = G(x_in, levels[k])
    with torch.no_grad():
        x_t = x + sigma[:, None] * noise
        g = dmd_direction(x, m.teacher(x_t, sigma), m.critic["score"](x_t, sigma))
    m.critic.requires_grad_(False)
    d_gen = m.critic["gan_head"](m.critic["score"].features(x + sigma_gan[:, None] * noise_gan, sigma_gan))
    ((x * g).sum() / x.numel() + 0.5 * F.softplus(-d_gen).mean()).backward()
    assert_grads_match(got["grads"], G)


def test_band_sigmas_are_the_karras_levels_in_the_band(toy_teacher):
    """An asymmetric band catches a grid read the wrong way round: positions 0.1..0.6, 0 = sigma_min."""
    m = dmd_method(toy_teacher, "dmd.yaml", "dmd.t_min_frac=0.1", "dmd.t_max_frac=0.6", "dmd.num_grid_steps=11")
    dd = m.cfg.diffusion
    grid, pos = karras_ascending(11, dd.sigma_min, dd.sigma_max, dd.rho)
    want = grid[(pos >= 0.1 - 1e-9) & (pos <= 0.6 + 1e-9)].float()
    drawn = m.band_sigma(2000).unique()
    torch.testing.assert_close(drawn, want)


def test_step_runs_fake_steps_critic_updates_before_one_generator_update(toy_teacher):
    m = dmd_method(toy_teacher, "dmd2.yaml")  # DMD2: 5 critic updates per generator update
    calls = []
    m.critic_t.step = lambda step: calls.append("critic") or 0.0
    m.gen.step = lambda step: calls.append("generator") or 0.0
    data = torch.randn(N, 2)
    m.step(lambda: (data, None), step=0, nimg=0)
    assert m.cfg.dmd.fake_steps == 5 and calls == ["critic"] * 5 + ["generator"]


# -- DP-DMD ---------------------------------------------------------------------------------------------------
def heun_ode(denoiser, x, levels):
    for a, b in zip(levels, levels[1:]):
        d1 = (x - denoiser(x, torch.tensor(a))) / a
        x_euler = x + (b - a) * d1
        d2 = (x_euler - denoiser(x_euler, torch.tensor(b))) / b
        x = x + (b - a) * 0.5 * (d1 + d2)
    return x


def test_dpdmd_three_steps_target_loss_then_dmd_from_detached_first_step(toy_teacher):
    """K = 3, v target: the generator's gradient is that of w * mean (v(x0_1) - v(x0*))^2 (v = Salimans' v in
    the VP coordinates of s_1 z, x0* the x0 whose DDIM step s_1 -> s_2 lands on the teacher's Heun ODE) plus
    the DMD term on G(G(sg(x0_1) + s_2 n_1; s_2) + s_3 n_2; s_3): step 1 gets no DMD gradient."""
    s = [40.0, 2.0, 0.5]
    m = dmd_method(toy_teacher, "dpdmd.yaml", f"dpdmd.student_sigmas={s}", "dpdmd.target=v",
                   "dpdmd.teacher_steps=3", "dpdmd.teacher_solver=heun", "dpdmd.diversity_weight=0.7",
                   "train.batch_per_gpu=8")
    perturb(m.critic, m.generator, scale=0.1)
    got = capture_step_grads(m.gen, m.generator)
    state = m.rng.get_state()
    m.generator_step(None, step=0, nimg=0)

    m.rng.set_state(state)  # replay: z, the two re-noisings, band index, its noise
    z = torch.randn(N, 2, generator=m.rng)
    n1, n2 = (torch.randn(N, 2, generator=m.rng) for _ in range(2))
    d, dd = m.cfg.dmd, m.cfg.diffusion
    grid, pos = karras_ascending(d.num_grid_steps, dd.sigma_min, dd.sigma_max, dd.rho)
    band = grid[(pos >= d.t_min_frac - 1e-9) & (pos <= d.t_max_frac + 1e-9)].float()
    sigma = band[torch.randint(0, band.numel(), (N,), generator=m.rng)]
    noise = torch.randn(N, 2, generator=m.rng)

    G, T = m.generator, m.teacher
    x1 = s[0] * z
    x0_1 = G(x1, s[0])
    ode_levels = karras_ascending(4, s[1], s[0], dd.rho)[0].flip(0).tolist()  # s_1 -> s_2 in 3 steps
    with torch.no_grad():
        x_s2 = heun_ode(T, x1, ode_levels)
        r = s[1] / s[0]
        x0_star = (x_s2 - r * x1) / (1 - r)

    def v(x0):  # alpha = 1/sqrt(1 + s^2), sigma = s alpha: v = alpha eps - sigma x0, eps = (x1 - x0) / s
        return ((x1 - x0) / s[0] - s[0] * x0) / math.sqrt(1 + s[0] ** 2)
    loss_target = 0.7 * (v(x0_1) - v(x0_star)).square().mean()
    x = G(G(x0_1.detach() + s[1] * n1, s[1]) + s[2] * n2, s[2])
    with torch.no_grad():
        x_t = x + sigma[:, None] * noise
        g = dmd_direction(x, T(x_t, sigma), m.critic["score"](x_t, sigma))
    (loss_target + (x * g).sum() / x.numel()).backward()
    assert_grads_match(got["grads"], G)


# -- backward distillation ------------------------------------------------------------------------------------
def test_backward_eps_student_with_noise_correction(toy_teacher):
    """One backward-distillation update (two chunks) of a 3-level eps student with noise correction c = 0.3 and
    a fixed shift s' = 0.7: inputs from the student's own no-grad trajectory, whose first step is the corrected
    x0 = c * G(s_1 z) (VE: eps = z + c (eps_hat - z)); loss mean (G(x_k; s_k) - sg(T(sg(x0_s) + s' n; s')))^2."""
    s, c, s_shift = [40.0, 2.0, 0.5], 0.3, 0.7
    _, m = build(load_config(str(CONFIGS / "toy2d" / "backward.yaml"), TOY_TEACHER + [
        "eval.teacher_fd=false", f"teacher={toy_teacher}", f"backward.student_sigmas={s}",
        "backward.parameterization=eps", f"backward.noise_correction={c}", "backward.shift=fixed",
        f"backward.shift_sigma={s_shift}", "train.batch_size=32", "train.batch_per_gpu=16"]))
    perturb(m.generator)
    got = capture_step_grads(m.gen, m.generator)
    state = m.rng.get_state()
    m.step(None, step=0, nimg=0)
    assert all(p.grad is None for p in m.teacher.parameters())

    m.rng.set_state(state)  # replay: z, per-sample steps k, the trajectory's two re-noisings, the shift noise
    n, G, T = 32, m.generator, m.teacher
    z = torch.randn(n, 2, generator=m.rng)
    k = torch.multinomial(torch.ones(3) / 3, n, replacement=True, generator=m.rng)
    n1, n2, n_shift = (torch.randn(n, 2, generator=m.rng) for _ in range(3))
    with torch.no_grad():
        x1 = s[0] * z
        x2 = c * G(x1, s[0]) + s[1] * n1
        x3 = G(x2, s[1]) + s[2] * n2
    x_in = torch.stack([x1, x2, x3])[k, torch.arange(n)]
    x0_s = G(x_in, torch.tensor(s)[k])
    with torch.no_grad():
        target = T(x0_s + s_shift * n_shift, torch.full((n,), s_shift))
    (x0_s - target).square().mean().backward()
    assert_grads_match(got["grads"], G, atol=1e-7)
