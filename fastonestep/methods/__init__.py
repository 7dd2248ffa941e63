"""Training methods, one module each. A method owns its networks, optimisers, EMA and RNG and says which
network trains on which loss in each phase of its `step`."""
from fastonestep.methods.base import Method
from fastonestep.methods.diffratio import DiffRatio
from fastonestep.methods.edm import EDMPretrain

METHODS = {"edm": EDMPretrain, "diffratio": DiffRatio}


def make_method(cfg, dataset, device) -> Method:
    return METHODS[cfg.method](cfg, dataset, device)
