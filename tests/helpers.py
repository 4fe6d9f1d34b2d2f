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
