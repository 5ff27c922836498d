#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels the package needs beyond what a GPU machine
# without network already holds (torch, numpy, h5py, tqdm, cloudpickle, ...), into .wheels/
# (git-ignored), for Python 3.12 (the GPU image's; PYVER=3.11 for another) on x86-64 Linux. Then, on the GPU machine, from the repo root:
#   pip install --no-index --no-deps --no-build-isolation .wheels/* \
#     && pip install --no-deps --no-build-isolation -e . \
#     && python -m pytest -q -m gpu tests/test_step.py \
#     && python benchmarks/bench_step.py --device cuda --modes none default graph --seeds 8 \
#          --steps 2000 --warmup 100 --json benchmarks/results/gpu.json
# (with the lab's device tool: carry .wheels; write the JSON under $OUT to get it back).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${WHEELS_DIR:-.wheels}"
mkdir -p "$dest"
py=(--python-version "${PYVER:-3.12}" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux_2_28_x86_64 --platform any --no-deps -d "$dest")
pip download -q --only-binary=:all: "${py[@]}" -c constraints-ci.txt \
    torchrl tensordict hoptorch pyvers orjson hydra-core omegaconf minari gymnasium \
    farama-notifications einops
# antlr4 4.9.3 (omegaconf's parser runtime) exists only as a source archive
pip download -q --no-binary=:all: --no-deps -d "$dest" "antlr4-python3-runtime==4.9.3"
ls -la "$dest"
