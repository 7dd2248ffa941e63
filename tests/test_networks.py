"""Networks: the UNet, its encoder half reused by the ratio network, RatioPrecond, and the factories."""
import pytest
import torch

from fastonestep.diffusion import EDMPrecond
from fastonestep.networks import (
    MLP,
    EncoderRatioNet,
    RatioPrecond,
    UNet,
    build_denoiser,
    build_ratio,
    count_parameters,
)

# A toy size that still has two levels, attention and class labels, for the tests that run many forwards.
TINY = dict(img_channels=1, resolution=8, channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,))


def randomize_zero_init(module: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised layers make an untrained network's output (and its input gradient) exactly 0;
    give them small random values so the tests see a non-trivial function."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0.0, 0.2)
    return module


def inputs(batch, channels=1, resolution=8, dtype=torch.float32):
    return torch.randn(batch, channels, resolution, resolution, dtype=dtype), torch.linspace(-1.5, 1.0, batch)


# ---------------------------------------------------------------- UNet


def test_unet_shapes_size_and_zero_output_at_init():
    unet = UNet(img_channels=1, resolution=32, channels=32, channel_mult=(1, 2, 2), num_blocks=1)
    x, c_noise = inputs(2, resolution=32)
    out = unet(x, c_noise)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not out.any()  # zero-initialised output conv: EDMPrecond starts as D = c_skip * x
    assert unet.bottleneck_channels == 64
    h, emb = unet.encode(x, c_noise)
    assert h.shape == (2, 64, 8, 8) and emb.shape == (2, 128)
    print(f"\nUNet(1x32x32, channels=32, channel_mult=(1, 2, 2), num_blocks=1): {count_parameters(unet):,} parameters")

    rgb28 = UNet(img_channels=3, resolution=28, channels=8, channel_mult=(1, 2, 2), attn_resolutions=(14,))
    x28, c28 = inputs(2, channels=3, resolution=28)
    assert randomize_zero_init(rgb28)(x28, c28).shape == (2, 3, 28, 28)
    with pytest.raises(ValueError, match="divisible"):
        UNet(resolution=30, channel_mult=(1, 2, 2))


def test_unet_class_conditioning():
    unet = randomize_zero_init(UNet(num_classes=3, **TINY)).eval()
    x, c_noise = inputs(1)
    x, c_noise = x.expand(3, -1, -1, -1), c_noise.expand(3)
    per_class = unet(x, c_noise, torch.tensor([0, 1, 2]))
    assert not torch.allclose(per_class[0], per_class[1]) and not torch.allclose(per_class[1], per_class[2])
    # labels=None is the zero class embedding.
    unconditional = unet(x, c_noise)
    torch.nn.init.zeros_(unet.encoder.embed.label_embed.weight)
    torch.testing.assert_close(unet(x, c_noise, torch.tensor([0, 1, 2])), unconditional)


def test_unet_depends_on_noise_level():
    unet = randomize_zero_init(UNet(**TINY))
    x, _ = inputs(1)
    out = unet(x.expand(2, -1, -1, -1), torch.tensor([-1.0, 0.5]))
    assert not torch.allclose(out[0], out[1])


def test_decoder_consumes_the_bottleneck_that_encode_returns():
    unet = randomize_zero_init(UNet(**TINY))
    seen = {}
    unet.up[0].register_forward_pre_hook(lambda module, args: seen.update(h=args[0]))
    x, c_noise = inputs(2)
    unet(x, c_noise)
    h, _ = unet.encode(x, c_noise)
    torch.testing.assert_close(seen["h"][:, : unet.bottleneck_channels], h, rtol=0, atol=0)


# ---------------------------------------------------------------- ratio network


def test_ratio_net_from_unet_reuses_exactly_the_encoder():
    unet = randomize_zero_init(UNet(num_classes=2, **TINY))
    ratio = EncoderRatioNet.from_unet(unet, init_weights=True)
    x, c_noise = inputs(3)
    labels = torch.tensor([0, 1, 1])
    h_unet, emb_unet = unet.encode(x, c_noise, labels)
    h_ratio, emb_ratio, _ = ratio.encoder(x, c_noise, labels)
    torch.testing.assert_close(h_ratio, h_unet, rtol=0, atol=0)
    torch.testing.assert_close(emb_ratio, emb_unet, rtol=0, atol=0)

    logits = ratio(x, c_noise, labels)
    assert logits.shape == (3,) and not logits.any()  # zero-initialised head: r = p/q starts at 1

    fresh = EncoderRatioNet.from_unet(unet, init_weights=False)
    assert not torch.equal(fresh.encoder(x, c_noise, labels)[0], h_unet)
    assert not any(name.startswith("up.") for name, _ in ratio.named_parameters())


def test_ratio_net_is_lighter_than_the_unet():
    unet = UNet(img_channels=1, resolution=32, channels=32, channel_mult=(1, 2, 2), num_blocks=1)
    ratio = EncoderRatioNet.from_unet(unet)
    n_unet, n_ratio = count_parameters(unet), count_parameters(ratio)
    print(f"\nUNet {n_unet:,} parameters; its encoder ratio network {n_ratio:,} ({n_ratio / n_unet:.0%})")
    assert n_ratio < 0.5 * n_unet
    assert count_parameters(EncoderRatioNet.from_unet(unet, head_channels=16)) < n_ratio


def test_ratio_precond_input_gradient_matches_finite_differences():
    net = randomize_zero_init(EncoderRatioNet(num_classes=2, head_channels=8, **TINY)).double()
    ratio = RatioPrecond(net, sigma_data=0.5)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    sigma, labels = torch.tensor([0.3, 4.0]), torch.tensor([1, 0])
    assert torch.autograd.gradcheck(lambda x: ratio(x, sigma, labels), (x,), eps=1e-6, atol=1e-5)
    (grad,) = torch.autograd.grad(ratio(x, sigma, labels).sum(), x)
    assert grad.abs().sum() > 0


def test_ratio_precond_sigma_forms_and_dtype():
    ratio = RatioPrecond(randomize_zero_init(EncoderRatioNet(**TINY)))
    x, _ = inputs(3)
    by_float = ratio(x, 0.7)
    assert by_float.shape == (3,) and by_float.dtype == torch.float32
    torch.testing.assert_close(ratio(x, torch.tensor(0.7)), by_float)
    torch.testing.assert_close(ratio(x, torch.full((3,), 0.7)), by_float)
    # The raw net sees c_in * x and ln(sigma) / 4.
    c_in = 1 / (0.7**2 + 0.5**2) ** 0.5
    torch.testing.assert_close(ratio.net(c_in * x, torch.full((3,), 0.7).log() / 4), by_float)


def test_ratio_precond_wraps_an_mlp():
    ratio = RatioPrecond(MLP(dim=2, hidden=16, depth=1, emb_dim=8, out_dim=1, zero_init_output=True))
    x = torch.randn(5, 2, requires_grad=True)
    logits = ratio(x, torch.rand(5) + 0.1)
    assert logits.shape == (5,) and not logits.any()
    (grad,) = torch.autograd.grad(logits.sum(), x)
    assert grad.shape == x.shape


# ---------------------------------------------------------------- factories


def test_build_denoiser_kinds():
    mlp = build_denoiser("mlp", (2,), hidden=16, depth=1, emb_dim=8)
    assert isinstance(mlp, EDMPrecond) and isinstance(mlp.net, MLP)
    assert mlp(torch.randn(4, 2), 1.0).shape == (4, 2)
    unet = build_denoiser("unet", (1, 8, 8), num_classes=2, sigma_data=0.6, channels=8, channel_mult=[1, 2],
                          attn_resolutions=[8], dropout=0.1)
    assert isinstance(unet.net, UNet) and unet.sigma_data == 0.6
    assert unet.net.config["channel_mult"] == (1, 2)  # YAML lists are normalised
    assert unet(torch.randn(2, 1, 8, 8), 1.0, torch.tensor([0, 1])).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("build,kind,shape,key", [
    (build_denoiser, "unet", (1, 8, 8), "hidden"),
    (build_denoiser, "mlp", (2,), "channels"),
    (build_ratio, "mlp", (2,), "head_channels"),
    (build_ratio, "encoder", (1, 8, 8), "chanels"),
])
def test_build_rejects_unknown_arch_keys(build, kind, shape, key):
    with pytest.raises(ValueError, match=rf"{key}.*{kind}"):
        build(kind, shape, **{key: 4})


def test_build_rejects_bad_kinds_and_shapes():
    with pytest.raises(ValueError, match="kind"):
        build_denoiser("transformer", (1, 8, 8))
    with pytest.raises(ValueError, match="kind"):
        build_ratio("unet", (1, 8, 8))
    with pytest.raises(ValueError, match="square"):
        build_denoiser("unet", (1, 8, 16))
    with pytest.raises(ValueError, match=r"\(D,\)"):
        build_ratio("mlp", (1, 8, 8))


def test_build_ratio_from_a_denoiser():
    denoiser = build_denoiser("unet", (1, 8, 8), channels=8, channel_mult=(1, 2), attn_resolutions=(8,))
    randomize_zero_init(denoiser)
    # Unspecified architecture keys default to the denoiser's; its encoder weights are copied.
    ratio = build_ratio("encoder", (1, 8, 8), init_from=denoiser, head_channels=4, dropout=0.1)
    assert isinstance(ratio, RatioPrecond) and isinstance(ratio.net, EncoderRatioNet)
    for name, value in denoiser.net.encoder.state_dict().items():
        assert torch.equal(ratio.net.encoder.state_dict()[name], value)
    assert count_parameters(ratio) < count_parameters(denoiser)

    with pytest.raises(ValueError, match="channels"):
        build_ratio("encoder", (1, 8, 8), init_from=denoiser, channels=16)
    with pytest.raises(ValueError, match="num_classes"):
        build_ratio("encoder", (1, 8, 8), num_classes=10, init_from=denoiser)
    with pytest.raises(ValueError, match="init_from"):
        build_ratio("mlp", (2,), init_from=denoiser)
    with pytest.raises(TypeError):
        build_ratio("encoder", (1, 8, 8), init_from=build_denoiser("mlp", (2,)))

    mlp_ratio = build_ratio("mlp", (2,), hidden=16, depth=1)
    assert isinstance(mlp_ratio.net, MLP) and mlp_ratio.net.out_dim == 1
    assert not mlp_ratio(torch.randn(3, 2), 1.0).any()


def test_count_parameters():
    net = MLP(dim=2, hidden=4, depth=1, emb_dim=2, out_dim=1)
    total = sum(p.numel() for p in net.parameters())
    assert count_parameters(net) == total
    net.out.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == total - (4 + 1)
    assert count_parameters(net) == total
