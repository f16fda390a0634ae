#!/usr/bin/env bash
# Download into .whl/ the wheels the CUDA tier (tests/gpu) and bench/optimizers.py need on a
# GPU machine that has no package index: it has Python 3.12 with torch, Triton, numpy,
# scikit-learn, httpx and tqdm, but not pytest or pydantic. Run this from anywhere in the
# repository on a machine that reaches PyPI; then follow tests/gpu/README.md there.
#
# All pure Python but pydantic-core (built for CPython 3.12, manylinux x86-64). The versions
# are those `make install` puts in .venv, so the GPU machine tests what the CPU suite does.
set -euo pipefail
cd "$(dirname "$0")/../.."

WHEELS=(
    # pytest and what it imports
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0
    pytest-timeout==2.4.0 # pyproject.toml's `timeout` setting
    # pydantic (workers.spec, optimizers.spec)
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0
    # bench/optimizers.py's peer Adan; it needs only torch and numpy
    pytorch-optimizer==4.1.0
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
    manylinux1_x86_64)

mkdir -p .whl
rm -f .whl/*.whl # one version of each: pip refuses two of one name in one install
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d .whl "${WHEELS[@]}"
ls .whl
du -sh .whl
