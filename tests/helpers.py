"""Small helpers shared by the tests."""

import importlib
import json
from pathlib import Path


def run_script(script: str, argv: list[str]) -> int:
    """Runs a root script's main(argv) as a user would run `python script.py ...`."""
    module = importlib.import_module(script.removesuffix(".py"))
    return module.main([str(a) for a in argv])


def losses(output_dir) -> list[float]:
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def write_jsonl(path, rows) -> str:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def prompt_ids_before_labels(dataset) -> list[list[int]]:
    """For each row an SFT trainer holds, its input ids up to the first trained label: the prompt as
    SFT trains on it."""
    out = []
    for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
        first = next(i for i, label in enumerate(labels) if label != -100)
        out.append(ids[:first])
    return out
