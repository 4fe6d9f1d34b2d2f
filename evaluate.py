"""TriviaQA evaluation (exact match, F1) of a model or of any adapter these scripts write.

    python evaluate.py --model_id outputs/lora --dataset_name triviaqa --dataset_split validation \
        --max_samples 1000 --batch_size 32 --output_dir outputs/lora-eval

Writes eval_results.json and predictions.jsonl. `python evaluate.py --help` lists every flag.
"""

import sys

from common.evaluation.run import main as run_main
from common.evaluation.run import make_parser as eval_parser


def make_parser():
    return eval_parser()


def main(argv=None) -> int:
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
