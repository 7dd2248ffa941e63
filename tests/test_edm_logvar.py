"""config key edm.logvar_channels: EDM2's learned uncertainty weighting of the denoising loss (networks/heads.py
LogVarHead, methods/edm.py). The head learns the log of the expected loss per noise level; a run with it trains
the head with the denoiser (one optimiser), logs its mean, resumes exactly, and exports the denoiser alone. Under
ZeRO-2/3 it follows the single-process run (tests/test_distributed.py)."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS, TOY_TEACHER
from fastonestep.config import ConfigError, load_config
from fastonestep.engine.checkpoint import latest_checkpoint, load_checkpoint
from fastonestep.engine.loop import train
from fastonestep.networks.heads import LogVarHead

QUIET = dict(progress=False, log=lambda *_: None)


def test_the_head_learns_the_log_of_the_expected_loss_per_noise_level():
    """Minimising mean(L / exp(u) + u) over per-sample losses L with E[L | sigma] = f(sigma) gives u = log f."""
    def f(sigma):
        return 0.2 + sigma.sqrt()

    torch.manual_seed(0)
    head = LogVarHead(32).train()
    opt = torch.optim.Adam(head.parameters(), lr=0.02)
    for _ in range(600):
        sigma = torch.exp(torch.randn(512) * 1.2 - 0.4)
        loss = f(sigma) * torch.distributions.Exponential(1.0).sample((512,))  # mean f(sigma), heavy spread
        u = head(sigma.log() / 4)
        opt.zero_grad()
        (loss / u.exp() + u).mean().backward()
        opt.step()
    probe = torch.tensor([0.1, 0.5, 1.0, 3.0])
    with torch.no_grad():
        u = head.eval()(probe.log() / 4)
    assert torch.allclose(u, f(probe).log(), atol=0.15), (u, f(probe).log())


def overrides(steps):
    return TOY_TEACHER + ["edm.logvar_channels=16", f"train.steps={steps}", "train.log_every=2",
                          "train.checkpoint_every=4", "train.batch_size=64", "eval.num_samples=64",
                          "eval.batch_size=64"]


def test_a_run_trains_logs_resumes_and_exports_the_denoiser_alone(tmp_path):
    preset = str(CONFIGS / "toy2d" / "edm.yaml")
    train(load_config(preset, overrides(8)), str(tmp_path / "full"), **QUIET)
    train(load_config(preset, overrides(4)), str(tmp_path / "split"), **QUIET)
    train(load_config(preset, overrides(8)), str(tmp_path / "split"), **QUIET)  # resumed from step 4
    train(load_config(preset, overrides(8) + ["edm.logvar_channels=0"]), str(tmp_path / "plain"), **QUIET)

    rows = [json.loads(line) for line in (tmp_path / "full" / "stats.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["edm/logvar"]) for r in rows) and rows[0]["edm/logvar"] != rows[-1]["edm/logvar"]
    full, split, plain = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("full", "split", "plain"))
    assert full.keys() == plain.keys() and not any("logvar" in k for k in full)  # the export: the denoiser only
    assert all(torch.equal(full[k], split[k]) for k in full)  # resumed exactly, log-variance head included
    assert any(not torch.equal(full[k], plain[k]) for k in full)  # the weighting changed the training
    state = load_checkpoint(latest_checkpoint(str(tmp_path / "full")))["method"]["denoiser"]["module"]
    assert any(k.startswith("logvar.") for k in state)  # trained with the denoiser, checkpointed with it


def test_the_key_is_validated():
    with pytest.raises(ConfigError, match="edm.logvar_channels"):
        load_config(str(CONFIGS / "toy2d" / "edm.yaml"), ["edm.logvar_channels=-1"])
