"""DoRA supervised fine-tuning on TriviaQA (or any question-answer data).

    python dora.py --model_id gpt2 --dataset_name triviaqa --output_dir outputs/dora

Offline, on the bundled sample and a tiny local model:

    python -m common.model.tiny_model --output_dir models/tiny-llama
    python dora.py --model_id models/tiny-llama --dataset_name triviaqa-sample --output_dir outputs/dora-demo --max_steps 20

`python dora.py --help` lists every flag.
"""

import sys

from sft.run import main as run_main
from sft.run import make_parser as sft_parser


def make_parser():
    return sft_parser("dora")


def main(argv=None) -> int:
    return run_main("dora", argv)


if __name__ == "__main__":
    sys.exit(main())
