"""ORPO with LoRA on preference pairs, or on TriviaQA turned into pairs; chains after SFT.

    python lora.py --model_id gpt2 --dataset_name triviaqa --output_dir outputs/sft
    python orpo.py --model_id outputs/sft --dataset_name triviaqa --output_dir outputs/orpo

`python orpo.py --help` lists every flag.
"""

import sys

from rlhf.run import main as run_main
from rlhf.run import make_parser as rlhf_parser


def make_parser():
    return rlhf_parser("orpo")


def main(argv=None) -> int:
    return run_main("orpo", argv)


if __name__ == "__main__":
    sys.exit(main())
