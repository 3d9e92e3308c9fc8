#!/usr/bin/env bash
# The CUDA checks, run on a lent GPU machine (see ../.library/device): real-size random-weight SDXL
# through lorabridge's own inference adapters (bench/infer_bench.py), torch backend, fp16, on cuda.
# That machine has no network: the pinned pure-Python packages (and tokenizers/jsonschema) travel as
# wheels in .devwheels/ (made with `pip download --no-deps --platform manylinux2014_x86_64 --python-version 3.12`).
# Usage there: bash bench/device_check.sh OUTDIR [extra infer_bench args]
set -euo pipefail
out=${1:?usage: device_check.sh OUTDIR}; shift
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m pip install -q --no-deps --no-index .devwheels/*.whl 2>&1 | grep -v "dependency conflicts\|requires\|^$" || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers, numpy; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)" | tee -a "$out/gpu.txt"
python3 bench/infer_bench.py --model sdxl --backends torch --device cuda --dtype fp16 --size 1024 \
    --steps 8 --repeats 3 --threads 0 --out "$out/RESULTS-infer-cuda.md" "$@" 2>&1 | tee "$out/infer_bench.log"
