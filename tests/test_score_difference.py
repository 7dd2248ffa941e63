"""The score-difference experiment: a quick end-to-end run, and the ratio network reaching the analytic
optimum of the logistic loss (c = log q_t - log p_t) for two Gaussians."""
import json
import math

import pytest
import torch

from fastonestep.data.mixture import GaussianMixture
from fastonestep.experiments import EXPERIMENTS
from fastonestep.experiments.score_difference import (
    RatioNetwork,
    diffratio_score_difference,
    logistic_ratio_loss,
    run,
)
from fastonestep.networks.mlp import MLP


def test_quick_run_writes_well_formed_json_and_png(tmp_path):
    out = tmp_path / "sd.json"
    sigmas = [0.1, 0.5, 2.0]
    result = run(str(out), quick=True, steps=100, sigmas=sigmas, progress=False)

    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["sigmas"] == sigmas
    for method in ("diffratio", "vsd"):
        for metric in ("l2", "cosine"):
            values = on_disk[method][metric]
            assert len(values) == len(sigmas)
            assert all(math.isfinite(v) for v in values)
        assert all(-1.0 <= c <= 1.0 for c in on_disk[method]["cosine"])
        assert all(v >= 0 for v in on_disk[method]["l2"])
    settings = on_disk["settings"]
    assert settings["steps"] == 100 and settings["quick"] is True
    assert settings["wall_time_s"] > 0
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".tmp-*")), "temporary JSON left behind"


def test_quick_run_is_deterministic(tmp_path):
    a = run(str(tmp_path / "a.json"), quick=True, steps=40, sigmas=[0.2, 1.0], num_eval=200, progress=False)
    b = run(str(tmp_path / "b.json"), quick=True, steps=40, sigmas=[0.2, 1.0], num_eval=200, progress=False)
    for method in ("diffratio", "vsd"):
        assert a[method] == b[method]


def test_registry_entry_runs(tmp_path):
    out = tmp_path / "reg.json"
    EXPERIMENTS["score-difference"](str(out), quick=True, steps=20, sigmas=[0.5], num_eval=100, progress=False)
    assert json.loads(out.read_text())["sigmas"] == [0.5]


def closed_form_log_ratio(x, mu_p, var_p, mu_q, var_q):
    """log N(x; mu_q, var_q I) - log N(x; mu_p, var_p I), and its gradient in x."""
    dim = x.shape[1]
    log_ratio = (-(x - mu_q).square().sum(1) / (2 * var_q) + (x - mu_p).square().sum(1) / (2 * var_p)
                 - 0.5 * dim * math.log(var_q / var_p))
    grad = -(x - mu_q) / var_q + (x - mu_p) / var_p
    return log_ratio, grad


@pytest.fixture
def one_thread():
    """Tiny networks: one thread is as fast, and far faster when other jobs share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_ratio_network_reaches_analytic_log_ratio_for_two_gaussians(one_thread):
    torch.manual_seed(0)
    sigma = 0.3
    mu_p, std_p = torch.tensor([0.0, 0.0]), 0.5
    mu_q, std_q = torch.tensor([0.5, 0.25]), 0.4
    p = GaussianMixture(mu_p[None], std_p)
    q = GaussianMixture(mu_q[None], std_q)
    ratio = RatioNetwork(MLP(dim=2, hidden=64, depth=2, out_dim=1, zero_init_output=True))
    steps, batch = 300, 1024
    opt = torch.optim.Adam(ratio.parameters(), lr=3e-3)
    # Decaying the step size averages out the classifier's label noise; a constant one leaves ~0.1 jitter.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=3e-5)
    g = torch.Generator().manual_seed(0)
    sigmas = torch.full((batch,), sigma)
    for _ in range(steps):
        x_q = q.sample(batch, generator=g) + sigma * torch.randn(batch, 2, generator=g)
        x_p = p.sample(batch, generator=g) + sigma * torch.randn(batch, 2, generator=g)
        loss = logistic_ratio_loss(ratio(x_q, sigmas), ratio(x_p, sigmas))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()

    # Test points from both noised distributions (where the classifier saw data).
    x = torch.cat([p.sample(500, generator=g), q.sample(500, generator=g)]) + sigma * torch.randn(1000, 2, generator=g)
    var_p, var_q = std_p**2 + sigma**2, std_q**2 + sigma**2
    true_logit, true_grad = closed_form_log_ratio(x, mu_p, var_p, mu_q, var_q)
    # The closed form agrees with the mixture's exact noised densities.
    torch.testing.assert_close(true_logit, q.log_prob(x, sigma) - p.log_prob(x, sigma), atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        logit = ratio(x, torch.full((x.shape[0],), sigma))
    logit_error = (logit - true_logit).abs()
    # Seeds 0-4 give mean errors 0.02-0.035 and 90% quantiles below 0.06; true logits here span about -5.5..2.
    assert logit_error.mean() < 0.08, logit_error.mean()
    assert logit_error.quantile(0.9) < 0.15

    est_grad = diffratio_score_difference(ratio, x, sigma)
    torch.testing.assert_close(true_grad, q.score(x, sigma) - p.score(x, sigma), atol=1e-4, rtol=1e-4)
    cosine = torch.nn.functional.cosine_similarity(est_grad, true_grad, dim=1)
    assert cosine.mean() > 0.95, cosine.mean()
