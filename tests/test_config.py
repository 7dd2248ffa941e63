"""Config loading: presets, inheritance, overrides, and errors that name the key."""
import pytest

from fastonestep.config import ConfigError, load_config
from conftest import CONFIGS


def test_preset_inheritance_and_overrides():
    cfg = load_config(str(CONFIGS / "toy2d" / "diffratio.yaml"), ["train.steps=7", "diffratio.divergence=rkl",
                                                                   "optim.lr=1"])
    assert cfg.method == "diffratio" and cfg.network.kind == "mlp"  # inherited from edm.yaml
    assert cfg.train.steps == 7 and cfg.diffratio.divergence == "rkl"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # ints are accepted for floats


@pytest.mark.parametrize("override, match", [
    (["train.stepz=3"], "unknown config key 'train.stepz' \\(did you mean 'train.steps'\\?\\)"),
    (["train.steps=abc"], "config key 'train.steps' expects int"),
    (["train.steps=1.5"], "config key 'train.steps' expects int"),
    (["diffratio.divergence=kl"], "'diffratio.divergence' must be one of rkl, dijs, fkl, hellinger"),
    (["train.batch_size=0"], "'train.batch_size' must be positive"),
    (["diffratio.logit_clamp=-1"], "'diffratio.logit_clamp' must be positive"),
    (["teacher="], "set config key 'teacher'"),
    (["trainsteps"], "must look like key=value"),
    (["train=3"], "config section 'train' must be a mapping"),
    (["eval.inception=/no/such/pt_inception.pth"], "config key 'eval.inception': file '/no/such/pt_inception.pth'"),
    (["diffusion.schedule=vp"], "'diffusion.schedule' = 'vp': training runs in EDM"),  # not silently ignored
    (["diffusion.schedule=flow"], "'diffusion.schedule' = 'flow': training runs in EDM"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(str(CONFIGS / "toy2d" / "diffratio.yaml"), override)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
