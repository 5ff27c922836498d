#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels the package needs beyond what a GPU machine
# without network already holds (torch, numpy, h5py, tqdm, cloudpickle, ...), into .wheels/
# (git-ignored), for Python 3.12 (the GPU image's; PYVER=3.11 for another) on x86-64 Linux. Then,
# on the GPU machine (with the lab's device tool: carry .wheels), from the repo root:
#   bash benchmarks/gpu_run.sh tests    (and divo, recipes, default: see that script)
# which installs them offline and runs one part of the GPU checks per call.
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
