"""Child process of compare.py: evaluate.py's scorer on one run, for several splits in one start
(held-out questions, then a sample of training questions), so torch is imported once per run.

    python -m comparison.scoring EVALUATE_FLAGS [+ EVALUATE_FLAGS ...]

Each group of flags is exactly what `python evaluate.py` takes; next to each eval_results.json
goes request.json, the flags that produced it, so that compare.py reuses only a matching score.
"""

from __future__ import annotations

import sys
from pathlib import Path

REQUEST = "request.json"


def jobs(argv: list[str]) -> list[list[str]]:
    out, current = [], []
    for token in argv:
        if token == "+":
            out.append(current)
            current = []
        else:
            current.append(token)
    return [job for job in [*out, current] if job]


def main(argv=None) -> int:
    from common.evaluation.run import make_parser, run_evaluate
    from common.recipe.cli import run_cli
    from common.recipe.dist import is_main_process, leave_process_group
    from common.recipe.outputs import write_json

    worst = 0
    for job in jobs(sys.argv[1:] if argv is None else argv):
        def score(job=job):
            args = make_parser().parse(job)
            run_evaluate(args)
            if is_main_process():
                write_json(Path(args.output_dir) / REQUEST, {"argv": job})

        # Under torchrun the next job gathers its answers through the same process group.
        worst = max(worst, run_cli("evaluate.py", score, leave_group=False))
    if worst == 0:
        leave_process_group()
    return worst


if __name__ == "__main__":
    sys.exit(main())
