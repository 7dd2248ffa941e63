"""A training step waits for the GPU once per optimiser step and nowhere else.

That one wait is engine/distributed.py's finiteness check of the gradient norm, which must decide on the host
whether to skip a non-finite update. Any other host synchronisation stalls the CPU until the GPU has drained its
queue, so the next kernels launch late and the GPU idles; fastonestep/tensors.py says where they tend to hide.

On CPU (CI), seen through a dispatch mode: no step of any method makes a tensor out of Python data
(aten.lift_fresh: torch.tensor(2.5), torch.as_tensor([..]); on a GPU a blocking host-to-device copy), and it reads
values back (.item(), float(), nonzero) once per optimiser step, plus the known waits listed below. On a GPU: the
synchronisations themselves, counted with torch.cuda.set_sync_debug_mode("warn").
"""
import collections
import traceback
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import CONFIGS, TOY_STUDENT, TOY_TEACHER
from fastonestep import losses
from fastonestep.config import load_config
from fastonestep.data.loaders import make_loader
from fastonestep.engine.loop import build

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisations are a CUDA matter")


# What, on a GPU, makes the host wait: a tensor made from Python data (aten.lift_fresh, then a blocking copy) and
# a value read back (.item() / float() / bool(), nonzero, equal).
MADE = (torch.ops.aten.lift_fresh.default,)
READ = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
        torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default, torch.ops.aten.masked_select.default)
# Boolean-mask indexing (x[mask]) runs nonzero inside the op on a GPU: the output size is data-dependent.
INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)


def _reads_back(func, args) -> bool:
    if func in READ:
        return True
    if func in INDEXING:
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False


class HostWork(TorchDispatchMode):
    """Records MADE and READ ops by the project line behind them. Reads inside torch.optim are left out: Adam
    reads its step counters, which live on the CPU even when the parameters are on a GPU."""

    def __init__(self):
        super().__init__()
        self.made, self.reads = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MADE or _reads_back(func, args):
            stack = traceback.extract_stack()
            ours = [f for f in stack if "/fastonestep/" in f.filename or "/kernels/" in f.filename]
            where = f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "outside fastonestep"
            if func in MADE:
                self.made[where] += 1
            elif not any("/torch/optim/" in f.filename for f in stack):
                self.reads[where] += 1
        return func(*args, **(kwargs or {}))


def toy_method(preset, teacher, *extra):
    base = TOY_TEACHER if preset == "edm.yaml" else TOY_STUDENT + [f"teacher={teacher}"]
    cfg = load_config(str(CONFIGS / "toy2d" / preset), base + ["train.batch_size=64", *extra])
    dataset, method = build(cfg)
    return method, make_loader(cfg, dataset, method.device)


@pytest.mark.parametrize("preset, extra, optimiser_steps, known_reads", [
    ("edm.yaml", [], 1, 0),
    ("edm.yaml", ["edm.logvar_channels=16"], 1, 0),
    ("diffratio.yaml", [], 3, 0),  # the toy preset's 2 ratio updates
    ("diffratio.yaml", ["diffratio.realisation=logit", "diffratio.ratio_steps=1"], 2, 0),
    ("diffratio.yaml", ["train.kernels=fused"], 3, 0),
    ("dmd.yaml", [], 2, 0),
    ("dmd2.yaml", [], 6, 0),  # 5 fake-score updates
    ("dpdmd.yaml", [], 2, 0),
    ("backward.yaml", [], 1, 0),
    # The known waits (README, "Host synchronisations"): a multi-level DMD student reads back the level it
    # draws on the device (for the fake-score and the generator update); backward distillation with a
    # multi-step teacher ODE groups the batch by level.
    ("dmd.yaml", ["dmd.student_sigmas=[40.0, 1.0]"], 2, 2),
    ("backward.yaml", ["backward.teacher_steps=2"], 1, 2),
])
def test_a_training_step_reads_back_once_per_optimiser_step(toy_teacher, preset, extra, optimiser_steps,
                                                          known_reads):
    method, loader = toy_method(preset, toy_teacher, *extra)
    method.step(loader.next, 0, 0)
    batches = [loader.next() for _ in range(8)]  # the loader runs on the host, outside the step's device work
    with HostWork() as work:
        method.step(iter(batches).__next__, 1, 64)
    assert not work.made, dict(work.made)
    assert sum(work.reads.values()) == optimiser_steps + known_reads, dict(work.reads)


def synchronisations(fn) -> list[str]:
    """Where `fn` synchronised with the GPU: one 'file:line: message' per synchronising call."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message)]


@cuda
@pytest.mark.parametrize("impl", ["torch", "triton", "ext"])
def test_fused_losses_never_synchronise_on_cuda(impl):
    ok, why = losses.impl_available(impl, "cuda")
    if not ok:
        pytest.skip(f"impl={impl} unavailable: {why}")
    torch.manual_seed(0)
    x = torch.randn(8, 4, 16, 16, device="cuda", requires_grad=True)
    eps, sigma = torch.randn_like(x), torch.rand(8, device="cuda") + 0.1
    logits = torch.randn(8, device="cuda", requires_grad=True)

    def losses_and_backward():
        x_t = losses.add_noise(x, 1.0, sigma, noise=eps, impl=impl)  # alpha a Python number, as every method
        loss = losses.denoising_loss(x_t, x_t.detach(), x.detach(), sigma, 0.5, impl=impl).mean()
        loss = loss + losses.dmd_loss(x, x_t.detach(), eps, impl=impl)
        loss = loss + losses.ratio_generator_loss(x, eps, logits.detach(), sigma, "dijs", impl=impl)
        loss = loss + losses.ratio_classifier_loss(logits, -logits.detach(), impl=impl)
        loss.backward()

    losses_and_backward()  # first use: JIT build / compile and the first-use check, which do synchronise
    assert synchronisations(losses_and_backward) == []


@cuda
@pytest.mark.parametrize("kernels", ["eager", "fused"])
@pytest.mark.parametrize("preset, extra, optimiser_steps", [
    ("edm.yaml", [], 1),
    ("diffratio.yaml", ["diffratio.ratio_steps=2"], 3),
    ("dmd.yaml", ["dmd.fake_steps=2"], 3),
])
def test_a_cuda_training_step_synchronises_once_per_optimiser_step(toy_teacher, preset, extra, optimiser_steps,
                                                                   kernels):
    method, loader = toy_method(preset, toy_teacher, "train.device=cuda", f"train.kernels={kernels}", *extra)
    method.step(loader.next, 0, 0)  # warm-up: first-use checks of the fused kernels, cuBLAS handles
    found = synchronisations(lambda: method.step(loader.next, 1, 64))
    assert len(found) == optimiser_steps, "\n".join(found)


def test_latent_sampling_copies_its_channel_scale_and_bias_to_the_device_once():
    """LatentSampling.next() runs every step: the per-channel scale and bias (Python lists in the config) must not
    be copied to the device each time (on a GPU, a blocking copy)."""
    from fastonestep.data.latents import LatentSampling

    class Moments:
        def next(self):
            return torch.randn(2, 8, 4, 4), None

    sampling = LatentSampling(Moments(), scale=[0.5, 0.25, 1.0, 2.0], bias=[0.1], seed=0, impl="torch")
    first, _ = sampling.next()
    with HostWork() as work:
        later, _ = sampling.next()
    assert not work.made, dict(work.made)
    assert later.shape == first.shape == (2, 4, 4, 4)
