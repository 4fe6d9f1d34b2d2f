"""One row per run, read from the run's own files, and the three outputs: comparison.md,
comparison.json and plots/. A number a run did not record is None here and "n/a" on the page."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Optional

HELDOUT, TRAIN_SAMPLE = "eval-heldout", "eval-train"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FULL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> Optional[float]:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, training loss) as logged in trainer_state.json. PPO logs its two terms, the mean
    policy and value losses of the step's updates; the loss it minimised is their sum with the
    value term weighted by --vf_coef (a mean of sums is the sum of the means)."""
    history = read_json(run_dir / "trainer_state.json").get("log_history") or []
    vf_coef = _number((read_json(run_dir / "run_config.json").get("flags") or {}).get("vf_coef"))
    curve = []
    for e in history:
        if "step" not in e:
            continue
        if _number(e.get("loss")) is not None:
            curve.append((e["step"], e["loss"]))
        elif vf_coef is not None and _number(e.get("policy_loss")) is not None \
                and _number(e.get("value_loss")) is not None:
            curve.append((e["step"], e["policy_loss"] + vf_coef * e["value_loss"]))
    return curve


def weights_bytes(run_dir: Path) -> Optional[int]:
    """Size on disk of what a user keeps: the adapter weights, or a full model's weights."""
    for names in (ADAPTER_WEIGHTS, FULL_WEIGHTS):
        files = [run_dir / n for n in names if (run_dir / n).is_file()]
        shards = [] if files else sorted(run_dir.glob(names[0].replace(".safetensors", "-*.safetensors")))
        if files or shards:
            return sum(f.stat().st_size for f in files + shards)
    return None


def _peak_memory(summary: dict) -> tuple[Optional[float], Optional[str]]:
    text = summary.get("peak_memory") if isinstance(summary.get("peak_memory"), str) else ""
    kind = "GPU" if "GPU" in text else ("process RSS" if "RSS" in text else None)
    gib = _number(summary.get("peak_memory_gib"))
    if gib is None:  # runs written before peak_memory_gib existed: the figure is in the text
        match = re.match(r"\s*([0-9.]+) GiB", text)
        gib = float(match.group(1)) if match else None
    return gib, kind


def scores(results: dict, prefix: str = "") -> dict[str, Any]:
    """EM/F1 of one eval_results.json, each scale from its own key: `exact_match` and `f1` are
    fractions (0-1), `exact_match_percent` and `f1_percent` percentages (common.evaluation.answers.summarize
    writes both). A file from before the percent keys holds the fractions only: their percentages
    are 100 x the fraction, as summarize computes them."""
    out = {}
    for key in ("exact_match", "f1"):
        fraction, percent = _number(results.get(key)), _number(results.get(key + "_percent"))
        if percent is None and fraction is not None:
            percent = 100.0 * fraction
        out[prefix + key] = fraction
        out[prefix + key + "_percent"] = percent
    return out


def _tokens(summary: dict, state: dict) -> tuple[Optional[int], Optional[float]]:
    """(tokens trained, tokens/s). The run's own count; else the Trainer's `num_input_tokens_seen`
    (GRPO counts its prompt and completion tokens there, not where the summary reads); None where
    neither counted (ORPO and SimPO's trainers do not; PPO counts rollouts)."""
    runtime = _number(summary.get("runtime_s"))
    if summary.get("tokens_trained"):
        return summary["tokens_trained"], _number(summary.get("tokens_per_s"))
    seen = _number(state.get("num_input_tokens_seen"))
    if seen:
        return int(seen), (round(seen / runtime, 1) if runtime else None)
    return None, None


def collect(run_dir: str | Path, technique: Optional[str] = None, status: str = "finished",
            reason: Optional[str] = None) -> dict[str, Any]:
    """The row of one run. Missing files or keys give None, never a guess."""
    run = Path(run_dir)
    config = read_json(run / "run_config.json")
    flags = config.get("flags") or {}
    summary = config.get("summary") or {}
    results = read_json(run / "all_results.json")
    state = read_json(run / "trainer_state.json")
    params = config.get("parameters") or {}
    heldout = read_json(run / HELDOUT / "eval_results.json")
    train_sample = read_json(run / TRAIN_SAMPLE / "eval_results.json")
    trainable, total = _number(params.get("trainable")), _number(params.get("total"))
    curve = loss_curve(run)
    eval_losses = [e["eval_loss"] for e in state.get("log_history") or [] if _number(e.get("eval_loss")) is not None]
    gib, kind = _peak_memory(summary)
    tokens, tokens_per_s = _tokens(summary, state)
    return {
        "technique": technique or config.get("technique") or run.name,
        "output_dir": str(run),
        "status": status,
        "reason": reason,
        "model": flags.get("model_id"),
        "dataset": flags.get("dataset_name"),
        "dataset_split": flags.get("dataset_split"),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total if trainable is not None and total else None,
        "steps": _number(state.get("global_step")) if state else _number(summary.get("steps")),
        "train_runtime": _number(results.get("train_runtime")) if "train_runtime" in results
        else _number(summary.get("runtime_s")),
        "train_tokens": tokens,
        "train_tokens_per_s": tokens_per_s,
        "peak_memory_gib": gib,
        "peak_memory_kind": kind,
        "final_train_loss": curve[-1][1] if curve else None,
        "eval_loss": _number(results.get("eval_loss")) if "eval_loss" in results
        else (eval_losses[-1] if eval_losses else None),
        **scores(heldout),
        "eval_split": heldout.get("split"),
        "eval_n": heldout.get("n"),
        **scores(train_sample, "train_"),
        "train_eval_n": train_sample.get("n"),
        "adapter_bytes": weights_bytes(run) if config else None,
        "eval_error": None,
    }


def machine() -> str:
    """CPU model and logical cores, and the GPU(s): what the figures were measured on."""
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine() or "unknown CPU"
    gpus = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            gpus = ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))
    except Exception:  # a broken CUDA setup must not lose a finished comparison
        gpus = "GPU unknown"
    return f"{cpu} ({os.cpu_count()} logical cores), {gpus}"


# The table --------------------------------------------------------------------------------------

# (header, key, better: "low" | "high" | None (not ranked))
COLUMNS = [
    ("trainable params (share)", "trainable_params", "low"),
    ("steps", "steps", None),
    ("train time (s)", "train_runtime", "low"),
    ("train tokens/s", "train_tokens_per_s", "high"),
    ("peak memory (GiB)", "peak_memory_gib", "low"),
    ("final train loss", "final_train_loss", "low"),
    ("held-out loss", "eval_loss", "low"),
    ("held-out EM", "exact_match", "high"),
    ("held-out F1", "f1", "high"),
    ("train EM", "train_exact_match", "high"),
    ("adapter size", "adapter_bytes", "low"),
]


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if _number(value) is None:
        return "n/a"
    if key == "trainable_params":
        share = row.get("trainable_percent")
        return f"{int(value):,}" + (f" ({share:.3g}%)" if share is not None else "")
    if key == "adapter_bytes":
        return _size(value)
    if key in ("steps",):
        return str(int(value))
    if key in ("train_runtime", "train_tokens_per_s"):
        return f"{value:,.1f}"
    if key == "peak_memory_gib":
        return f"{value:.2f}"
    if key in ("exact_match", "f1", "train_exact_match"):  # fractions (0-1), the keys' scale
        return f"{value:.3f}"
    return f"{value:.4f}"


def best_values(rows: list[dict]) -> dict[str, float]:
    """The best value of each ranked column among the runs that have one (two runs at least)."""
    best = {}
    for _, key, better in COLUMNS:
        values = [r[key] for r in rows if _number(r.get(key)) is not None]
        if better and len(values) >= 2 and len(set(values)) > 1:
            best[key] = min(values) if better == "low" else max(values)
    return best


def title_of(rows: list[dict]) -> str:
    def one(key: str) -> str:
        values = list(dict.fromkeys(str(r[key]) for r in rows if r.get(key)))
        return values[0] if len(values) == 1 else ("several" if values else "n/a")

    return f"{one('model')} on {one('dataset')} ({one('dataset_split')})"


def markdown(rows: list[dict], machine_line: str) -> str:
    best = best_values(rows)
    kinds = sorted({r["peak_memory_kind"] for r in rows if r.get("peak_memory_kind")})
    headers = ["technique"] + [h for h, _, _ in COLUMNS] + ["status"]
    lines = [f"# Technique comparison: {title_of(rows)}", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [r["technique"]]
        for _, key, _ in COLUMNS:
            text = _cell(r, key)
            # Equal as shown is equal: every value that reads like the best one is marked.
            marked = key in best and text == _cell({**r, key: best[key]}, key)
            cells.append(f"**{text}**" if marked else text)
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        if r.get("eval_error"):
            status += f"; scoring failed: {r['eval_error']}"
        cells.append(status.replace("|", "\\|"))
        lines.append("| " + " | ".join(c.replace("\n", " ") for c in cells) + " |")
    split = next((r["eval_split"] for r in rows if r.get("eval_split")), None)
    n_eval = sorted({r["eval_n"] for r in rows if r.get("eval_n")})
    n_train = sorted({r["train_eval_n"] for r in rows if r.get("train_eval_n")})
    lines += [
        "",
        f"Machine: {machine_line}. Peak memory: {' / '.join(kinds) or 'n/a'} of each run's main process.",
        f"**Bold**: the best value of its column (lowest time, memory, loss, size and trainable parameters; "
        f"highest tokens/s and scores). Steps are the budget, not ranked.",
        f"Held-out EM/F1: evaluate.py's scorer on {split or 'the held-out split'} "
        f"({', '.join(map(str, n_eval)) or 'n/a'} questions); train EM: the first "
        f"{', '.join(map(str, n_train)) or 'n/a'} training questions (memorisation, against held-out "
        f"generalisation). EM and F1 are fractions (0-1), `exact_match` and `f1` of each run's eval_results.json "
        f"(comparison.json also gives `exact_match_percent` and `f1_percent`).",
        "Losses are each technique's own training objective: compare them between SFT techniques, not "
        "between SFT and preference or RL runs (PPO's: its policy loss plus `--vf_coef` x its value loss). Held-out "
        "loss: SFT and preference runs, on the held-out split. n/a: the run did not record that figure.",
    ]
    return "\n".join(lines) + "\n"


def to_json(rows: list[dict], machine_line: str) -> dict:
    return {"title": title_of(rows), "machine": machine_line, "runs": rows}


# Plots -----------------------------------------------------------------------------------------

def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    from common.recipe.plotting import agg_pyplot

    plt = agg_pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title_of(rows)
    written = []

    def save(fig, name):
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    names = [r["technique"] for r in rows]

    # Training loss, overlaid
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    drawn = 0
    for r in rows:
        curve = loss_curve(Path(r["output_dir"])) if r["status"] != "failed" else []
        if curve:
            steps, values = zip(*curve)
            ax.plot(steps, values, marker="o" if len(curve) < 30 else None, markersize=3, label=r["technique"])
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no run logged a training loss", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (each technique's objective)")
    ax.set_title(f"Training loss: {title}", fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    save(fig, "loss.png")

    # Held-out EM / F1 and train EM
    series = [("held-out EM", "exact_match"), ("held-out F1", "f1"), ("train EM", "train_exact_match")]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 3), 4.2), dpi=110)
    width = 0.8 / len(series)
    for j, (label, key) in enumerate(series):
        xs = [i + (j - 1) * width for i in range(len(rows))]
        values = [r.get(key) if _number(r.get(key)) is not None else 0 for r in rows]
        bars = ax.bar(xs, values, width, label=label)
        for x, r, bar in zip(xs, rows, bars):
            text = "n/a" if _number(r.get(key)) is None else _cell(r, key)
            ax.text(x, bar.get_height(), text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    ax.set_xlabel("technique")
    top = max([_number(r.get(k)) or 0 for r in rows for _, k in series] + [0])
    ax.set_ylim(0, max(top, 1) * 1.08)
    ax.set_ylabel("TriviaQA exact match / F1 (0-1)")
    ax.set_title(f"Exact match: {title}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    save(fig, "exact_match.png")

    # Time and memory
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4.2), dpi=110)
    kind = next((r["peak_memory_kind"] for r in rows if r.get("peak_memory_kind")), "")
    for ax, key, label in ((axes[0], "train_runtime", "train time (s)"),
                           (axes[1], "peak_memory_gib", f"peak memory (GiB{', ' + kind if kind else ''})")):
        values = [r.get(key) if _number(r.get(key)) is not None else 0 for r in rows]
        bars = ax.bar(range(len(rows)), values, color="tab:gray")
        for i, (r, bar) in enumerate(zip(rows, bars)):
            text = "n/a" if _number(r.get(key)) is None else _cell(r, key)
            ax.text(i, bar.get_height(), text, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
        ax.set_xlabel("technique")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Time and memory: {title}", fontsize=10)
    save(fig, "cost.png")
    return written
