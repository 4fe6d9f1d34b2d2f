"""KTO with LoRA on unpaired feedback (prompt/completion/label), or on pairs / TriviaQA split into
desirable and undesirable answers; chains after SFT like dpo.py.

    python lora.py --model_id gpt2 --dataset_name triviaqa --output_dir outputs/sft
    python kto.py --model_id outputs/sft --dataset_name triviaqa --output_dir outputs/kto

`python kto.py --help` lists every flag.
"""

import sys

from rlhf.run import main as run_main
from rlhf.run import make_parser as rlhf_parser


def make_parser():
    return rlhf_parser("kto")


def main(argv=None) -> int:
    return run_main("kto", argv)


if __name__ == "__main__":
    sys.exit(main())
