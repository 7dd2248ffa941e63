"""DiffRatio against design.md 4.1, term by term, with references computed here independently of the method:

- one classifier step = the gradient of the logistic loss (generated = 1, real = 0) on noised generator samples
  G(z) = D(sigma_g z; sigma_g) and noised data at levels drawn from pi_c; the generator gets nothing;
- one generator step = backprop of w(t) h(r) grad_{x_t} l into G (both realisations, every divergence, the
  logit clamp, the per-sample normaliser); the ratio network gets nothing and stays trainable;
- on Gaussians, where everything is known in closed form: the classifier's optimum is log q_t / p_t, the
  generator gradient is the gradient of the f-divergence D_f(p_t || q_t), and verifier resampling by p/q turns
  generator samples into data samples;
- k classifier updates per generator update, the generator EMA and what is exported;
- rows whose logit or logit gradient is not finite are dropped from the generator update and counted.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import CONFIGS, TOY_STUDENT, TOY_TEACHER
from fastonestep.config import load_config
from fastonestep.engine.distributed import Trainable
from fastonestep.engine.export import export_model
from fastonestep.engine.loop import build, model_info
from fastonestep.engine.verifier import verifier_sample

DIVERGENCES = ("rkl", "dijs", "fkl", "hellinger")


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """An untrained toy MLP denoiser with perturbed weights: the formulas hold for any weights, no training needed."""
    cfg = load_config(str(CONFIGS / "toy2d" / "edm.yaml"), TOY_TEACHER)
    dataset, method = build(cfg)
    with torch.no_grad():
        for p in method.net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    run = tmp_path_factory.mktemp("diffratio-math-teacher")
    export_model(str(run / "model.safetensors"), method.net, model_info(cfg, method, dataset))
    return run


def diffratio(teacher, *overrides):
    cfg = load_config(str(CONFIGS / "toy2d" / "diffratio.yaml"), TOY_STUDENT + [f"teacher={teacher}", *overrides])
    return build(cfg)[1]


def perturb(net, scale=0.3, seed=0):
    """A non-trivial ratio network (its output layer starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def record_gradients(trainable):
    """Wraps trainable.step to keep a copy of the gradients it is about to apply."""
    seen, step = {}, trainable.step

    def recording_step(i):
        seen["grads"] = [None if p.grad is None else p.grad.clone() for p in trainable.network.parameters()]
        return step(i)

    trainable.step = recording_step
    return seen


def snapshot(net):
    return [p.detach().clone() for p in net.parameters()]


def with_weights(net, weights):
    """A copy of `net` holding `weights`: the reference computations never touch the method's networks."""
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for p, w in zip(twin.parameters(), weights):
            p.copy_(w)
    return twin.requires_grad_(True)


def log_normal(gen, n, mean, std, lo, hi):
    return torch.exp(mean + std * torch.randn(n, generator=gen)).clamp(lo, hi)


def one_step(G, z, sigma_g):
    """G(z) = D(sigma_g z; sigma_g) (design section 3)."""
    return G(sigma_g * z, torch.tensor(sigma_g))


def h_of_r(logit, divergence, clamp):
    """h(r) = f''(r) r^2 at r = exp(-l), l clamped before exp (design 4.1)."""
    r = torch.exp(-logit.clamp(-clamp, clamp))
    return {"rkl": torch.ones_like(r), "dijs": r / (1 + r), "fkl": r, "hellinger": r.sqrt() / 2}[divergence]


def assert_same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ classifier step

def test_classifier_step_is_the_logistic_loss_gradient_and_leaves_the_generator_alone(teacher):
    method = diffratio(teacher, "train.batch_size=32")
    perturb(method.ratio)
    dr, B = method.cfg.diffratio, 32
    ratio_before, gen_before = snapshot(method.ratio), snapshot(method.generator)
    seen = record_gradients(method.ratio_t)
    x_real = torch.randn(B, 2, generator=torch.Generator().manual_seed(1))
    state = method.rng.get_state()
    method.ratio_step(x_real, None, 0)

    # Replay the draws in the method's order: z, sigma of each half from pi_c, then the noise of both halves.
    gen = torch.Generator().set_state(state)
    z = torch.randn(B, 2, generator=gen)
    sigma_gen = log_normal(gen, B, dr.ratio_p_mean, dr.ratio_p_std, dr.sigma_min, dr.sigma_max)
    sigma_real = log_normal(gen, B, dr.ratio_p_mean, dr.ratio_p_std, dr.sigma_min, dr.sigma_max)
    noise = torch.randn(2 * B, 2, generator=gen)
    with torch.no_grad():
        x_gen = one_step(with_weights(method.generator, gen_before), z, dr.sigma_g)
    c = with_weights(method.ratio, ratio_before)
    logit_gen = c(x_gen + sigma_gen[:, None] * noise[:B], sigma_gen)
    logit_real = c(x_real + sigma_real[:, None] * noise[B:], sigma_real)
    # label generated = 1 (-log sigmoid(l)), real = 0 (-log(1 - sigmoid(l))); lambda_c = 1 (README)
    loss = (F.softplus(-logit_gen) + F.softplus(logit_real)).mean()
    want = torch.autograd.grad(loss, list(c.parameters()))
    for got, w in zip(seen["grads"], want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-7)
    assert_same(gen_before, method.generator.parameters())
    assert all(p.grad is None for p in method.generator.parameters())


# ------------------------------------------------------------------------------------------- generator step

def expected_generator_grads(method, G, c, state, B, realisation, divergence):
    """d loss / d theta_G of one generator step, from design 4.1: the gradient pushed into x = G(z) is
    w(t) h(r) grad_{x_t} l (alpha = 1), normalised per sample by mean|grad l| and / numel for `grad`, / B for
    `logit` (the mean of the weighted logits). Returns (gradients, logits)."""
    dr = method.cfg.diffratio
    gen = torch.Generator().set_state(state)  # the method's order: z, sigma (generator levels), noise
    z = torch.randn(B, 2, generator=gen)
    sigma = log_normal(gen, B, dr.gen_p_mean, dr.gen_p_std, dr.sigma_min, dr.sigma_max)
    eps = torch.randn(B, 2, generator=gen)
    x = one_step(G, z, dr.sigma_g)
    x_t = (x.detach() + sigma[:, None] * eps).requires_grad_(True)
    logit = c(x_t, sigma)
    (dl,) = torch.autograd.grad(logit.sum(), x_t)
    coef = sigma**2 * h_of_r(logit.detach(), divergence, dr.logit_clamp)  # weighting=sigma2
    if realisation == "grad":
        push = coef[:, None] * dl / (dl.abs().mean(1, keepdim=True) + 1e-8) / x.numel()
    else:
        push = coef[:, None] * dl / B
    return torch.autograd.grad(x, list(G.parameters()), push), logit.detach()


@pytest.mark.parametrize("realisation", ["grad", "logit"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_generator_step_backpropagates_the_weighted_ratio_gradient(teacher, realisation, divergence):
    method = diffratio(teacher, "train.batch_size=32", f"diffratio.realisation={realisation}",
                       f"diffratio.divergence={divergence}", "diffratio.weighting=sigma2", "diffratio.logit_clamp=2")
    perturb(method.ratio, scale=0.2)
    ratio_before, gen_before = snapshot(method.ratio), snapshot(method.generator)
    seen = record_gradients(method.gen)
    state = method.rng.get_state()
    method.generator_step(0, 0)

    G, c = with_weights(method.generator, gen_before), with_weights(method.ratio, ratio_before)
    want, logit = expected_generator_grads(method, G, c, state, 32, realisation, divergence)
    assert (logit.abs() < 2).any() and (logit.abs() > 2).any()  # h is checked on both sides of the clamp
    for got, w in zip(seen["grads"], want):  # fp32 summation order differs: tolerance relative to the largest
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))
    # The ratio network is a constant of this update, and trainable again after it.
    assert_same(ratio_before, method.ratio.parameters())
    assert all(p.grad is None and p.requires_grad for p in method.ratio.parameters())


# ----------------------------------------------------------------------------- Gaussians: closed-form truth
# Data p = N(M_P, S_P^2 I), generator q = N(M_Q, S_Q^2 I) in 2-D; noised to sigma both stay Gaussian, with
# variances S^2 + sigma^2, so log q_sigma / p_sigma is known exactly. S_Q > S_P keeps p/q square-integrable
# under q (the forward-KL weight h = r then has a finite variance).

M_P, S_P = torch.tensor([0.0, 0.0]), 0.6
M_Q, S_Q = torch.tensor([0.5, -0.3]), 1.0
SIGMA = 0.4


def gaussian_log_density(x, mean, var):
    return -((x - mean) ** 2).sum(-1) / (2 * var) - torch.log(torch.as_tensor(2 * math.pi * var))


class ExactLogRatio(nn.Module):
    """c(x_t, sigma) = log q_sigma(x_t) - log p_sigma(x_t) for the Gaussians above (the optimal classifier)."""

    def __init__(self, m_q=M_Q, s_q=S_Q):
        super().__init__()
        self.m_q, self.s_q = m_q, s_q

    def forward(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1)
        return (gaussian_log_density(x, self.m_q, self.s_q**2 + sigma**2)
                - gaussian_log_density(x, M_P, S_P**2 + sigma**2))


class QuadraticLogit(nn.Module):
    """c(x) = a |x|^2 + b.x + d: a family that holds the exact log ratio of two isotropic Gaussians."""

    def __init__(self, a, b, d):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(b.clone().float())
        self.d = nn.Parameter(torch.tensor(float(d)))

    def forward(self, x, sigma, labels=None):
        return self.a * (x**2).sum(1) + x @ self.b + self.d


def exact_log_ratio_coefficients(sigma):
    """(a, b, d) of log q_sigma - log p_sigma as a quadratic in x (2-D: the log-normaliser is -log(2 pi v))."""
    vp, vq = S_P**2 + sigma**2, S_Q**2 + sigma**2
    a = 1 / (2 * vp) - 1 / (2 * vq)
    b = M_Q / vq - M_P / vp
    d = (M_P**2).sum() / (2 * vp) - (M_Q**2).sum() / (2 * vq) + math.log(vp / vq)
    return a, b, d


class ShiftScaleGenerator(nn.Module):
    """A one-step 'denoiser' with G(z) = D(sigma_g z; sigma_g) = M_Q + S_Q z, i.e. generator samples ~ q."""

    def forward(self, x, sigma, labels=None):
        return M_Q + S_Q * x / sigma


def test_the_classifier_optimum_is_the_log_density_ratio_q_over_p(teacher):
    """The population gradient of the classifier loss vanishes at c = log q_t - log p_t (Theorem 3.1 with
    generated = 1), not at its negation log p_t / q_t nor at c = 0."""
    B = 40000
    method = diffratio(teacher, f"train.batch_size={B}", f"diffratio.ratio_p_mean={math.log(SIGMA)}",
                       "diffratio.ratio_p_std=0")  # one noise level: the exact ratio is a single quadratic
    method.generator = ShiftScaleGenerator()
    x_real = M_P + S_P * torch.randn(B, 2, generator=torch.Generator().manual_seed(5))

    def classifier_gradient(a, b, d):
        net = QuadraticLogit(a, b, d)
        method.ratio_t = Trainable("ratio", net, method.cfg.diffratio.ratio_optim, method.backend)
        seen = record_gradients(method.ratio_t)
        method.ratio_step(x_real, None, 0)
        return torch.cat([g.reshape(-1) for g in seen["grads"]])

    a, b, d = exact_log_ratio_coefficients(SIGMA)
    at_optimum = classifier_gradient(a, b, d).norm()
    assert at_optimum < 0.03 * classifier_gradient(-a, -b, -d).norm()
    assert at_optimum < 0.03 * classifier_gradient(0.0, torch.zeros(2), 0.0).norm()


F_OF_R = {  # D_f(p || q) = E_q[f(p/q)]; h(r) = f''(r) r^2 gives design 4.1's weights
    "rkl": lambda r: -torch.log(r),  # KL(q || p)
    "fkl": lambda r: r * torch.log(r),  # KL(p || q)
    "dijs": lambda r: r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2),  # 2 JS(p, q)
    "hellinger": lambda r: (r.sqrt() - 1) ** 2,  # squared Hellinger (unnormalised)
}


def f_divergence_gradient(divergence, m_q, log_s_q):
    """d/d(m_q, log s_q) of D_f(p_sigma || q_sigma) by quadrature on a 2-D grid (float64)."""
    m_q = m_q.double().clone().requires_grad_(True)
    log_s_q = torch.tensor(float(log_s_q), dtype=torch.float64, requires_grad=True)
    grid = torch.linspace(-7, 7, 561, dtype=torch.float64)
    pts = torch.cartesian_prod(grid, grid)
    p = gaussian_log_density(pts, M_P.double(), S_P**2 + SIGMA**2).exp()
    q = gaussian_log_density(pts, m_q, log_s_q.exp() ** 2 + SIGMA**2).exp()
    divergence_value = (q * F_OF_R[divergence](p / q)).sum() * (grid[1] - grid[0]) ** 2
    d_mean, d_log_std = torch.autograd.grad(divergence_value, [m_q, log_s_q])
    return torch.cat([d_mean, d_log_std.reshape(1)]).float()


@pytest.mark.parametrize("realisation", ["logit", "grad"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_generator_gradient_is_the_f_divergence_gradient(teacher, realisation, divergence):
    """With the exact ratio network, the generator loss's gradient w.r.t. the generator's parameters is
    grad D_f(p_t || q_t): right sign (descent moves q to p) and the right weight h for each divergence."""
    method = diffratio(teacher, f"diffratio.divergence={divergence}", f"diffratio.realisation={realisation}",
                       "diffratio.normalize=false")  # the normaliser rescales per sample: not a divergence gradient
    method.ratio = ExactLogRatio()
    B = 50000
    m_q = M_Q.clone().requires_grad_(True)
    log_s_q = torch.tensor(math.log(S_Q), requires_grad=True)
    x = m_q + log_s_q.exp() * torch.randn(B, 2, generator=torch.Generator().manual_seed(11))
    noise = torch.randn(B, 2, generator=torch.Generator().manual_seed(12))
    loss, _ = method.generator_loss(x, None, torch.full((B,), SIGMA), noise)
    got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [m_q, log_s_q])])
    if realisation == "grad":
        got = got * x.shape[1]  # d loss / dx = g / numel(x): per sample g / 2 against the logit form's g
    want = f_divergence_gradient(divergence, M_Q, math.log(S_Q))
    assert (got - want).norm() < 0.04 * want.norm()  # Monte Carlo error ~1% at this batch


def test_verifier_resampling_by_p_over_q_turns_generator_samples_into_data_samples():
    """Candidates from q, scored by -c = log p/q: resampling gives draws from p (importance resampling),
    best-of-K keeps the candidate with the largest p/q."""
    n, k = 4000, 32
    candidates = torch.Generator().manual_seed(3)
    made = []

    def generate_fn(m, labels):
        made.append(M_Q + S_Q * torch.randn(m, 2, generator=candidates))
        return made[-1]

    out, _ = verifier_sample(generate_fn, ExactLogRatio(), n, k, 1e-6, "resample", torch.Generator().manual_seed(4),
                             batch_size=k * 500)
    assert (out.mean(0) - M_P).abs().max() < 0.05  # q's mean is 0.58 away
    assert (out.var(0) / S_P**2 - 1).abs().max() < 0.1  # q's variance is 2.8x p's

    made.clear()
    best, info = verifier_sample(generate_fn, ExactLogRatio(), 200, k, 1e-6, "best", torch.Generator().manual_seed(4))
    cand = torch.cat(made).reshape(200, k, 2)
    log_p_over_q = gaussian_log_density(cand, M_P, S_P**2) - gaussian_log_density(cand, M_Q, S_Q**2)
    assert torch.equal(info["chosen"], log_p_over_q.argmax(1))
    assert torch.equal(best, cand[torch.arange(200), info["chosen"]])


# ------------------------------------------------------------------- schedule, EMA, export, initialisation

def test_k_classifier_updates_per_generator_update_each_on_a_fresh_real_batch(teacher):
    method = diffratio(teacher, "diffratio.ratio_steps=3", "train.batch_size=16")
    batches = []

    def next_batch():
        batches.append(torch.randn(16, 2))
        return batches[-1], None

    method.step(next_batch, 0, 0)
    assert len(batches) == 3
    ratio_steps = {int(s["step"]) for s in method.ratio_t.opt.state.values()}
    gen_steps = {int(s["step"]) for s in method.gen.opt.state.values()}
    assert ratio_steps == {3} and gen_steps == {1}


def test_generator_ema_follows_each_update_and_is_what_is_exported(teacher):
    halflife_kimg, rampup, B, nimg = 0.05, 0.0, 64, 1000
    method = diffratio(teacher, f"train.batch_size={B}", f"train.ema_halflife_kimg={halflife_kimg}",
                       f"train.ema_rampup={rampup}")
    perturb(method.ratio)  # a zero ratio head gives a zero generator gradient
    before = snapshot(method.generator)
    method.step(lambda: (torch.randn(B, 2), None), 0, nimg)
    after = snapshot(method.generator)
    assert not all(torch.equal(a, b) for a, b in zip(before, after))
    beta = 0.5 ** (B / (halflife_kimg * 1000))  # EDM EMA, no ramp-up
    for e, b, a in zip(method.ema.net.parameters(), before, after):
        torch.testing.assert_close(e, beta * b + (1 - beta) * a)
    assert method.export_network() is method.ema.net
    assert method.export_info()["sigma_g"] == [method.cfg.diffratio.sigma_g]
    module, info = method.export_extra()["ratio"]
    assert module is method.ratio and info["role"] == "ratio"
    dr = method.cfg.diffratio
    assert dr.sigma_min <= info["verifier_sigma"] <= math.exp(dr.ratio_p_mean)  # small, inside pi_c's range


# --------------------------------------------------------------------------------------- non-finite rows

class PoisonedLogit(nn.Module):
    """logit = x_0 + x_1^2 / 2, NaN (with a NaN gradient) where x_0 > 50, and NaN with a finite gradient
    (the NaN comes from a factor that gets no gradient) where x_1 > 50."""

    def forward(self, x, sigma, labels=None):
        logit = x[:, 0] + 0.5 * x[:, 1] ** 2 + torch.sqrt(50.0 - x[:, 0])
        return logit + torch.sqrt(50.0 - x[:, 1]).detach()


@pytest.mark.parametrize("realisation", ["grad", "logit"])
@pytest.mark.parametrize("divergence", ["rkl", "dijs"])
def test_rows_with_a_nonfinite_logit_or_gradient_are_dropped_and_counted(teacher, realisation, divergence):
    """README: rows with NaN or Inf are dropped from the update and counted. The other rows keep exactly the
    update they get without the bad rows (the normaliser is per sample, the loss a mean over all B rows)."""
    method = diffratio(teacher, f"diffratio.realisation={realisation}", f"diffratio.divergence={divergence}",
                       "diffratio.normalize=false")
    method.ratio = PoisonedLogit()
    B = 8
    x = torch.randn(B, 2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    bad = torch.tensor([False, False, True, False, False, True, False, False])
    poison = torch.zeros(B, 2)
    poison[2, 0] = poison[5, 1] = 100.0  # row 2: NaN logit and gradient; row 5: NaN logit, finite gradient
    sigma, noise = torch.full((B,), 0.1), torch.zeros(B, 2)
    loss, stats = method.generator_loss(x + poison, None, sigma, noise)
    (got,) = torch.autograd.grad(loss, x)

    # Independent reference on the good rows: d loss / dx_i = h(r_i) grad l_i / B (logit) or / numel (grad).
    x_t = x.detach().clone().requires_grad_(True)
    logit = x_t[:, 0] + 0.5 * x_t[:, 1] ** 2 + torch.sqrt(50.0 - x_t[:, 0]) + torch.sqrt(50.0 - x_t[:, 1]).detach()
    (dl,) = torch.autograd.grad(logit.sum(), x_t)
    push = h_of_r(logit.detach(), divergence, method.cfg.diffratio.logit_clamp)[:, None] * dl
    want = torch.where(bad[:, None], 0.0, push / (B if realisation == "logit" else x.numel()))
    torch.testing.assert_close(got, want)
    assert torch.isfinite(loss)
    assert int(stats["gen/nonfinite_samples"]) == 2
