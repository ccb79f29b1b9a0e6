#!/usr/bin/env bash
# The GPU step of issues 4 and 10, prepared for a session lent a device machine (not yet run:
# no GPU has been lent to this project). Mistral-7B's shape and tokenizer with random weights,
# the published 50 x 3 cycle through the project's path, in 4-bit NF4 and in bf16; JSON figures
# (stage seconds, decode tokens/s at 150 rows, peak GPU memory) land in $OUT.
#
# The device image has PyTorch but no bitsandbytes, an older transformers, and Python 3.12.
# Here, once, in the repository's root (about 58 MB, under the 64 MiB a call carries):
#   echo /.whl/ >> .git/info/exclude && mkdir -p .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl bitsandbytes==0.50.2 transformers==5.23.0 peft==0.21.2
#   cp .venv/mistral-common/mistral_common/data/tokenizer.model.v1 .whl/
# Then the device tool: run(command="bash bench/gpu_bench.sh", carry=[".whl"], timeout_s=560).
# Each benchmark builds a 14.5 GB model on the GPU and writes it to disk first (about a minute).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site MISTRAL_V1_TOKENIZER="$PWD/.whl/tokenizer.model.v1" PYTHONUNBUFFERED=1
out="${OUT:-output}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)"
for quantize in 4bit none; do
    timeout 250 python3 bench/bench_cycle.py --random-config mistral-7b --quantize "$quantize" --skip-published \
        --out "$out/bench_gpu_$quantize.json" 2>&1 | tee "$out/bench_gpu_$quantize.log"
done
