#!/usr/bin/env bash
# Offline demo: a tiny randomly initialised Llama-style model learns the bundled TriviaQA-style
# sample with LoRA. It shows the whole pipeline in about a minute on a laptop CPU; a model this
# small memorises, it does not know trivia. For real runs use a real model (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m common.tiny_model --output_dir models/tiny-llama
python lora.py \
    --model_id models/tiny-llama \
    --dataset_name triviaqa-sample \
    --output_dir outputs/demo-lora \
    --overwrite_output_dir True \
    --num_train_epochs 4 \
    --per_device_train_batch_size 16 \
    --learning_rate 1e-2 \
    --lora_r 16 \
    --logging_steps 5 \
    --save_strategy no \
    --report_to none
