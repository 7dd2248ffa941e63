"""DMD / DMD2 and DP-DMD on the 2-D toy: gradients against their formulas computed by hand, which network
gets which gradient, resume equals an uninterrupted run, a short run improves on its initialisation, and
config errors name their key."""
import json

import pytest
import torch

from conftest import CONFIGS, TOY_STUDENT
from fastonestep.config import ConfigError, load_config
from fastonestep.diffusion.samplers import karras_sigmas
from fastonestep.engine.loop import build, train
from fastonestep.networks.build import build_denoiser

QUIET = dict(progress=False, log=lambda *_: None)
SMALL_EVAL = ["eval.num_samples=200", "eval.batch_size=200"]


def cfg_for(preset, teacher, *extra):
    return load_config(str(CONFIGS / "toy2d" / preset), TOY_STUDENT + [f"teacher={teacher}", *extra])


def perturb(module, scale=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def real_batches(dataset, n):
    g = torch.Generator().manual_seed(1)

    def next_batch():
        idx = torch.randint(0, dataset.data.shape[0], (n,), generator=g)
        return dataset.data[idx], None
    return next_batch


def test_generator_gradient_is_the_dmd_formula(toy_teacher):
    """Generator parameter gradients of one DMD update == autograd of sum(G(z) * g) / numel, with
    g = (p_real - p_fake) / mean|p_real| computed here from the teacher and the fake score."""
    _, method = build(cfg_for("dmd.yaml", toy_teacher, "train.batch_size=16"))
    perturb(method.critic["score"])  # a fake score that differs from the teacher (else g = 0)
    gen, s_g = method.generator, method.levels[0]
    state = method.rng.get_state()
    method.critic.requires_grad_(False)
    loss, _ = method.generator_loss()
    loss.backward()
    got = [p.grad.clone() for p in gen.parameters()]
    gen.zero_grad(set_to_none=True)

    method.rng.set_state(state)  # replay: z, band sigma, noise
    z = torch.randn((16, 2), generator=method.rng)
    x = gen(z * s_g, s_g)
    sigma = method.band_sigma(16)
    eps = method.noise_like(x)
    grid = karras_sigmas(1000, 0.002, 40.0, 7.0)[:-1]
    assert sigma.min() >= grid[979] * (1 - 1e-6) and sigma.max() <= grid[20] * (1 + 1e-6)  # the 2%..98% band
    with torch.no_grad():
        x_t = x + sigma[:, None] * eps
        p_real = x - method.teacher(x_t, sigma)
        p_fake = x - method.critic["score"](x_t, sigma)
        g = (p_real - p_fake) / (p_real.abs().mean(1, keepdim=True) + 1e-8)
    ((x * g).sum() / x.numel()).backward()
    for a, b in zip(got, (p.grad for p in gen.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    assert max(a.abs().max() for a in got) > 0


def test_fake_step_never_reaches_generator_or_teacher(toy_teacher):
    dataset, method = build(cfg_for("dmd2.yaml", toy_teacher, "train.batch_size=32"))
    before = {k: v.clone() for k, v in method.critic.state_dict().items()}
    gen_before = {k: v.clone() for k, v in method.generator.state_dict().items()}
    stats = method.fake_step(real_batches(dataset, 32), step=0)
    assert all(p.grad is None for p in method.generator.parameters())
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    changed = [k for k, v in method.critic.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("score.") for k in changed) and any(k.startswith("gan_head.") for k in changed)
    assert all(torch.equal(v, gen_before[k]) for k, v in method.generator.state_dict().items())
    assert {"fake/loss", "fake/gan_loss", "grad_norm/fake"} <= set(stats)

    critic_before = {k: v.clone() for k, v in method.critic.state_dict().items()}
    stats = method.generator_step(real_batches(dataset, 32), step=0, nimg=0)
    assert all(torch.equal(v, critic_before[k]) for k, v in method.critic.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in method.critic.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())
    assert stats["gen/gan_loss"] > 0 and stats["grad_norm/generator"] > 0


def test_gan_generator_term_flows_through_the_critic_input(toy_teacher):
    """DMD2's generator GAN loss moves the generator (through the frozen head and fake encoder)."""
    _, method = build(cfg_for("dmd2.yaml", toy_teacher, "train.batch_size=16", "dmd.gan_weight=1.0"))
    perturb(method.critic["gan_head"])
    method.critic.requires_grad_(False)
    x = torch.randn(16, 2, requires_grad=True)
    state = method.rng.get_state()
    loss, _ = method.dmd_generator_loss(x)
    (gx,) = torch.autograd.grad(loss, x)
    method.rng.set_state(state)
    method.cfg.dmd.gan_weight = 0.0
    loss0, _ = method.dmd_generator_loss(x)
    (gx0,) = torch.autograd.grad(loss0, x)
    method.rng.set_state(state)  # the GAN term by hand: its sigma and noise follow the DMD draws
    method.band_sigma(16), method.noise_like(x)
    sigma_c = method.fake_sigma(16)
    x_t = x + sigma_c[:, None] * method.noise_like(x)
    feats = method.critic["score"].features(x_t, sigma_c)
    gan = torch.nn.functional.softplus(-method.critic["gan_head"](feats)).mean()
    (want,) = torch.autograd.grad(gan, x)
    torch.testing.assert_close(gx - gx0, want, rtol=1e-4, atol=1e-8)
    assert want.abs().max() > 0


@pytest.mark.parametrize("target", ["x0", "eps", "v"])
def test_dpdmd_first_step_gets_only_the_target_gradient(toy_teacher, target):
    _, method = build(cfg_for("dpdmd.yaml", toy_teacher, "train.batch_size=16", f"dpdmd.target={target}",
                              "dpdmd.teacher_solver=euler", "dpdmd.teacher_steps=2", "dpdmd.diversity_weight=0.7"))
    perturb(method.critic["score"])
    calls = []

    def keep(module, args, out):
        out.retain_grad()
        calls.append((args[0].detach(), out))
    handle = method.generator.register_forward_hook(keep)
    method.critic.requires_grad_(False)
    loss, stats = method.generator_loss()
    loss.backward()
    handle.remove()
    assert len(calls) == 2  # step 1 and step 2
    (x1, out1), (_, out2) = calls
    s1, s2 = method.levels

    with torch.no_grad():  # the teacher's Euler ODE s1 -> s2 in 2 Karras steps, by hand
        rho = 7.0
        levels = [(s1 ** (1 / rho) + i / 2 * (s2 ** (1 / rho) - s1 ** (1 / rho))) ** rho for i in range(3)]
        x = x1.clone()
        for a, b in zip(levels, levels[1:]):
            x = x + (b - a) * (x - method.teacher(x, a)) / a
        x0_star = (x - s2 / s1 * x1) / (1 - s2 / s1)
        torch.testing.assert_close(s2 / s1 * x1 + (1 - s2 / s1) * x0_star, x)  # its DDIM step lands there
        pred = out1.detach()
        # d/dx0 of the prediction in each form: x0 -> 1; eps = (x1 - x0)/s1 -> -1/s1; the VP v =
        # (eps - s1 x0)/sqrt(1 + s1^2) -> -(1/s1 + s1)/sqrt(1 + s1^2); loss = w mean((form(pred) - form(x0*))^2).
        slope = {"x0": 1.0, "eps": -1 / s1, "v": -(1 / s1 + s1) / (1 + s1**2) ** 0.5}[target]
        want = 0.7 * 2 * slope**2 * (pred - x0_star) / pred.numel()
    torch.testing.assert_close(out1.grad, want, rtol=1e-4, atol=1e-9)  # no DMD part at step 1
    torch.testing.assert_close(stats["gen/target_loss"], 0.7 * slope**2 * (pred - x0_star).square().mean())
    assert out2.grad.abs().max() > 0  # the DMD gradient reaches the last step


def test_dpdmd_without_target_loss_leaves_first_step_untouched(toy_teacher):
    _, method = build(cfg_for("dpdmd.yaml", toy_teacher, "train.batch_size=16", "dpdmd.diversity_weight=0"))
    perturb(method.critic["score"])
    outs = []
    def keep(module, args, out):  # returns None: the output is left as it is
        out.retain_grad()
        outs.append(out)
    handle = method.generator.register_forward_hook(keep)
    method.critic.requires_grad_(False)
    loss, _ = method.generator_loss()
    loss.backward()
    handle.remove()
    assert outs[0].grad is None or not outs[0].grad.any()
    assert outs[1].grad.abs().max() > 0


def _stats_rows(run):
    drop = ("images_per_sec", "sec_per_kimg", "peak_memory_mb", "time")
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


@pytest.mark.parametrize("preset,extra", [
    ("dmd2.yaml", ["dmd.fake_steps=2"]),
    ("dpdmd.yaml", []),
    ("dmd.yaml", ["dmd.student_sigmas=[40.0, 1.0]", "dmd.backward_simulation=false"]),
])
def test_resume_equals_uninterrupted(tmp_path, toy_teacher, preset, extra):
    from safetensors.torch import load_file

    make = lambda *e: cfg_for(preset, toy_teacher, "train.steps=12", "train.log_every=6", "train.batch_size=64", *extra,  # noqa: E731
                              *SMALL_EVAL, *e)
    train(make(), str(tmp_path / "full"), **QUIET)
    train(make("train.steps=6"), str(tmp_path / "split"), **QUIET)
    train(make(), str(tmp_path / "split"), **QUIET)  # resumes at step 6
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _stats_rows(tmp_path / "full") == _stats_rows(tmp_path / "split")


def test_dmd_improves_on_its_initialisation(tmp_path, toy_teacher):
    metrics = train(cfg_for("dmd.yaml", toy_teacher, "train.steps=100", "eval.num_samples=500"), str(tmp_path), **QUIET)
    trained, init = metrics["one_step"], metrics["init_one_step"]
    assert trained["energy_distance"] < 0.2 * init["energy_distance"]
    assert trained["modes_covered"] > init["modes_covered"] + 3
    assert metrics["parameters"]["teacher_frozen"] == metrics["parameters"]["fake_score"]
    from fastonestep.engine.export import read_info

    assert read_info(str(tmp_path / "model.safetensors"))["sigma_g"] == [40.0]


@pytest.mark.parametrize("override,key", [
    ("dmd.t_min_frac=0.99", "dmd.t_min_frac"),
    ("dmd.student_sigmas=[2.5, -1.0]", "dmd.student_sigmas"),
    ("dmd.student_sigmas=[0.5, 2.5]", "dmd.student_sigmas"),
    ("dmd.fake_steps=0", "dmd.fake_steps"),
    ("dmd.num_grid_steps=1", "dmd.num_grid_steps"),
    ("dmd.gan_weight=-1", "dmd.gan_weight"),
    ("dpdmd.target=flow", "dpdmd.target"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(str(CONFIGS / "toy2d" / "dmd.yaml"), [override])


@pytest.mark.parametrize("override,key", [
    ("dpdmd.student_sigmas=[2.5]", "dpdmd.student_sigmas"),
    ("dmd.gan_weight=0.01", "dmd.gan_weight"),
    ("dpdmd.diversity_weight=-1", "dpdmd.diversity_weight"),
])
def test_dpdmd_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(str(CONFIGS / "toy2d" / "dpdmd.yaml"), [override])


@pytest.mark.parametrize("kind,shape,arch", [("mlp", (2,), dict(hidden=16, depth=2, emb_dim=8)),
                                             ("unet", (1, 8, 8), dict(channels=8, channel_mult=[1, 2]))])
def test_denoiser_features_leave_the_network_unchanged(kind, shape, arch):
    net = build_denoiser(kind, shape, sigma_data=0.5, **arch)
    keys = set(net.state_dict())
    perturb(net, 0.1)
    x = torch.randn(3, *shape, requires_grad=True)
    feats = net.features(x, torch.tensor([0.1, 1.0, 10.0]))
    assert feats.shape == (3, net.net.feature_dim) and set(net.state_dict()) == keys
    (gx,) = torch.autograd.grad(feats.square().sum(), x)
    assert gx.abs().max() > 0
    if kind == "mlp":  # forward is the output layer on top of the features
        F_out, _, _ = net.raw(x, torch.tensor([0.1, 1.0, 10.0]))
        torch.testing.assert_close(F_out, net.net.out(feats))
