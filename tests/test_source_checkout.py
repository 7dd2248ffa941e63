"""A source checkout runs without being installed (PYTHONPATH=<checkout>), which is how bench/run_step_gpu.sh uses
it on a GPU machine: the top-level kernels/ folder must import as fastonestep.kernels (never as `kernels`)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
# Import as a bare checkout on PYTHONPATH does: without the finder of this venv's editable install.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import torch
from fastonestep import losses
from fastonestep.kernels import reference, triton_losses
x, real, fake = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
assert torch.equal(losses.dmd_loss(x, real, fake, impl="torch"), reference.dmd_loss(x, real, fake))
assert "kernels" not in sys.modules
print(reference.__file__)
print(triton_losses.__name__)
"""


def test_checkout_on_pythonpath_imports_the_kernels(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path, name = proc.stdout.split()
    assert Path(path) == ROOT / "kernels" / "reference.py"
    assert name == "fastonestep.kernels.triton_losses"
