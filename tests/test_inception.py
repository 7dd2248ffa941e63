"""FID InceptionV3: architecture, names and loading. No real weights exist here, so the network is tested
with random weights; that the real pt_inception-2015-12-05 file loads is only checked by names and shapes."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastonestep.data.errors import DataError
from fastonestep.eval import save_stats
from fastonestep.eval.inception import (
    FIDInceptionV3, InceptionA, InceptionE, fid_from_images, inception_features, load_inception, preprocess,
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-init state dict saved as .pth, with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


@pytest.fixture(scope="module")
def model(weights):
    return load_inception(weights[0])


def test_torchvision_style_names(weights):
    keys = set(weights[1])
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_mean", "Conv2d_4a_3x3.bn.bias",
                "Mixed_5b.branch_pool.conv.weight", "Mixed_5d.branch5x5_2.conv.weight",
                "Mixed_6a.branch3x3dbl_3.bn.weight", "Mixed_6e.branch7x7dbl_5.conv.weight",
                "Mixed_7a.branch7x7x3_4.conv.weight", "Mixed_7b.branch3x3_2a.bn.num_batches_tracked",
                "Mixed_7c.branch3x3dbl_3b.bn.running_var", "fc.weight", "fc.bias"):
        assert key in keys, key
    assert not any(k.startswith("AuxLogits") for k in keys)
    assert weights[1]["fc.weight"].shape == (1008, 2048)
    assert weights[1]["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert weights[1]["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert weights[1]["Mixed_6e.branch7x7_2.conv.weight"].shape == (192, 192, 1, 7)


def test_parameter_count():
    model = FIDInceptionV3()
    total = sum(p.numel() for p in model.parameters())
    fc = 2048 * 1008 + 1008
    assert total == 23_850_960
    # torchvision's inception_v3 (with AuxLogits, 1000 classes) publishes 27,161,264 parameters: the same
    # backbone, plus AuxLogits (conv 768->128 1x1 + BN, conv 128->768 5x5 + BN, fc 768->1000) and fc 2048->1000.
    aux = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
    assert total - fc + aux + (2048 * 1000 + 1000) == 27_161_264
    assert all(m.eps == 0.001 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_load_round_trip_and_features(weights, model):
    path, state = weights
    assert not model.training and model.fc_loaded
    assert not any(p.requires_grad for p in model.parameters())
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    torch.manual_seed(1)
    gray = torch.rand(2, 1, 32, 32) * 2 - 1
    feats = inception_features(model, gray, batch_size=1)
    assert feats.shape == (2, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    # 1 channel is repeated to 3 and batching does not change the result
    rgb_feats = inception_features(model, gray.repeat(1, 3, 1, 1), batch_size=2)
    assert rgb_feats.shape == (2, 2048)
    np.testing.assert_allclose(rgb_feats, feats, rtol=1e-4, atol=1e-6)


def test_preprocess():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    out = preprocess(x, quantize=False)
    assert out.shape == (1, 3, 299, 299)
    assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6  # 2.0 clamped to 1
    same_size = preprocess(torch.full((1, 3, 299, 299), 0.5), quantize=False)
    assert torch.allclose(same_size, torch.full_like(same_size, 0.5))  # [-1,1] -> [0,1] -> [-1,1] round trip
    # quantised to 8 bits: 0.0 -> round(127.5) = 128 -> 128/255*2-1
    q = preprocess(torch.zeros(1, 3, 299, 299))
    assert torch.allclose(q, torch.full_like(q, 128 / 255 * 2 - 1), atol=1e-6)
    # uint8 in [0, 255]
    u = preprocess(torch.full((1, 3, 299, 299), 255, dtype=torch.uint8))
    assert torch.allclose(u, torch.ones_like(u))
    # exact resize: bilinear, align_corners=False, on [0, 1]
    img = torch.rand(1, 3, 8, 8)
    expect = F.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    assert torch.allclose(preprocess(img * 2 - 1, quantize=False), expect, atol=1e-6)


def test_fid_specific_pooling():
    model = FIDInceptionV3()
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"
    torch.manual_seed(0)
    # InceptionA: average pool excludes the padding from the count
    block = InceptionA(8, pool_features=4).eval()
    x = torch.randn(1, 8, 5, 5)
    seen = {}
    block.branch_pool.register_forward_hook(lambda m, inp, out: seen.update(pooled=inp[0]))
    assert block(x).shape == (1, 64 + 64 + 96 + 4, 5, 5)
    no_pad = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert torch.allclose(seen["pooled"], no_pad)
    assert not torch.allclose(seen["pooled"], F.avg_pool2d(x, 3, stride=1, padding=1))
    # InceptionE: "max" pools by max, "avg" by average without the padding
    for pool in ("max", "avg"):
        block = InceptionE(16, pool=pool).eval()
        x = torch.randn(1, 16, 4, 4)
        seen = {}
        block.branch_pool.register_forward_hook(lambda m, inp, out: seen.update(pooled=inp[0]))
        out = block(x)
        assert out.shape == (1, 2048, 4, 4)
        reference = (F.max_pool2d(x, 3, stride=1, padding=1) if pool == "max"
                     else F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        assert torch.allclose(seen["pooled"], reference)
    with pytest.raises(ValueError):
        InceptionE(16, pool="sum")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_inception(missing)


def test_unreadable_file(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.pth"):
        load_inception(junk)
    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(b"not safetensors either")
    with pytest.raises(DataError, match="junk.safetensors"):
        load_inception(junk_st)


def test_wrong_keys(tmp_path, weights):
    state = dict(weights[1])
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="wrong.pth") as info:
        load_inception(path)
    message = str(info.value)
    assert "missing keys: Mixed_7c.branch_pool.conv.weight" in message
    assert "unexpected keys: AuxLogits.fc.weight" in message
    # right names, wrong shape
    state = dict(weights[1])
    state["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 1, 3, 3)
    torch.save(state, path)
    with pytest.raises(ValueError, match="Conv2d_1a_3x3.conv.weight"):
        load_inception(path)


def test_fc_optional_safetensors_and_wrapped_names(tmp_path, weights):
    from safetensors.torch import save_file

    state = {k: v for k, v in weights[1].items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    path = tmp_path / "nofc.safetensors"
    save_file(state, str(path))
    model = load_inception(path)
    assert not model.fc_loaded
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, weights[1]["Mixed_7c.branch_pool.conv.weight"])
    # the FID port's wrapper naming (blocks.<i>.<j>.*) inside {'state_dict': ...}
    wrapped = {k.replace("Conv2d_1a_3x3.", "blocks.0.0.").replace("Mixed_7c.", "blocks.3.2."): v
               for k, v in state.items()}
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": wrapped}, path)
    with pytest.raises(DataError):  # mixed naming is not a wrapper state dict
        load_inception(path)
    names = {"Conv2d_1a_3x3": "blocks.0.0", "Conv2d_2a_3x3": "blocks.0.1", "Conv2d_2b_3x3": "blocks.0.2",
             "Conv2d_3b_1x1": "blocks.1.0", "Conv2d_4a_3x3": "blocks.1.1"}
    names.update({f"Mixed_{b}": f"blocks.2.{i}" for i, b in enumerate(["5b", "5c", "5d", "6a", "6b", "6c", "6d",
                                                                       "6e"])})
    names.update({f"Mixed_{b}": f"blocks.3.{i}" for i, b in enumerate(["7a", "7b", "7c"])})
    wrapped = {names[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in state.items()}
    torch.save({"state_dict": wrapped}, path)
    model = load_inception(path)
    key = "Mixed_6c.branch7x7dbl_4.bn.running_var"
    assert torch.equal(model.state_dict()[key], weights[1][key])


def test_fid_from_images(tmp_path, weights, model, monkeypatch):
    # frechet_distance itself is tested in test_eval; on 2048-d features its eigendecompositions take far
    # too long for this suite on a shared CPU, so record its arguments instead of running it.
    import fastonestep.eval.inception as inception

    calls = []
    monkeypatch.setattr(inception, "frechet_distance", lambda *args: calls.append(args) or 1.5)
    torch.manual_seed(2)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    feats = inception_features(model, images)
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    stats = tmp_path / "ref.npz"
    save_stats(str(stats), mu, sigma)
    assert fid_from_images(images, str(stats), model=model) == 1.5
    for got, want in zip(calls[-1], (mu, sigma, mu, sigma)):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    other = torch.rand(2, 1, 16, 16) * 2 - 1
    assert fid_from_images(other, images, weights_path=weights[0]) == 1.5  # loads the file, reference images
    other_mu, other_sigma, ref_mu, ref_sigma = calls[-1]
    assert other_mu.shape == (2048,) and other_sigma.shape == (2048, 2048)
    assert not np.allclose(other_mu, mu)
    np.testing.assert_allclose(ref_mu, mu, rtol=1e-6, atol=1e-12)  # reference images -> the same stats
    np.testing.assert_allclose(ref_sigma, sigma, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="weights_path"):
        fid_from_images(images, str(stats))
    with pytest.raises(ValueError, match="C in"):
        inception_features(model, torch.zeros(2, 2, 8, 8))
