"""Train a scalar reward model (sequence-classification head + LoRA) for ppo.py.

    python reward_model.py --model_id gpt2 --dataset_name Anthropic/hh-rlhf --output_dir outputs/rm
    python ppo.py --model_id outputs/sft --reward_model outputs/rm --output_dir outputs/ppo

Takes the same preference data as dpo.py; reports pairwise accuracy on held-out pairs.
"""

import sys

from rlhf.reward import main as run_main
from rlhf.reward import make_parser as reward_parser


def make_parser():
    return reward_parser()


def main(argv=None) -> int:
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
