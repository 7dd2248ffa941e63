"""config key 'student_dropout': networks a distillation run trains take it in place of the teacher's dropout
(generator, DMD's fake score, the ratio encoder), the exported architecture records it, and the teacher stays
in eval mode. Also: a run saved before a config key existed resumes when the key is at its default."""
import pytest
import torch
import yaml

from conftest import CONFIGS
from fastonestep.config import ConfigError, load_config, to_dict
from fastonestep.engine.export import read_info
from fastonestep.engine.loop import _check_same_run, build, model_info, train

TINY = ["data.size=64", "network.channels=8", "network.channel_mult=[1,2]", "train.batch_size=8",
        "train.steps=1", "eval.num_samples=8", "eval.batch_size=8", "diffusion.sample_steps=2"]
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def dropout_teacher(tmp_path_factory, cache_dir):
    """A tiny MNIST UNet teacher trained with dropout 0.5."""
    run = tmp_path_factory.mktemp("dropout_teacher")
    train(load_config(str(CONFIGS / "mnist" / "teacher.yaml"), TINY + ["network.dropout=0.5", "optim.warmup_steps=0"]), str(run), **QUIET)
    assert read_info(str(run / "model.safetensors"))["network"]["arch"]["dropout"] == 0.5
    return run


def is_stochastic(fn, x) -> bool:
    torch.manual_seed(0)
    a = fn(x)
    torch.manual_seed(1)
    return not torch.equal(a, fn(x))


def trained_networks(method):
    nets = {"generator": method.generator}
    if hasattr(method, "ratio"):
        nets["ratio"] = method.ratio
    if hasattr(method, "critic"):
        nets["fake_score"] = method.critic["score"]
    return nets


@pytest.mark.parametrize("preset", ["diffratio", "dmd"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_trained_networks_use_student_dropout(dropout_teacher, preset, dropout):
    cfg = load_config(str(CONFIGS / "mnist" / f"{preset}.yaml"),
                      TINY + [f"teacher={dropout_teacher}", f"student_dropout={dropout}"])
    dataset, method = build(cfg)
    x = torch.randn(4, *dataset.shape)
    sigma = torch.full((4,), 0.5)
    nets = trained_networks(method)
    assert len(nets) == 2
    with torch.no_grad():  # the exported teacher is its EMA of one step: the layers after dropout are still 0
        for net in [*nets.values(), getattr(method, "teacher", torch.nn.Identity())]:
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
    for name, net in nets.items():
        assert net.training, name
        with torch.no_grad():
            assert is_stochastic(lambda v: net(v, sigma), x) == (dropout > 0), name
    if hasattr(method, "teacher"):  # frozen teacher: eval mode, deterministic whatever the student does
        with torch.no_grad():
            assert not is_stochastic(lambda v: method.teacher(v, sigma), x)
    info = model_info(cfg, method, dataset)
    assert info["network"]["arch"]["dropout"] == dropout


def test_student_dropout_is_validated():
    with pytest.raises(ConfigError, match="student_dropout"):
        load_config(str(CONFIGS / "mnist" / "diffratio.yaml"), ["student_dropout=1.0"])


def test_a_run_saved_before_a_key_existed_resumes_at_its_default(tmp_path):
    cfg = load_config(str(CONFIGS / "toy2d" / "edm.yaml"))
    saved = to_dict(cfg)
    del saved["student_dropout"]  # as written by a version without the key
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    _check_same_run(cfg, str(tmp_path))
    changed = load_config(str(CONFIGS / "toy2d" / "edm.yaml"), ["student_dropout=0.2"])
    with pytest.raises(ConfigError, match="student_dropout"):
        _check_same_run(changed, str(tmp_path))


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))])
def test_resume_with_dropout_equals_the_uninterrupted_run(dropout_teacher, tmp_path, device):
    """Dropout masks come from torch's default generator of the device (on a GPU: the CUDA one), which the
    checkpoint must carry: a resumed run otherwise replays the masks of its first steps."""
    from safetensors.torch import load_file

    def run(name, steps):
        cfg = load_config(str(CONFIGS / "mnist" / "diffratio.yaml"),
                          TINY + [f"teacher={dropout_teacher}", "student_dropout=0.5", f"train.device={device}",
                                  f"train.steps={steps}", "train.checkpoint_every=2", "eval.teacher_fd=false"])
        train(cfg, str(tmp_path / name), **QUIET)
        return load_file(str(tmp_path / name / "model.safetensors"))

    full = run("full", 4)
    run("split", 2)
    split = run("split", 4)
    assert full.keys() == split.keys()
    for k in full:
        assert torch.equal(full[k], split[k]), k
