#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (a few minutes on a recent GPU): the gpu-marked
# tests (4-bit on CUDA, bf16, the T4 fp16 path), then lora.py and qlora.py against plain TRL, the
# padding-free and Liger variants where flash-attn / liger-kernel are installed, and PPO.
#
#     bash bench/gpu_check.sh [RESULTS_DIR]        # default: outputs/gpu_check
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-outputs/gpu_check}
mkdir -p "$results"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/gpu.txt"
python -c "import torch, transformers, trl, peft, bitsandbytes as b; print(torch.__version__, torch.version.cuda, \
transformers.__version__, trl.__version__, peft.__version__, b.__version__)" | tee -a "$results/gpu.txt"

status=0
python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$results/gpu_tests.log" || status=1
bench() {  # name, then bench_sft flags
    local name=$1; shift
    python -m bench.bench_sft --output "$results/$name.json" "$@" >"$results/$name.log" 2>&1 || status=1
    tail -n 8 "$results/$name.log"
}
bench sft_lora
bench sft_qlora --technique qlora
if python -c "import flash_attn" 2>/dev/null; then
    bench sft_lora_padding_free --ours_flags "--padding_free True --attn_implementation flash_attention_2"
else
    echo "flash-attn not installed: padding-free variant skipped"
fi
if python -c "import liger_kernel" 2>/dev/null; then
    bench sft_lora_liger --ours_flags "--use_liger_kernel True"
else
    echo "liger-kernel not installed: Liger variant skipped"
fi
python -m bench.bench_ppo --output "$results/ppo.json" >"$results/ppo.log" 2>&1 || status=1
tail -n 8 "$results/ppo.log"
exit $status
