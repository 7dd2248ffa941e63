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
