#!/usr/bin/env bash
# Offline demo on a CPU (time measured: README.md, Quick start): a tiny randomly initialised Llama-style model
# learns the bundled TriviaQA-style sample with LoRA, then is scored like TriviaQA.
# A model this small memorises: expect exact match near 1.0 on the 300 training questions and
# near 0 on the 60 held-out ones. It shows the pipeline working, not answer quality; for real
# runs use a real model (see docs/sft.md). Gradient checkpointing is off: this model needs little memory,
# and it trains faster without (the same results: dropout is 0).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m common.model.tiny_model --output_dir models/tiny-llama --hidden_size 128
python lora.py \
    --model_id models/tiny-llama \
    --dataset_name triviaqa-sample \
    --output_dir outputs/demo-lora \
    --overwrite_output_dir True \
    --num_train_epochs 20 \
    --per_device_train_batch_size 16 \
    --learning_rate 5e-3 \
    --lr_scheduler_type cosine \
    --lora_r 32 \
    --lora_alpha 64 \
    --lora_dropout 0 \
    --gradient_checkpointing False \
    --logging_steps 10 \
    --eval_strategy epoch \
    --eval_em_samples 60 \
    --save_strategy no \
    --report_to none
python evaluate.py --model_id outputs/demo-lora --dataset_name triviaqa-sample --dataset_split train \
    --output_dir outputs/demo-lora/eval-train
python evaluate.py --model_id outputs/demo-lora --dataset_name triviaqa-sample --dataset_split validation \
    --output_dir outputs/demo-lora/eval-validation
