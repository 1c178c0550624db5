#!/usr/bin/env bash
# What the GPU machine checks, in one call, most important first; each stage has its own time limit and
# the next one runs whatever the last one did:
#   1. tests/test_cuda.py and tests/test_fused_paths.py: the fused layer under CUDA bf16 autocast, MoS's
#      per-step assembly, bf16 training runs of the CLI, and strategy: deepspeed on the GPU (ZeRO-2;
#      ZeRO-3 with offload) against a plain bf16 run;
#   2. the step-time benchmark on the 1B Llama shape (bf16 8×1024), with ablation rows and the floor;
#   3. the same on the SmolLM2-135M shape (bf16 16×512);
#   4. where the 1B step's time goes (benchmarks/profile_step.py: frozen base, LoRA, MoS);
#   5. the host time of one adapted layer (benchmarks/layer_overhead.py: what a step launches per layer);
#   6. the 1B shape with compiled decoder blocks (the frozen base compiled and eager, LoRA, MoS): about
#      3 minutes on an H200, most of it compiling (five variants did not finish in 170 s).
# Stages 1-5 take about 6 minutes on an H100 or H200. GPU_CHECK_SKIP="compiled" (names, space-separated:
# tests, 1b, smollm2, profile, overhead, compiled) leaves stages out: a lease too short for all of them.
# Usage (repo root, CUDA machine): bash benchmarks/gpu_check.sh OUT_DIR   → OUT_DIR/gpu_check.log + JSON
set -uo pipefail
out=${1:-runs/gpu}
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONUNBUFFERED=1
stage() {  # stage SECONDS NAME COMMAND...
  local seconds=$1 name=$2
  shift 2
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    echo "=== $name: skipped (GPU_CHECK_SKIP)" | tee -a "$log"
    return
  fi
  echo "=== $name ($(date +%T), limit ${seconds}s)" | tee -a "$log"
  timeout "$seconds" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} ($(date +%T))" | tee -a "$log"
}
python3 -c "import torch, transformers, peft, shardtune.training.loop; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee -a "$log" || exit 1
stage 150 tests python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_fused_paths.py
stage 170 1b python3 benchmarks/step_time.py --shape 1b --device cuda --dtype bf16 --batch 8 --seq 1024 \
  --rank 16 --rounds 5 --steps 3 --ablations --floor --only "frozen base,shardtune lora,shardtune fossil,\
shardtune mos,shardtune sharelora,peft lora,peft miss,lora (update first),lora (casts outside)" \
  --json "$out/step_time-cuda-1b.json"
stage 110 smollm2 python3 benchmarks/step_time.py --shape smollm2-135m --device cuda --dtype bf16 \
  --batch 16 --seq 512 --rank 16 --rounds 5 --steps 5 --ablations --only "frozen base,shardtune lora,\
shardtune mos,shardtune sharelora,lora (update first),mos (per-layer gather)" \
  --json "$out/step_time-cuda-smollm2-135m.json"
stage 80 profile python3 benchmarks/profile_step.py --shape 1b --device cuda --dtype bf16 --batch 8 \
  --seq 1024 --variants "frozen base,shardtune lora,shardtune mos" --top 12 --json "$out/profile_step-cuda-1b.json"
stage 40 overhead python3 benchmarks/layer_overhead.py --device cuda --reps 1000 --rounds 7 \
  --json "$out/layer_overhead-cuda.json"
stage "${COMPILE_SECONDS:-270}" compiled python3 benchmarks/step_time.py --shape 1b \
  --device cuda --dtype bf16 --batch 8 --seq 1024 --rank 16 --rounds 3 --steps 3 --compile \
  --only "frozen base,frozen base (eager),shardtune lora,shardtune mos" \
  --json "$out/step_time-cuda-1b-compiled.json"
