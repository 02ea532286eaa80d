#!/usr/bin/env bash
# Build .whl/ here: the Python packages the project's lent GPU machine lacks (it has torch, transformers,
# pandas, rich, matplotlib, pyyaml, pynvml, pytest; no network). DeepSpeed is an sdist on PyPI: built here
# into a pure-Python wheel (DS_BUILD_OPS=0, its ops JIT-compile there). Wheels target CPython 3.12.
# Then: the `device` tool with carry [".whl"] and `bash scripts/device-check.sh` (see that file: it installs
# them into /tmp/site as its first phase, and brings back one archive and summary.txt in $OUT); rehearse it
# here first with `bash scripts/device-check.sh --dry-run` (no GPU, no wheels needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection typing-extensions \
    submitit==1.5.4
ls -la .whl && du -sh .whl
