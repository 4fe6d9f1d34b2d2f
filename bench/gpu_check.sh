#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (a few minutes on a recent GPU): the gpu-marked
# tests (4-bit on CUDA, bf16, the T4 fp16 path), then lora.py and qlora.py against plain TRL, the
# padding-free and Liger variants where flash-attn / liger-kernel are installed, our LM head and
# LoRA dropout against the library paths they replace (bench/bench_gpu_paths.py), PPO, and a short
# QLoRA training under FSDP (configs/accelerate/fsdp.yaml).
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
# Our LM head and LoRA dropout against TRL's head and PEFT's dropout on a ~1B-parameter random model
# (completion-only and full-sequence loss): the CUDA defaults await this measurement.
python -m bench.bench_gpu_paths --output "$results/gpu_paths.json" 2>&1 | tee "$results/gpu_paths.log" || status=1
python -m bench.bench_ppo --output "$results/ppo.json" >"$results/ppo.log" 2>&1 || status=1
tail -n 8 "$results/ppo.log"

# QLoRA under FSDP, trained for real with the shipped config (one process per GPU; the CPU tests in
# tests/test_fsdp.py only check that FSDP wraps the model): a tiny local model, bf16, a few steps.
tiny="$results/tiny-llama"
[ -d "$tiny" ] || python -m common.model.tiny_model --output_dir "$tiny" >/dev/null
gpus=$(nvidia-smi -L | wc -l)
rm -rf "$results/qlora_fsdp"
if accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes "$gpus" qlora.py --model_id "$tiny" \
        --dataset_name triviaqa-sample --use_bfloat16 True --max_steps 6 --per_device_train_batch_size 4 \
        --logging_steps 1 --save_strategy no --report_to none --output_dir "$results/qlora_fsdp" \
        >"$results/qlora_fsdp.log" 2>&1 \
    && python -c "import sys; from common.recipe.outputs import is_finished_run; sys.exit(not is_finished_run(sys.argv[1]))" \
        "$results/qlora_fsdp"; then
    echo "QLoRA under FSDP ($gpus GPU(s)): trained and saved"
else
    echo "QLoRA under FSDP ($gpus GPU(s)): FAILED, see $results/qlora_fsdp.log"; tail -n 20 "$results/qlora_fsdp.log"
    status=1
fi
exit $status
