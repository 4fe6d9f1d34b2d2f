"""Which technique should I use? Trains several on the same model, data, budget and seed, scores
each with evaluate.py's scorer, and compares them in one table and a few plots.

    python compare.py --techniques lora,dora,qlora,prefix_tuning,p_tuning,prompt_tuning \
        --model_id meta-llama/Llama-3.2-1B --dataset_name triviaqa --dataset_split "train[:5000]" \
        --eval_split "validation[:1000]" --max_steps 300 --output_dir outputs/compare

Writes comparison.md, comparison.json and plots/; `--runs DIR DIR ...` compares finished runs
without training. `python compare.py --help` lists its flags; the others go to each technique.
"""

import sys

from comparison.run import main as run_main
from comparison.run import make_parser as compare_parser


def make_parser():
    return compare_parser()


def main(argv=None) -> int:
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
