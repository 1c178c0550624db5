#!/usr/bin/env bash
# What the GPU machine checks: bf16 training of every method on CUDA, then the step-time benchmark
# on a 1B Llama shape. Usage (repo root, CUDA machine): bash benchmarks/gpu_check.sh OUT_DIR
set -euo pipefail
out=${1:-runs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
for method in lora fossil mos; do
  extra=""
  [ "$method" = mos ] && extra="--set adapter.rank=4 --set adapter.equivalent_rank=4"
  python3 -m shardtune train recipes/tiny.yaml --set adapter.method=$method $extra \
    --set train.precision=bf16 --set model.dtype=bfloat16 --set output.dir="$out/tiny-$method" --json -q
done
python3 benchmarks/step_time.py --shape 1b --device cuda --dtype bf16 --batch 8 --seq 1024 --rank 16 \
  --rounds 5 --steps 3 --json "$out/step_time-cuda-1b.json"
python3 benchmarks/step_time.py --shape smollm2-135m --device cuda --dtype bf16 --batch 16 --seq 512 --rank 16 \
  --rounds 5 --steps 5 --json "$out/step_time-cuda-smollm2-135m.json"
