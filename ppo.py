"""PPO with LoRA, rewarded by a reward model (reward_model.py) or by TriviaQA exact match / F1.

    python lora.py --model_id gpt2 --dataset_name triviaqa --output_dir outputs/sft
    python ppo.py --model_id outputs/sft --dataset_name triviaqa --reward_function triviaqa_f1 \
        --output_dir outputs/ppo --max_steps 200

`python ppo.py --help` lists every flag.
"""

import sys

from rlhf.ppo import main as run_main
from rlhf.ppo import make_parser as ppo_parser


def make_parser():
    return ppo_parser()


def main(argv=None) -> int:
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
