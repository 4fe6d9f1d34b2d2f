#!/usr/bin/env bash
# SFT with LoRA, then DPO on the SFT output, then TriviaQA evaluation of both.
#
#   bash examples/sft_then_dpo.sh                          # on a GPU: Llama 3.2 1B Instruct, full TriviaQA
#   MODEL=models/tiny-llama DATA=triviaqa-sample MAX_STEPS=10 bash examples/sft_then_dpo.sh   # offline smoke run
#
# DPO starts from the SFT adapter: the policy is the SFT model and so is DPO's frozen reference.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-meta-llama/Llama-3.2-1B-Instruct}
DATA=${DATA:-triviaqa}
OUT=${OUT:-outputs/sft-then-dpo}
MAX_STEPS=${MAX_STEPS:--1}          # -1: train for the epochs below
PRECISION=${PRECISION---use_bfloat16 True}   # PRECISION="" for the CPU
REPORT_TO=${REPORT_TO:-none}

python lora.py \
    --model_id "$MODEL" --dataset_name "$DATA" --dataset_split "train[:20000]" \
    --output_dir "$OUT/sft" --overwrite_output_dir True $PRECISION \
    --num_train_epochs 1 --max_steps "$MAX_STEPS" --per_device_train_batch_size 16 \
    --learning_rate 2e-4 --lora_r 16 --lora_alpha 32 --save_strategy no --report_to "$REPORT_TO"

python dpo.py \
    --model_id "$OUT/sft" --dataset_name "$DATA" --dataset_split "train[:5000]" \
    --output_dir "$OUT/dpo" --overwrite_output_dir True $PRECISION \
    --rejected_source model --beta 0.1 --loss_type sigmoid --max_prompt_length 128 --max_length 256 \
    --num_train_epochs 1 --max_steps "$MAX_STEPS" --per_device_train_batch_size 8 \
    --learning_rate 5e-5 --save_strategy no --report_to "$REPORT_TO"

for stage in sft dpo; do
    python evaluate.py --model_id "$OUT/$stage" --dataset_name "$DATA" --dataset_split validation \
        --max_samples 1000 --batch_size 32 --output_dir "$OUT/$stage/eval"
done
