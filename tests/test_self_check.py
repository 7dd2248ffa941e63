"""The first-use check of fused implementations (kernels/self_check.py, wired into fastonestep.losses): it
passes for the correct CPU paths (the C++ op, the interpreted Triton kernels), and a kernel that is wrong in
its value, only in its gradient, or that raises, is caught, reported, and replaced by the eager reference.
On CUDA it runs on every first use; here "cpu" is added to the checked devices to drive the same code."""
import pytest
import torch

from fastonestep import losses
from fastonestep.kernels import reference as ref
from fastonestep.kernels import self_check


@pytest.fixture
def checked_on_cpu(monkeypatch):
    monkeypatch.setattr(losses, "SELF_CHECK_DEVICES", {"cpu"})
    monkeypatch.setattr(losses, "_CHECKED", {})
    monkeypatch.setattr(losses, "_WARNED", set())
    monkeypatch.delenv("FASTONESTEP_IMPL", raising=False)
    monkeypatch.delenv("FASTONESTEP_SELF_CHECK", raising=False)


@pytest.mark.parametrize("impl", ["ext", "triton"])
def test_correct_fused_paths_pass(impl):
    ok, why = losses.impl_available(impl)
    if not ok:
        pytest.skip(why)
    assert self_check.run(impl, "cpu") is None


def _ext_module():
    mod, why = losses._ext_backend()
    if mod is None:
        pytest.skip(why)
    return mod


def wrong_value(x, x_real_hat, x_fake_hat):
    return 1.01 * ref.dmd_loss(x, x_real_hat, x_fake_hat)


def wrong_gradient(F, x_t, x0, sigma, sigma_data):
    """Right values, no gradient into F."""
    return ref.denoising_loss(F.detach(), x_t, x0, sigma, sigma_data) + 0 * F.flatten(1)[:, 0]


def raises(*args, **kwargs):
    raise RuntimeError("kernel launch failed")


@pytest.mark.parametrize("name, broken, expect", [("dmd_loss", wrong_value, "dmd_loss output"),
                                                  ("denoising_loss", wrong_gradient, "denoising_loss gradient"),
                                                  ("ratio_classifier_loss", raises, "kernel launch failed")])
def test_a_wrong_kernel_is_caught_and_the_reference_runs_instead(checked_on_cpu, monkeypatch, name, broken, expect):
    monkeypatch.setattr(_ext_module(), name, broken)
    with pytest.warns(RuntimeWarning, match=f"impl='ext' failed its first-use check on cpu.*{expect}"):
        ok, why = losses.impl_available("ext")
    assert not ok and expect in why
    x, real, fake = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    with pytest.warns(RuntimeWarning, match="impl='ext' is not available: its first-use check"):  # the fallback
        assert torch.equal(losses.dmd_loss(x, real, fake, impl="ext"), ref.dmd_loss(x, real, fake))
    assert losses.resolve_impl("ext") == "torch"


def test_the_check_runs_once_and_can_be_switched_off(checked_on_cpu, monkeypatch):
    calls = []
    monkeypatch.setattr(self_check, "run", lambda impl, device: calls.append(impl))
    _ext_module()
    for _ in range(3):
        assert losses.resolve_impl("ext") == "ext"
    assert calls == ["ext"]
    monkeypatch.setattr(losses, "_CHECKED", {})
    monkeypatch.setenv("FASTONESTEP_SELF_CHECK", "0")
    assert losses.resolve_impl("ext") == "ext" and calls == ["ext"]


def test_torch_compile_traces_through_an_unchecked_implementation(checked_on_cpu):
    """Dynamo cannot trace the check: under torch.compile it is left for the first eager call."""
    _ext_module()
    x, real, fake = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    compiled = torch.compile(lambda a, b, c: losses.dmd_loss(a, b, c, impl="ext"), fullgraph=True)
    torch.testing.assert_close(compiled(x, real, fake), ref.dmd_loss(x, real, fake))
    assert losses._CHECKED == {}
    assert losses.resolve_impl("ext") == "ext" and losses._CHECKED == {("ext", "cpu"): ""}


def wrong_on_large_samples(x, x_real_hat, x_fake_hat):
    """Right on samples of one Triton chunk, wrong beyond (as a bug of the multi-chunk path would be)."""
    loss = ref.dmd_loss(x, x_real_hat, x_fake_hat)
    return loss if x[0].numel() <= 4096 else 1.01 * loss


def test_the_check_covers_samples_of_several_chunks(checked_on_cpu, monkeypatch):
    monkeypatch.setattr(_ext_module(), "dmd_loss", wrong_on_large_samples)
    with pytest.warns(RuntimeWarning, match="first-use check"):
        ok, why = losses.impl_available("ext")
    assert not ok and "dmd_loss output" in why and "shape (2, 3, 41, 53)" in why


def test_a_check_that_faulted_the_device_raises_instead_of_falling_back(checked_on_cpu, monkeypatch):
    """After a device fault (CUDA: illegal address) the context refuses all work, eager included: the check says
    so and how to restart, rather than warning and letting the next unrelated operation die of the fault."""
    monkeypatch.setattr(_ext_module(), "dmd_loss", raises)
    fault = RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(losses, "_device_fault", lambda device: fault)
    with pytest.raises(RuntimeError, match="impl='ext' faulted on cpu.*kernel launch failed.*FASTONESTEP_IMPL=torch"
                       ) as raised:
        losses.impl_available("ext")
    assert raised.value.__cause__ is fault


def test_a_failed_check_without_a_device_fault_only_warns(checked_on_cpu, monkeypatch):
    monkeypatch.setattr(_ext_module(), "dmd_loss", raises)
    seen = []
    monkeypatch.setattr(losses, "_device_fault", lambda device: seen.append(device.type))
    with pytest.warns(RuntimeWarning, match="first-use check"):
        assert losses.impl_available("ext")[0] is False
    assert seen == ["cpu"]  # the device was asked
