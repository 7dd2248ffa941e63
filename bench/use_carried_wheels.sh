# Sourced by bench/run_gpu.sh and bench/run_step_gpu.sh (from the repository root, with PY set): puts the
# checkout and the Python packages the machine lacks on PYTHONPATH, with no network and no pip. The packages are
# the wheels carried in .whl/ (bash bench/make_wheels.sh; a wheel is a zip), unpacked only where their top-level
# module does not import here (installed versions win).
SITE="${TMPDIR:-/tmp}/fastonestep-bench-site"
if [ -d .whl ]; then
  "$PY" - "$SITE" <<'PYEOF'
import importlib.util, os, sys, zipfile
site = sys.argv[1]
module_of = {"pyyaml": "yaml", "pillow": "PIL", "py_cpuinfo": "cpuinfo"}
os.makedirs(site, exist_ok=True)
for wheel in sorted(os.listdir(".whl")):
    if not wheel.endswith(".whl"):
        continue
    dist = wheel.split("-")[0].lower().replace("-", "_")
    module = module_of.get(dist, dist)
    if importlib.util.find_spec(module) is None:
        zipfile.ZipFile(os.path.join(".whl", wheel)).extractall(site)
        print(f"unpacked {wheel} (no '{module}' here)")
PYEOF
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import importlib.util
wanted = ("torch", "yaml", "safetensors", "PIL", "numpy", "deepspeed", "mlxtend", "pytest")
missing = [m for m in wanted if importlib.util.find_spec(m) is None]
print("missing:", ", ".join(missing) if missing else "nothing")
PYEOF
