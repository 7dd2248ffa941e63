# Sourced by bench/run_gpu.sh and bench/run_step_gpu.sh (from the repository root, with PY set): puts the
# checkout and the Python packages the machine lacks on PYTHONPATH, with no network and no pip. The packages are
# the wheels carried in .whl/ (bash bench/make_wheels.sh; a wheel is a zip), unpacked where their top-level module
# does not import here, or where the installed distribution is older than the carried one (pydantic 2.14, which
# deepspeed imports, needs a newer typing_extensions than an image may have). Unpacked packages come first on the
# path; an installed version at least as new as the carried one is used as it is.
SITE="${TMPDIR:-/tmp}/fastonestep-bench-site"
if [ -d .whl ]; then
  "$PY" - "$SITE" <<'PYEOF'
import importlib.metadata, importlib.util, os, re, sys, zipfile
site = sys.argv[1]
module_of = {"pyyaml": "yaml", "pillow": "PIL", "py_cpuinfo": "cpuinfo"}

def release(version):  # "4.12.2" -> (4, 12, 2); a pre/post/dev suffix is ignored
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:4])

os.makedirs(site, exist_ok=True)
for wheel in sorted(os.listdir(".whl")):
    if not wheel.endswith(".whl"):
        continue
    dist, carried = wheel.split("-")[:2]
    dist = dist.lower()
    module = module_of.get(dist, dist)
    if importlib.util.find_spec(module) is None:
        why = f"no '{module}' here"
    else:
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue  # importable but not installed as a distribution (the checkout, a path entry): left as it is
        if release(installed) >= release(carried):
            continue
        why = f"{installed} installed"
    zipfile.ZipFile(os.path.join(".whl", wheel)).extractall(site)
    print(f"unpacked {wheel} ({why})")
PYEOF
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import importlib
failed = []
for module in ("torch", "yaml", "safetensors", "PIL", "numpy", "deepspeed", "mlxtend", "pytest"):
    try:  # an import, not a lookup: a package can be there and still fail to import (an old dependency)
        importlib.import_module(module)
    except Exception as error:
        failed.append(f"{module} ({type(error).__name__}: {str(error)[:120]})")
print("missing or failing:", "; ".join(failed) if failed else "nothing")
PYEOF
