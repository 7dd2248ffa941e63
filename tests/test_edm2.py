"""The EDM2-style magnitude-preserving UNet (networks/edm2.py): MP primitives, forced weight normalisation,
shapes, conditioning, EDM2's published sizes, export round trip, and its DiffRatio ratio network."""
import math
from types import SimpleNamespace

import pytest
import torch

from fastonestep.config import NetworkConfig
from fastonestep.diffusion import EDMPrecond
from fastonestep.engine.export import export_model, load_model, network_spec
from fastonestep.networks import EDM2EncoderRatioNet, EDM2UNet, RatioPrecond, build_denoiser, build_ratio
from fastonestep.networks.build import count_parameters, set_dropout
from fastonestep.networks.edm2 import (EDM2_PUBLISHED_PARAMS, EDM2_SIZES, MPConv, MPFourier, mp_cat, mp_silu,
                                       mp_sum, normalized_layers, restore_normalized_layers)

# Two levels, attention at 4x4, classes: every kind of block, cheap enough for many forwards.
TINY = dict(img_channels=4, resolution=8, channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))


def rms(x: torch.Tensor) -> float:
    return x.float().square().mean().sqrt().item()


def wake_gains(module: torch.nn.Module, value: float = 1.0) -> torch.nn.Module:
    """The scalar gains start at 0 (output and embedding modulation); set them so the net is non-trivial."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gain"):
                p.fill_(value)
    return module


def test_mp_primitives_preserve_unit_magnitude():
    x, y = torch.randn(2, 200_000)
    assert abs(rms(mp_silu(x)) - 1) < 0.01
    assert rms(torch.nn.functional.silu(x)) < 0.61  # what mp_silu corrects
    for t in (0.3, 0.5):
        assert abs(rms(mp_sum(x, y, t)) - 1) < 0.01
    a, b = torch.randn(64, 16, 100), torch.randn(64, 48, 100)
    cat = mp_cat(a, b, t=0.3)
    assert cat.shape == (64, 64, 100) and abs(rms(cat) - 1) < 0.01
    # Each part's share of the energy is set by t, not by its channel count.
    share_a = cat[:, :16].square().sum() / cat.square().sum()
    assert abs(share_a.item() - 0.7**2 / (0.7**2 + 0.3**2)) < 0.01

    conv = MPConv(32, 64, (3, 3))
    out = conv(torch.randn(8, 32, 24, 24))
    assert abs(rms(out[:, :, 1:-1, 1:-1]) - 1) < 0.05  # interior: no zero padding in the receptive field
    assert abs(rms(MPConv(300, 200)(torch.randn(500, 300))) - 1) < 0.05
    assert abs(rms(MPFourier(256)(torch.linspace(-2, 2, 400))) - 1) < 0.05


def test_network_activations_stay_near_unit_magnitude_at_init():
    net = EDM2UNet(num_classes=10, **TINY)
    seen = {}
    blocks = list(net.encoder.enc) + list(net.dec)
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, rms(out)))
    x = torch.randn(32, 4, 8, 8)
    out = net(x, torch.randn(32) * 0.5, torch.randint(0, 10, (32,)))
    assert not out.any()  # output gain 0: F = 0 and EDMPrecond starts as D = c_skip * x
    assert len(seen) == len(blocks)
    assert all(0.6 < v < 1.3 for v in seen.values()), seen
    # Forty times the input: pixel norm brings the encoder straight back (the decoder still sees the input
    # conv's skip at 40x; EDMPrecond's c_in is what keeps real inputs at unit variance).
    seen.clear()
    net(40 * x, torch.zeros(32))
    assert all(0.6 < seen[i] < 1.3 for i in range(len(net.encoder.enc))), seen


def test_forced_weight_normalisation_survives_optimizer_steps():
    conv = MPConv(6, 5, (3, 3))
    fan_in = 6 * 9
    opt = torch.optim.SGD(conv.parameters(), lr=200.0)
    x = torch.randn(4, 6, 8, 8)
    for _ in range(3):
        conv(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        row_norms = conv.weight.detach().flatten(1).norm(dim=1)
        assert (row_norms - math.sqrt(fan_in)).abs().max() > 0.1  # the step moved the rows off the sphere
        conv(x)  # a training-mode forward puts them back
        torch.testing.assert_close(conv.weight.detach().flatten(1).norm(dim=1),
                                   torch.full((5,), math.sqrt(fan_in)), rtol=1e-4, atol=0)

    # The layer's function does not depend on the stored scale; eval mode leaves the stored weight alone.
    conv.eval()
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(3.0)
    torch.testing.assert_close(conv(x), before, rtol=1e-3, atol=1e-4)  # up to the eps of the normalisation
    assert conv.weight.detach().flatten(1).norm(dim=1).min() > 2.9 * math.sqrt(fan_in)

    # Several training forwards before one backward: the in-place rescale must not break the saved graph.
    conv.train()
    (conv(x).sum() + conv(x).square().sum()).backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_a_checkpointed_rescaled_weight_is_not_rescaled_again_after_loading():
    """The rescale is not idempotent bit for bit, so whether a stored weight is already rescaled is training state:
    normalized_layers records it with the weights, restore_normalized_layers puts it back after a load (which moves
    the version counters), and the next training forward then does what it would have done without the round trip."""
    make = lambda: torch.nn.Sequential(MPConv(8, 16, (3, 3)), MPConv(16, 4, (1, 1))).train()  # noqa: E731
    x = torch.randn(2, 8, 4, 4)
    a = make()
    a[1](a[0](x))  # rescales both
    with torch.no_grad():
        a[1].weight.add_(0.1)  # an update: layer 1 rescales at its next forward
    assert normalized_layers(a) == ["0"]
    saved, names = {k: v.clone() for k, v in a.state_dict().items()}, normalized_layers(a)

    resumed, forgetful = make(), make()
    for net in (resumed, forgetful):
        net.load_state_dict(saved)
    restore_normalized_layers(resumed, names)
    assert normalized_layers(resumed) == ["0"] and normalized_layers(forgetful) == []
    for net in (a, resumed, forgetful):
        net[1](net[0](x))
    for k, v in a.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert not torch.equal(forgetful[0].weight, a[0].weight)  # rescaled twice: off in the last bits
    with pytest.raises(ValueError, match="does not have"):
        restore_normalized_layers(resumed, ["2"])


def test_shapes_and_encoder_output():
    net = wake_gains(EDM2UNet(num_classes=3, **TINY))
    x, c = torch.randn(2, 4, 8, 8), torch.tensor([-1.0, 0.5])
    out = net(x, c, torch.tensor([0, 2]))
    assert out.shape == x.shape and out.dtype == x.dtype and out.abs().sum() > 0
    h, emb, skips = net.encoder(x, c, torch.tensor([0, 2]))
    assert h.shape == (2, 32, 4, 4) and emb.shape == (2, 32) and len(skips) == 4
    assert net.features(x, c).shape == (2, net.feature_dim) == (2, 32)
    same_x = net(x[:1].expand(2, -1, -1, -1), c)
    assert not torch.allclose(same_x[0], same_x[1])  # the noise level matters
    with pytest.raises(ValueError, match="divisible"):
        EDM2UNet(resolution=12, channels=8, channel_mult=(1, 2, 3, 4))


def test_class_labels_change_the_output():
    net = wake_gains(EDM2UNet(num_classes=5, **TINY)).eval()
    x, c = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1), torch.full((3,), 0.2)
    per_class = net(x, c, torch.tensor([0, 1, 4]))
    assert not torch.allclose(per_class[0], per_class[1]) and not torch.allclose(per_class[1], per_class[2])
    # Ids and one-hot vectors are the same input; no labels is the zero label vector.
    torch.testing.assert_close(net(x, c, torch.eye(5)[[0, 1, 4]]), per_class)
    torch.testing.assert_close(net(x, c), net(x, c, torch.zeros(3, 5)))
    with pytest.raises(ValueError, match="class labels"):
        net(x, c, torch.zeros(3, 4))


@pytest.mark.parametrize("size", ["xs", "s", "m"])
def test_parameter_counts_match_edm2(size):
    """Class-conditional ImageNet-512 latents, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        net = build_denoiser("edm2", (4, 64, 64), num_classes=1000, size=size, channel_mult=[1, 2, 3, 4],
                             num_blocks=3, attn_resolutions=[16, 8])
    assert net.net.encoder.config["channels"] == EDM2_SIZES[size]
    n = count_parameters(net)
    assert abs(n / EDM2_PUBLISHED_PARAMS[size] - 1) < 0.05, n


def test_network_spec_resolves_size_and_rejects_a_conflict():
    spec = network_spec(NetworkConfig(kind="edm2", size="xs", channel_mult=[1, 2, 3, 4], num_blocks=3))
    assert spec == {"kind": "edm2", "arch": {"size": "xs", "channels": 128, "channel_mult": [1, 2, 3, 4],
                                             "num_blocks": 3, "attn_resolutions": [], "dropout": 0.0}}
    assert network_spec(NetworkConfig(kind="edm2", size="", channels=24))["arch"]["channels"] == 24
    with pytest.raises(ValueError, match="network.size"):
        network_spec(NetworkConfig(kind="edm2", size="s", channels=64))
    with pytest.raises(ValueError, match="size"):
        build_denoiser("edm2", (4, 8, 8), size="", channels=0)
    with pytest.raises(ValueError, match="head_channels.*edm2"):
        build_denoiser("edm2", (4, 8, 8), channels=16, head_channels=4)


def test_export_load_round_trip(tmp_path):
    cfg = NetworkConfig(kind="edm2", channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    spec = network_spec(cfg)
    net = wake_gains(build_denoiser("edm2", (4, 8, 8), 3, 0.5, **spec["arch"]), 0.7)
    net(torch.randn(2, 4, 8, 8), 1.0)  # a training forward (forced normalisation) before export, as in a run
    path = str(tmp_path / "model.safetensors")
    export_model(path, net, {"network": spec, "data_shape": [4, 8, 8], "num_classes": 3, "sigma_data": 0.5})
    loaded, info = load_model(path)
    assert isinstance(loaded.net, EDM2UNet) and info["network"]["kind"] == "edm2"
    net.eval()
    x, sigma, labels = torch.randn(3, 4, 8, 8), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 1, 2])
    torch.testing.assert_close(loaded(x, sigma, labels), net(x, sigma, labels), rtol=0, atol=0)


def test_precond_forward_backward_and_one_step():
    torch.manual_seed(1)
    denoiser = build_denoiser("edm2", (4, 8, 8), num_classes=3, channels=16, channel_mult=[1, 2], num_blocks=1,
                              attn_resolutions=[4], dropout=0.1)
    assert isinstance(denoiser, EDMPrecond)
    x0, labels = torch.randn(8, 4, 8, 8) * 0.5, torch.randint(0, 3, (8,))
    sigma = torch.exp(torch.randn(8) - 0.4)
    x_t = x0 + sigma[:, None, None, None] * torch.randn_like(x0)
    c_skip = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(denoiser(x_t, sigma, labels), c_skip[:, None, None, None] * x_t)  # F = 0 at init

    opt = torch.optim.Adam(denoiser.parameters(), lr=1e-2)

    def loss_fn():
        weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        return (weight[:, None, None, None] * (denoiser(x_t, sigma, labels) - x0) ** 2).mean()

    loss0 = loss_fn()
    loss0.backward()
    grads = {n: p.grad for n, p in denoiser.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    assert grads["net.out_gain"].abs() > 0  # the only path out of F = 0
    opt.step()
    opt.zero_grad()
    loss1 = loss_fn()
    loss1.backward()
    assert loss1 < loss0
    assert sum(int(p.grad is not None and p.grad.abs().sum() > 0) for p in denoiser.parameters()) > 20


# ---------------------------------------------------------------- ratio network


def test_ratio_net_from_an_edm2_teacher():
    teacher = wake_gains(build_denoiser("edm2", (4, 8, 8), num_classes=2, channels=16, channel_mult=[1, 2],
                                        num_blocks=1, attn_resolutions=[4]))
    ratio = build_ratio("edm2_encoder", (4, 8, 8), num_classes=2, init_from=teacher, head_channels=8)
    assert isinstance(ratio, RatioPrecond) and isinstance(ratio.net, EDM2EncoderRatioNet)
    for name, value in teacher.net.encoder.state_dict().items():
        assert torch.equal(ratio.net.encoder.state_dict()[name], value)
    assert count_parameters(ratio) < 0.5 * count_parameters(teacher)

    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 1])
    logits = ratio(x, torch.tensor([0.2, 1.0, 5.0]), labels)
    assert logits.shape == (3,) and not logits.any()  # zero gain: r = 1 at init
    wake_gains(ratio.net)
    (grad,) = torch.autograd.grad(ratio(x, 1.0, labels).sum(), x)
    assert grad.abs().sum() > 0

    # Rebuilt without the teacher (as ratio.safetensors is loaded): same architecture keys, same state.
    rebuilt = build_ratio("edm2_encoder", (4, 8, 8), num_classes=2, channels=16, channel_mult=[1, 2],
                          num_blocks=1, attn_resolutions=[4], head_channels=8)
    rebuilt.load_state_dict(ratio.state_dict())
    torch.testing.assert_close(rebuilt(x, 1.0, labels), ratio(x, 1.0, labels))

    with pytest.raises(ValueError, match="channels"):
        build_ratio("edm2_encoder", (4, 8, 8), num_classes=2, init_from=teacher, channels=32)
    with pytest.raises(TypeError):
        build_ratio("edm2_encoder", (1, 8, 8), init_from=build_denoiser("unet", (1, 8, 8), channels=8))


def test_diffratio_builds_the_edm2_ratio_net_from_the_teacher():
    """DiffRatio._build_ratio with an EDM2 teacher (auto and explicit 'encoder' kinds)."""
    from fastonestep.methods.diffratio import DiffRatio

    spec = network_spec(NetworkConfig(kind="edm2", channels=16, channel_mult=[1, 2], num_blocks=1,
                                      attn_resolutions=[4]))
    teacher = wake_gains(build_denoiser("edm2", (4, 8, 8), 0, 0.5, **spec["arch"]))
    for kind in ("auto", "encoder"):
        ratio_net = SimpleNamespace(kind=kind, init="teacher", head_channels=0, hidden=8, depth=1)
        fake = SimpleNamespace(cfg=SimpleNamespace(diffratio=SimpleNamespace(ratio_net=ratio_net),
                                                   student_dropout=0.0),
                               teacher_info={"network": spec}, dataset=SimpleNamespace(shape=(4, 8, 8)),
                               num_classes=0, sigma_data=0.5)
        ratio = DiffRatio._build_ratio(fake, teacher)
        assert isinstance(ratio.net, EDM2EncoderRatioNet)
        assert torch.equal(ratio.net.encoder.conv_in.weight, teacher.net.encoder.conv_in.weight)


def test_set_dropout_reaches_every_edm2_block_and_the_architecture_record():
    """Distillation students take config key 'student_dropout' through set_dropout: EDM2 blocks keep their
    dropout as a float, not an nn.Dropout, so both kinds must be reached."""
    net = wake_gains(build_denoiser("edm2", (4, 8, 8), 0, 0.5, channels=16, channel_mult=[1, 2], num_blocks=1,
                                    attn_resolutions=[4], dropout=0.3)).train()
    x, sigma = torch.randn(2, 4, 8, 8), torch.full((2,), 0.7)

    def stochastic():
        with torch.no_grad():
            torch.manual_seed(0)
            a = net(x, sigma)
            torch.manual_seed(1)
            return not torch.equal(a, net(x, sigma))

    assert stochastic()
    set_dropout(net, 0.0)
    assert not stochastic() and net.net.config["dropout"] == 0.0
    set_dropout(net, 0.3)
    assert stochastic()
    with pytest.raises(ValueError, match="dropout"):
        set_dropout(net, 1.0)
