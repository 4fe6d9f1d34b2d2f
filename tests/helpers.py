"""Small helpers shared by the tests."""

import importlib
import json
from pathlib import Path


def run_script(script: str, argv: list[str]) -> int:
    """Runs a root script's main(argv) as a user would run `python script.py ...`."""
    module = importlib.import_module(script.removesuffix(".py"))
    return module.main([str(a) for a in argv])


def read_terminal(master: int) -> str:
    """Everything written to a pseudo-terminal until the run closes it; closes our end."""
    import os

    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the run closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


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


def peft_llama(model_dir, dtype=None, seed: int = 0, **lora):
    """A PEFT LoRA model (r 4, alpha 8, all linear layers) on a local model, with B != 0 so that every
    adapter changes the logits and receives gradients; `lora` adds LoraConfig settings. On a bf16
    model PEFT keeps the adapters in float32. Left in the mode PEFT leaves it (eval)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                        init_lora_weights=False, **lora)
    return get_peft_model(model, config)
