#!/usr/bin/env bash
# On a GPU machine without network (the lab's device tool; run from the repository root, with
# .wheels/ from benchmarks/fetch_gpu_wheels.sh carried along): install what the machine lacks,
# offline, unless it is already there, then run one part of the GPU checks. Each part fits in
# the device tool's 10-minute limit per call:
#   bash benchmarks/gpu_run.sh tests     # the GPU tests (graph = eager step, no host sync)
#   bash benchmarks/gpu_run.sh divo      # divo vs td3bc: every mode, 8 stacked seeds
#   bash benchmarks/gpu_run.sh recipes   # every benchmarked recipe, none and graph
#   bash benchmarks/gpu_run.sh default   # every benchmarked recipe, none and default
# Results go to $OUT (default benchmarks/results) as gpu-<part>.json / gpu-tests.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:?usage: gpu_run.sh tests|divo|recipes|default}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"

if ! python -c "import divo, torchrl, minari, hydra" 2>/dev/null; then
    pip install -q --no-index --no-deps --no-build-isolation .wheels/*
    pip install -q --no-deps --no-build-isolation -e .
fi
python -c "import torch, sys; print('torch', torch.__version__); sys.exit(not torch.cuda.is_available())" \
    || { echo "gpu_run.sh: no CUDA device on this machine" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

case "$part" in
    tests)
        python -m pytest -q -m gpu -x tests/test_step.py 2>&1 | tee "$out/gpu-tests.txt"
        ;;
    divo)
        python benchmarks/bench_step.py --device cuda --recipes divo \
            --modes none graph graph-eager --seeds 8 --steps 2000 --warmup 100 \
            --json "$out/gpu-divo.json"
        ;;
    recipes | default)
        modes=(none graph)
        [[ "$part" == default ]] && modes=(none default)
        python benchmarks/bench_step.py --device cuda --modes "${modes[@]}" \
            --steps 1000 --warmup 50 --json "$out/gpu-$part.json"
        ;;
    *)
        echo "unknown part $part: tests, divo, recipes or default" >&2
        exit 2
        ;;
esac
