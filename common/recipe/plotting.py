"""Training curves from a run's logged history (trainer_state.json) as PNG files.

    python -m common.recipe.plotting outputs/lora        # writes outputs/lora/plots/*.png
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# One figure per panel; each panel lists the logged keys it draws (those present are drawn).
PANELS = {
    "loss": ("loss", ["loss", "eval_loss"]),
    "learning_rate": ("learning rate", ["learning_rate"]),
    "exact_match": ("TriviaQA exact match / F1 (held-out)", ["eval_em", "eval_f1"]),
    "rewards": ("rewards", ["rewards/chosen", "rewards/rejected", "eval_rewards/chosen", "eval_rewards/rejected",
                            "score", "reward", "objective/scores"]),
    "margins": ("reward margin / accuracy", ["rewards/margins", "rewards/accuracies", "eval_rewards/margins",
                                             "eval_rewards/accuracies"]),
    "kl": ("KL to the reference", ["kl", "objective/kl", "kl_divergence"]),
    "odds_ratio": ("ORPO log odds ratio", ["log_odds_ratio", "log_odds_chosen"]),
}


def history(run_dir: str | Path) -> list[dict]:
    state = Path(run_dir) / "trainer_state.json"
    if not state.is_file():
        raise FileNotFoundError(f"{state} not found: is {run_dir} a finished training run?")
    return json.loads(state.read_text())["log_history"]


def agg_pyplot():
    """matplotlib.pyplot drawing into files, whatever MPLBACKEND the parent process set: a Jupyter
    kernel exports `module://matplotlib_inline.backend_inline` to its `!python` children, a module
    that the project's venv need not have."""
    if "matplotlib" not in sys.modules:
        os.environ["MPLBACKEND"] = "agg"  # read when matplotlib is imported
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path) -> list[Path]:
    plt = agg_pyplot()

    logs = history(run_dir)
    out_dir = Path(run_dir) / "plots"
    written = []
    for name, (title, keys) in PANELS.items():
        series = {k: [(e["step"], e[k]) for e in logs if k in e and isinstance(e[k], (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m common.recipe.plotting RUN_DIR", file=sys.stderr)
        return 2
    try:
        paths = plot_run(argv[0])
    except FileNotFoundError as exc:
        print(f"common.recipe.plotting: error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
