"""fastonestep: train one-step and few-step diffusion generators (DiffRatio, DMD/DMD2, DP-DMD,
backward distillation) at full throughput. See README.md and design notes for the math."""

__version__ = "0.1.0"


def _map_source_kernels() -> None:
    """A source checkout used without installing it (PYTHONPATH=<checkout>, as on a GPU machine with nothing
    installed) has no fastonestep.kernels: the fused kernels live in the top-level kernels/ folder, which
    setup.py's package_dir maps for an install. Map it the same way here; installs (regular or editable)
    already find it, and nothing is ever registered as a top-level `kernels` module."""
    import importlib.util
    import os
    import sys

    name = __name__ + ".kernels"
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    if not os.path.isfile(os.path.join(source, "__init__.py")) or importlib.util.find_spec(name) is not None:
        return
    spec = importlib.util.spec_from_file_location(name, os.path.join(source, "__init__.py"),
                                                  submodule_search_locations=[source])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_map_source_kernels()
