"""Merge a LoRA, DoRA or QLoRA adapter into its base model and save a plain model.

    python merge.py --adapter outputs/lora --output_dir outputs/lora-merged

The result loads with `AutoModelForCausalLM.from_pretrained("outputs/lora-merged")`. For llama.cpp,
Ollama and LM Studio, also one GGUF file and an Ollama Modelfile with the run's prompt format:

    python merge.py --adapter outputs/lora --output_dir outputs/merged --export gguf --gguf_type q8_0
"""

import sys

from common.model.merging import main as run_main
from common.model.merging import make_parser as merge_parser


def make_parser():
    return merge_parser()


def main(argv=None) -> int:
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
