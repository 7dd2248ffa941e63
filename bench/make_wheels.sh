#!/usr/bin/env bash
# Rebuilds .whl/ (git-ignored): the Python 3.12 wheels that bench/use_carried_wheels.sh unpacks on a GPU machine that
# lacks them. deepspeed ships only an sdist, so its wheel is built here (pure Python, no ops prebuilt); the rest
# are downloaded as manylinux / pure wheels for CPython 3.12. Run from the repository root with network access.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
mkdir -p .whl
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 psutil==7.2.2 py-cpuinfo==9.0.0 pydantic==2.14.3 \
  pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
  tqdm==4.70.1 PyYAML==6.0.3 safetensors==0.8.0 pillow==13.0.0 mlxtend==0.25.0
ls .whl
