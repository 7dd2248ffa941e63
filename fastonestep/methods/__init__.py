"""Training methods, one module each. A method owns its networks, optimisers, EMA and RNG and says which
network trains on which loss in each phase of its `step`."""
from fastonestep.config import ConfigError
from fastonestep.eval.features import check_eval_settings
from fastonestep.methods.backward import BackwardDistillation
from fastonestep.methods.base import Method
from fastonestep.methods.diffratio import DiffRatio
from fastonestep.methods.dmd import DMD
from fastonestep.methods.dpdmd import DPDMD
from fastonestep.methods.edm import EDMPretrain
from fastonestep.networks.checkpointing import checkpointable_blocks

METHODS = {"edm": EDMPretrain, "diffratio": DiffRatio, "dmd": DMD, "dpdmd": DPDMD,
           "backward": BackwardDistillation}


def make_method(cfg, dataset, device, backend=None) -> Method:
    """`backend` (fastonestep.engine.distributed): None = the single-process backend."""
    check_eval_settings(cfg.eval, dataset.shape, dataset=dataset)  # before training, not after it
    method = _construct(cfg, dataset, device, backend)
    trained = method.backend.trainables
    if cfg.train.activation_checkpointing and not any(checkpointable_blocks(t.network) for t in trained.values()):
        raise nothing_to_checkpoint(list(trained))
    return method


def nothing_to_checkpoint(trained: list[str]) -> ConfigError:
    """The error for train.activation_checkpointing on networks without residual blocks (training and dry run)."""
    return ConfigError("config key 'train.activation_checkpointing' is true, but no network this run trains "
                       f"({', '.join(trained)}) has residual blocks to checkpoint (only the unet and edm2 kinds do)")


def _construct(cfg, dataset, device, backend) -> Method:
    cls = METHODS[cfg.method]
    if cls.supports_distributed:
        return cls(cfg, dataset, device, backend=backend)
    kind = cfg.distributed.backend
    if kind != "single" or (backend is not None and backend.world_size > 1):
        raise ConfigError(f"method '{cfg.method}' does not support distributed.backend='{kind}' yet")
    if cfg.train.batch_per_gpu and cfg.train.batch_per_gpu != cfg.train.batch_size:
        raise ConfigError(f"method '{cfg.method}' does not support gradient accumulation "
                          "(config key 'train.batch_per_gpu') yet")
    return cls(cfg, dataset, device)
