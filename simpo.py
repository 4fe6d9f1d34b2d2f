"""SimPO (through TRL's CPO trainer, loss_type="simpo", cpo_alpha=0) with LoRA on the preference data
dpo.py takes; chains after SFT like dpo.py.

    python lora.py --model_id gpt2 --dataset_name triviaqa --output_dir outputs/sft
    python simpo.py --model_id outputs/sft --dataset_name triviaqa --output_dir outputs/simpo

`python simpo.py --help` lists every flag.
"""

import sys

from rlhf.run import main as run_main
from rlhf.run import make_parser as rlhf_parser


def make_parser():
    return rlhf_parser("simpo")


def main(argv=None) -> int:
    return run_main("simpo", argv)


if __name__ == "__main__":
    sys.exit(main())
