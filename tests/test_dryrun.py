"""`fastonestep train PRESET --dry-run` (engine/dryrun.py): meta-device parameter counts of the ImageNet-512
presets against EDM2's published sizes, without data or teacher; the ZeRO memory formula; the activation trace."""
import pytest
import torch

from fastonestep.cli import main
from fastonestep.config import ConfigError, load_config
from fastonestep.engine import dryrun
from fastonestep.networks.edm2 import EDM2_PUBLISHED_PARAMS

from conftest import CONFIGS

PRESETS = {"edm2_xs": "xs", "edm2_s": "s", "edm2_m": "m", "diffratio_dijs_s": "s", "diffratio_dijs_m": "m",
           "dmd2_s": "s", "dmd2_m": "m"}


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """Overrides pointing data and teacher at paths that do not exist, and a dataset factory that fails."""
    def refuse(*args, **kwargs):
        raise AssertionError("the dry run must not load data")

    import fastonestep.data as data
    import fastonestep.engine.loop as loop

    for module in (data, loop):
        for name in ("make_dataset", "open_dataset"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)
    return [f"data.path={tmp_path / 'no-latents'}", f"teacher={tmp_path / 'no-teacher'}"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_imagenet512_presets_match_edm2_sizes_without_data(preset, no_data):
    cfg = load_config(str(CONFIGS / "imagenet512" / f"{preset}.yaml"), no_data if preset != "edm2_s" else no_data[:1])
    lines = []
    result = dryrun.dry_run(cfg, gpus=8, activations=False, out=lines.append)
    published = EDM2_PUBLISHED_PARAMS[PRESETS[preset]]
    nets = result["networks"]
    main_net = nets["denoiser" if cfg.method == "edm" else "generator"]["parameters"]
    assert abs(main_net / published - 1) < 0.05, main_net
    if cfg.method == "diffratio":
        assert nets["teacher"]["parameters"] == main_net and nets["teacher"]["role"] == "init-only"
        assert nets["ratio"]["parameters"] < 0.4 * main_net
    if cfg.method == "dmd":
        head = nets["fake_score"]["parameters"] - main_net  # the DMD2 GAN head (gan_weight > 0)
        assert 0 < head < 0.01 * main_net
        assert nets["teacher"]["role"] == "frozen"
    text = "\n".join(lines)
    assert f"method: {cfg.method}" in text and "ZeRO 3" in text and "W+(G+O+EMA)/N" in text


def test_cli_dry_run_prints_config_counts_and_memory(no_data, capsys):
    rc = main(["train", str(CONFIGS / "imagenet512" / "diffratio_dijs_s.yaml"), *no_data, "--dry-run", "--gpus",
               "8", "--no-activations"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "method: diffratio" in out and "sigma_g: 2.5" in out  # the resolved YAML
    assert "280,212,709 parameters" in out  # the EDM2-S generator
    assert "ZeRO 0" in out and "activations not estimated" in out


def test_memory_formula_stage0_vs_stage3_on_8_gpus(no_data):
    cfg = load_config(str(CONFIGS / "imagenet512" / "edm2_s.yaml"), no_data[:1])
    result = dryrun.dry_run(cfg, gpus=8, stages=(0, 1, 2, 3), activations=False, out=lambda *_: None)
    p = result["networks"]["denoiser"]["parameters"]
    assert result["precision"] == "bf16"
    mem = {s: result["memory"][s]["denoiser"] for s in range(4)}
    # the preset's EMA and its 2 post-hoc power EMAs (train.ema_stds): fp32, 4 bytes each
    assert result["networks"]["denoiser"]["posthoc_emas"] == 2
    e = 3 * 4
    # stage 0 (ddp, fp32 states): 4 + 4 + 8, plus the fp32 EMAs
    assert mem[0]["total"] == (4 + 4 + 8 + e) * p
    # deepspeed bf16: weights 2, optimizer 12 (fp32 master + m + v), gradients accumulated in fp32 (stage 1:
    # the bf16 gradients and a whole fp32 buffer, 2 + 4; stages 2-3: 4, sharded), sharded progressively over 8
    # and the fp32 EMAs sharded like the master weights
    assert mem[1]["total"] == pytest.approx((2 + 6 + (12 + e) / 8) * p)
    assert mem[2]["total"] == pytest.approx((2 + (4 + 12 + e) / 8) * p)
    assert mem[3]["total"] == pytest.approx((2 + 4 + 12 + e) / 8 * p)
    assert mem[0]["ema"] == e * p and mem[3]["ema"] == pytest.approx(e * p / 8)
    simulating = load_config(str(CONFIGS / "imagenet512" / "dmd2_s.yaml"), no_data[:1] + [
        "method=backward", "backward.trajectory_net=ema"])
    result = dryrun.dry_run(simulating, gpus=8, stages=(3,), activations=False, out=lambda *_: None)
    generator = result["memory"][3]["generator"]
    assert generator["ema"] == 4 * result["networks"]["generator"]["parameters"]  # used whole every step
    fp32 = dryrun.state_bytes(dryrun.NetworkPlan("x", torch.nn.Linear(10, 10), "trainable"), "fp32", 4, 3)
    assert fp32["total"] == (4 + 4 + 8) * 110 / 4
    frozen = dryrun.state_bytes(dryrun.NetworkPlan("t", torch.nn.Linear(10, 10), "frozen"), "bf16", 8, 3)
    assert frozen == {"weights": 440, "grads": 0, "optimizer": 0, "ema": 0, "total": 440}


def test_meta_activation_trace_equals_a_real_cpu_trace():
    """The saved-for-backward bytes traced on meta equal those of a real forward on CPU (tiny EDM2 net)."""
    cfg = load_config(None, ["network.kind=edm2", "network.channels=16", "network.channel_mult=[1,2]",
                             "network.num_blocks=1", "network.attn_resolutions=[4]", "data.kind=latent",
                             "data.path=x", "data.shape=[4,8,8]", "data.class_conditional=true",
                             "data.num_classes=3"])
    plans, facts = dryrun.plan_networks(cfg)
    (plan,) = plans
    meta = [dryrun.saved_activation_bytes(plan, (4, 8, 8), 3, b) for b in (1, 2, 5)]
    assert meta[2] - meta[0] == 4 * (meta[1] - meta[0]) > 0  # linear in the batch

    from fastonestep.networks import build_denoiser

    torch.manual_seed(0)
    net = build_denoiser("edm2", (4, 8, 8), 3, channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages, keep = {}, []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
            keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(torch.randn(2, 4, 8, 8, requires_grad=True), torch.ones(2), torch.zeros(2, dtype=torch.long))
    assert sum(storages.values()) == meta[1]

    est = dryrun.activation_estimate(cfg, plans, facts, micro_batch=10, precision="fp32")
    a = est["per_network"]["denoiser"]
    assert a["per_sample"] == meta[1] - meta[0] and est["peak"] == 10 * a["per_sample"] + a["per_forward"]


def test_dry_run_needs_the_data_shape_for_latents():
    cfg = load_config(None, ["data.kind=latent", "data.path=x", "network.kind=edm2", "network.size=xs"])
    with pytest.raises(ConfigError, match="data.shape"):
        dryrun.dry_run(cfg, out=lambda *_: None)
    cfg = load_config(None, ["data.kind=latent", "data.path=x", "data.shape=[4,8,8]", "data.class_conditional=true",
                             "network.kind=edm2", "network.size=xs"])
    with pytest.raises(ConfigError, match="data.num_classes"):
        dryrun.dry_run(cfg, out=lambda *_: None)
