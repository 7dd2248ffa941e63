import os

# Triton kernels run in the interpreter on CPU CI; this must be set before any @triton.jit is executed.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A per-session cache (MNIST feature classifier, the JIT-built op), so tests never touch ~/.cache.
    FASTONESTEP_TEST_CACHE names one to share instead: bench/run_gpu.sh lets its later phases reuse the op
    the tests built, rather than build it again under their time limit."""
    shared = os.environ.get("FASTONESTEP_TEST_CACHE")
    path = Path(shared) if shared else tmp_path_factory.mktemp("fastonestep-cache")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["FASTONESTEP_CACHE"] = str(path)
    return path


# Tiny tensors dominate the suite: one intra-op thread is faster and keeps runs deterministic.
torch.set_num_threads(1)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TOY_TEACHER = [
    "data.size=4096", "network.hidden=64", "network.depth=2", "network.emb_dim=32", "train.batch_size=256",
    "train.log_every=10", "train.checkpoint_every=1000", "eval.num_samples=1000", "eval.batch_size=1000",
    "diffusion.sample_steps=16", "train.ema_halflife_kimg=5",
]
TOY_STUDENT = TOY_TEACHER + ["diffratio.ratio_net.hidden=64", "diffratio.ratio_net.depth=2", "eval.teacher_fd=false"]


@pytest.fixture(scope="session")
def toy_teacher(tmp_path_factory):
    """A small EDM teacher on the 25-Gaussian grid, trained once per session."""
    from fastonestep.config import load_config
    from fastonestep.engine.loop import train

    run = tmp_path_factory.mktemp("toy-teacher")
    train(load_config(str(CONFIGS / "toy2d" / "edm.yaml"), TOY_TEACHER + ["train.steps=400"]), str(run), progress=False,
          log=lambda *_: None)
    return run

# A tiny MNIST UNet (8 channels, 32 -> 16 px, attention at 16 px) and its run settings.
MNIST_TINY = ["data.size=64", "network.channels=8", "network.channel_mult=[1,2]", "network.attn_resolutions=[16]",
              "train.batch_size=8", "eval.num_samples=8", "eval.batch_size=8", "eval.grid=2",
              "diffusion.sample_steps=2", "eval.teacher_fd=false", "optim.warmup_steps=0"]


@pytest.fixture(scope="session")
def mnist_teacher(tmp_path_factory, cache_dir):
    """A tiny MNIST UNet teacher (3 EDM steps: every layer has moved off its zero initialisation)."""
    from fastonestep.config import load_config
    from fastonestep.engine.loop import train

    run = tmp_path_factory.mktemp("mnist-teacher")
    train(load_config(str(CONFIGS / "mnist" / "teacher.yaml"), MNIST_TINY + ["train.steps=3"]), str(run),
          progress=False, log=lambda *_: None)
    return run


def save_tiny_vae(path: str) -> str:
    """A tiny random diffusers AutoencoderKL saved to `path`: 4 latent channels, one downsampling (8x8 images ->
    4 x 4x4 latents). The latent tests' stand-in for a real VAE."""
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(path)
    return path


def stand_in_inception_features(x):
    """3 numbers per image: mean, std and first element (numpy, float64)."""
    flat = x.flatten(1).double()
    return torch.stack([flat.mean(1), flat.std(1), flat[:, 0]], 1).numpy()


def use_stand_in_inception(monkeypatch) -> list:
    """Replaces the Inception feature map by 3 numbers per image (mean, std, first pixel); returns the list of the
    image batches it was given, for tests to check what reached it."""
    from fastonestep.eval import features

    seen = []

    def fake_inception(x):
        seen.append(x)
        return stand_in_inception_features(x)

    real_make = features.make_features
    monkeypatch.setattr(features, "make_features", lambda kind, shape, inception="", device=None: (
        features.FeatureExtractor("inception", fake_inception, 3, key=("inception", "w.pth"))
        if kind == "inception" else real_make(kind, shape, inception, device)))
    return seen
