"""GPU only: a training step waits for the GPU once per optimiser step and nowhere else.

That one wait is engine/distributed.py's finiteness check of the gradient norm, which must decide on the host
whether to skip a non-finite update. Any other host synchronisation stalls the CPU until the GPU has drained its
queue, so the next kernels launch late and the GPU idles; fastonestep/tensors.py says where they tend to hide.
Counted with torch.cuda.set_sync_debug_mode("warn"), which reports each synchronising call.
"""
import warnings

import pytest
import torch

from conftest import CONFIGS, TOY_STUDENT, TOY_TEACHER
from fastonestep import losses
from fastonestep.config import load_config
from fastonestep.data.loaders import make_loader
from fastonestep.engine.loop import build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisations are a CUDA matter")


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


@pytest.mark.parametrize("kernels", ["eager", "fused"])
@pytest.mark.parametrize("preset, extra, optimiser_steps", [
    ("edm.yaml", [], 1),
    ("diffratio.yaml", ["diffratio.ratio_steps=2"], 3),
    ("dmd.yaml", ["dmd.fake_steps=2"], 3),
])
def test_a_cuda_training_step_synchronises_once_per_optimiser_step(toy_teacher, preset, extra, optimiser_steps,
                                                                   kernels):
    base = TOY_TEACHER if preset == "edm.yaml" else TOY_STUDENT + [f"teacher={toy_teacher}"]
    cfg = load_config(str(CONFIGS / "toy2d" / preset),
                      base + ["train.device=cuda", f"train.kernels={kernels}", "train.batch_size=64", *extra])
    dataset, method = build(cfg)
    loader = make_loader(cfg, dataset, method.device)
    method.step(loader.next, 0, 0)  # warm-up: first-use checks of the fused kernels, cuBLAS handles
    found = synchronisations(lambda: method.step(loader.next, 1, 64))
    assert len(found) == optimiser_steps, "\n".join(found)
