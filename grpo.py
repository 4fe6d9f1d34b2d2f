"""GRPO (TRL's GRPOTrainer) with LoRA/QLoRA, rewarded by TriviaQA exact match / F1 and/or a reward model.

    python lora.py --model_id gpt2 --dataset_name triviaqa --output_dir outputs/sft
    python grpo.py --model_id outputs/sft --dataset_name triviaqa --reward_function triviaqa_em,triviaqa_f1 \
        --reward_weights 1,0.5 --num_generations 8 --output_dir outputs/grpo

`python grpo.py --help` lists every flag.
"""

import sys

from rlhf.grpo import main as run_main
from rlhf.grpo import make_parser as grpo_parser


def make_parser():
    return grpo_parser()


def main(argv=None) -> int:
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
