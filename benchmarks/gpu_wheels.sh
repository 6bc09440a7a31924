#!/usr/bin/env bash
# benchmarks/gpu_wheels.sh [DIR]: the wheels the GPU machine lacks for `python -m benchmarks gpu`,
# into DIR (default benchmarks/wheels, git-ignored), for its Python 3.12 and without torch.
#
# The GPU machine (no network) has torch 2.11, Triton, transformers, huggingface-hub 1.33, numpy,
# pillow, regex, requests, safetensors, filelock, pyyaml, packaging, ... but neither diffusers nor
# cache-dit. Their other requirements are all there except importlib_metadata, which diffusers
# imports only on Python < 3.8 (the standard library's importlib.metadata otherwise): not carried.
# Installed there with --no-deps, so nothing else is resolved:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site DIR/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-benchmarks/wheels}"
mkdir -p "$dir"
rm -f "$dir"/*.whl

# the versions tested with torch 2.11 (duca_compile/versions.py, .ci/run) and the one cache-dit
# the peer section was written against
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d "$dir" "diffusers==0.42.0" "cache-dit==1.5.3"
# this project, as the wheel `pip install` would build (its entry point registers backend="duca");
# setuptools' build/ folder is removed again if this made it (a stale one leaks old files into wheels)
had_build=$([ -e build ] && echo 1 || true)
python3 -m pip wheel -q --no-deps -w "$dir" .
[ -n "$had_build" ] || rm -rf build

ls -l "$dir"
du -sh "$dir"
