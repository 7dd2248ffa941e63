"""config key train.activation_checkpointing (networks/checkpointing.py): residual blocks keep only their inputs
and are recomputed in the backward.

- Nothing a run computes changes: outputs, input and parameter gradients, and the global RNG stream after the
  step (dropout masks are replayed) are bit-identical, for the UNet and the EDM2 UNet and their ratio networks;
  training runs of every method give identical stats and exports; a run may switch it on when resuming.
- It does save memory, measured on real CPU tensors: the storages still alive after a training forward (what
  autograd holds for the backward) are counted through storage weak references. The dry run's meta-device
  estimate of those bytes is checked against that measurement, with and without checkpointing.
- Networks without blocks (the 2-D MLP) refuse the key with an error naming it.
ZeRO-3 with checkpointing is in tests/test_distributed.py.
"""
import json
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import CONFIGS, MNIST_TINY, TOY_STUDENT
from fastonestep.config import ConfigError, load_config
from fastonestep.engine import dryrun
from fastonestep.engine.loop import build, train
from fastonestep.networks import checkpointing
from fastonestep.networks.build import build_denoiser, build_ratio
from fastonestep.networks.checkpointing import checkpointable_blocks, set_activation_checkpointing

QUIET = dict(progress=False, log=lambda *_: None)
SHAPE, CLASSES, BATCH = (4, 8, 8), 3, 6
ARCH = dict(channels=16, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4])


def make_net(kind: str, dropout: float = 0.0):
    """A small class-conditional denoiser ("unet", "edm2") or ratio network ("encoder", "edm2_encoder")."""
    torch.manual_seed(0)
    if kind in ("unet", "edm2"):
        net = build_denoiser(kind, SHAPE, CLASSES, **ARCH, dropout=dropout)
    else:
        net = build_ratio(kind, SHAPE, CLASSES, **ARCH, dropout=dropout)
    with torch.no_grad():  # move the zero-initialised output layers, so every block gets a gradient
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.train()


def forward_backward(net, frozen: bool):
    """Output, input gradient, parameter gradients and the next global random numbers after one step."""
    torch.manual_seed(1)
    x = torch.randn(BATCH, *SHAPE, requires_grad=True)
    sigma, labels = torch.rand(BATCH) + 0.5, torch.randint(0, CLASSES, (BATCH,))
    net.requires_grad_(not frozen)  # frozen: DiffRatio's generator step through the ratio network
    out = net(x, sigma, labels)
    (out.float() ** 2).sum().backward()
    grads = [p.grad for p in net.parameters()] if not frozen else []
    return out.detach(), x.grad, grads, torch.rand(4)


@pytest.mark.parametrize("kind,frozen", [("unet", False), ("edm2", False), ("encoder", True),
                                         ("edm2_encoder", True), ("edm2_encoder", False)])
def test_checkpointed_blocks_change_nothing_bit_for_bit(kind, frozen):
    plain, marked = make_net(kind, dropout=0.3), make_net(kind, dropout=0.3)
    assert set_activation_checkpointing(marked) > 0
    a, b = forward_backward(plain, frozen), forward_backward(marked, frozen)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(a[2]) == len(b[2]) and all(torch.equal(g, h) for g, h in zip(a[2], b[2]))
    assert any(g.abs().sum() > 0 for g in a[2][:5]) or frozen  # the early blocks really got gradients
    assert torch.equal(a[3], b[3])  # dropout masks replayed without disturbing the RNG stream
    for p, q in zip(plain.parameters(), marked.parameters()):  # EDM2's forced weight normalisation ran once
        assert torch.equal(p, q)


def test_a_no_grad_forward_is_not_checkpointed(monkeypatch):
    net = make_net("edm2")
    set_activation_checkpointing(net)
    calls = []
    monkeypatch.setattr(checkpointing, "checkpoint", lambda fn, *a, **k: calls.append(1) or fn(*a))
    with torch.no_grad():
        net(torch.randn(2, *SHAPE), torch.ones(2), torch.zeros(2, dtype=torch.long))
    assert calls == []
    net(torch.randn(2, *SHAPE), torch.ones(2), torch.zeros(2, dtype=torch.long))
    assert len(calls) == set_activation_checkpointing(net)  # every block, once


class StorageCensus(TorchDispatchMode):
    """Weak references to the storage of every tensor an op creates: after the forward, the ones still alive
    are what the graph holds for the backward (plus the output)."""

    def __init__(self):
        super().__init__()
        self.born = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                known = self.born.get(storage._cdata)
                if known is None or known[0].expired():  # an address freed and reused is a new storage
                    self.born[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def alive_bytes(self, exclude) -> int:
        return sum(n for key, (ref, n) in self.born.items() if not ref.expired() and key not in exclude)


def held_after_forward(net) -> int:
    """Bytes autograd holds after a real training forward on the CPU (the output's own storage excluded)."""
    x = torch.randn(BATCH, *SHAPE, requires_grad=True)
    sigma, labels = torch.ones(BATCH), torch.zeros(BATCH, dtype=torch.long)
    with StorageCensus() as census:
        out = net(x, sigma, labels)
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    return census.alive_bytes(params | {out.untyped_storage()._cdata})


@pytest.mark.parametrize("kind", ["unet", "edm2"])
def test_checkpointing_holds_only_block_inputs_as_the_dry_run_estimates(kind):
    cfg = load_config(None, [f"network.kind={kind}", "network.channels=16", "network.channel_mult=[1,2]",
                             "network.num_blocks=2", "network.attn_resolutions=[4]", "data.kind=latent",
                             "data.path=x", f"data.shape={list(SHAPE)}", "data.class_conditional=true",
                             f"data.num_classes={CLASSES}"])
    (plan,), _ = dryrun.plan_networks(cfg)
    measured, estimated = {}, {}
    for on in (False, True):
        net = make_net(kind)
        set_activation_checkpointing(net, on)
        measured[on] = held_after_forward(net)
        kept, largest_block = dryrun.saved_activation_parts(plan, SHAPE, CLASSES, BATCH, checkpointing=on)
        assert (largest_block > 0) == on
        estimated[on] = kept
        # the census also sees a few bytes the trace does not (e.g. the saved RNG state of a dropout-free net)
        assert measured[on] == pytest.approx(kept, rel=0.01), (on, measured[on], kept)
    assert measured[True] < measured[False] / 4


def runs_equal(a: Path, b: Path) -> None:
    timing = ("images_per_sec", "sec_per_kimg", "peak_memory_mb", "time")

    def rows(run):
        lines = (run / "stats.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]

    assert rows(a) == rows(b)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


METHODS = {  # preset -> overrides; each with dropout in the trained networks (replayed masks)
    "teacher": ["network.dropout=0.2"],
    "diffratio": ["student_dropout=0.2", "diffratio.ratio_steps=2"],
    "dmd2": ["student_dropout=0.2", "dmd.fake_steps=2", "dmd.gan_weight=0.1"],
    "backward": ["student_dropout=0.2", "backward.student_sigmas=[80,2]"],
}


@pytest.mark.parametrize("preset", list(METHODS))
def test_training_is_unchanged_and_the_key_can_change_on_resume(mnist_teacher, tmp_path, preset):
    """Two steps without checkpointing vs one step without and a resume with it: identical stats and export."""
    overrides = MNIST_TINY + METHODS[preset] + ["train.log_every=1", "train.checkpoint_every=1"]
    if preset != "teacher":
        overrides.append(f"teacher={mnist_teacher}")
    path = str(CONFIGS / "mnist" / f"{preset}.yaml")
    train(load_config(path, overrides + ["train.steps=2"]), str(tmp_path / "plain"), **QUIET)
    train(load_config(path, overrides + ["train.steps=1"]), str(tmp_path / "split"), **QUIET)
    resumed = load_config(path, overrides + ["train.steps=2", "train.activation_checkpointing=true"])
    _, method = build(resumed)
    assert any(b.activation_checkpointing for t in method.backend.trainables.values()
               for b in checkpointable_blocks(t.network))
    train(resumed, str(tmp_path / "split"), **QUIET)
    runs_equal(tmp_path / "plain", tmp_path / "split")


def test_networks_without_blocks_refuse_the_key(toy_teacher):
    cfg = load_config(str(CONFIGS / "toy2d" / "diffratio.yaml"),
                      TOY_STUDENT + [f"teacher={toy_teacher}", "train.activation_checkpointing=true"])
    with pytest.raises(ConfigError, match="train.activation_checkpointing.*generator, ratio"):
        build(cfg)
    with pytest.raises(ConfigError, match="train.activation_checkpointing.*generator, ratio"):
        dryrun.dry_run(cfg, out=lambda *_: None)  # the dry run says so too


def test_dry_run_reports_both_settings(capsys):
    cfg = load_config(str(CONFIGS / "imagenet512" / "diffratio_dijs_s.yaml"), [])
    off = dryrun.dry_run(cfg, gpus=8, out=print)
    assert "with train.activation_checkpointing=true" in capsys.readouterr().out
    on = dryrun.dry_run(load_config(str(CONFIGS / "imagenet512" / "diffratio_dijs_s.yaml"),
                                    ["train.activation_checkpointing=true"]), gpus=8, out=lambda *_: None)
    assert on["activations"]["peak"] == off["activations_other"]["peak"] < off["activations"]["peak"] / 3
    assert on["activations_other"]["peak"] == off["activations"]["peak"]


GPU_SHAPE, GPU_BATCH = (4, 32, 32), 16
GPU_ARCH = ["network.kind=edm2", "network.channels=64", "network.channel_mult=[1,2,2]", "network.num_blocks=2",
            "network.attn_resolutions=[]", "data.kind=latent", "data.path=x", f"data.shape={list(GPU_SHAPE)}",
            "data.class_conditional=true", f"data.num_classes={CLASSES}"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_checkpointing_saves_memory_as_estimated_with_the_same_gradients(dtype):
    """On CUDA: the allocator's count of what a training forward leaves allocated (fp32, or under bf16 autocast)
    with and without checkpointing, against the dry run's estimate; gradients agree (cuDNN deterministic). No
    attention: which SDPA kernel CUDA picks (and what it saves) is not what the meta trace's math kernel saves."""
    from fastonestep.networks.build import build_denoiser

    cfg = load_config(None, GPU_ARCH)
    (plan,), _ = dryrun.plan_networks(cfg)
    device = torch.device("cuda")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    held, grads = {}, {}
    for on in (False, True):
        torch.manual_seed(0)
        net = build_denoiser("edm2", GPU_SHAPE, CLASSES, channels=64, channel_mult=[1, 2, 2], num_blocks=2,
                             attn_resolutions=[]).to(device).train()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        set_activation_checkpointing(net, on)
        gen = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(GPU_BATCH, *GPU_SHAPE, device=device, generator=gen)
        sigma = torch.rand(GPU_BATCH, device=device, generator=gen) + 0.5
        labels = torch.randint(0, CLASSES, (GPU_BATCH,), device=device, generator=gen)
        net(x, sigma, labels)  # first call: EDM2's forced weight normalisation, cuDNN set-up
        net.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = net(x, sigma, labels)
        torch.cuda.synchronize()
        held[on] = torch.cuda.memory_allocated() - before - out.untyped_storage().nbytes()
        (out.float() ** 2).mean().backward()
        grads[on] = [p.grad.clone() for p in net.parameters()]
        del out, net
    assert held[True] < held[False] / 3, held
    if dtype == torch.float32:  # the estimate is an fp32 trace (bf16 autocast keeps a mix of dtypes)
        for on in (False, True):
            kept, _ = dryrun.saved_activation_parts(plan, GPU_SHAPE, CLASSES, GPU_BATCH, checkpointing=on)
            assert held[on] == pytest.approx(kept, rel=0.1), (on, held[on], kept)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(b, a, **tol)
