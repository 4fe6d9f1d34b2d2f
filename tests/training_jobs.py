"""Every training script with short, comparable flags: the jobs that the seed and multi-process tests
run (in the test process, or all together in launched processes through tests/launch_jobs.py)."""

import json
from pathlib import Path

import torch

SCRIPTS = ("lora.py", "dora.py", "qlora.py", "prefix_tuning.py", "p_tuning.py", "prompt_tuning.py", "dpo.py",
           "orpo.py", "kto.py", "simpo.py", "reward_model.py", "grpo.py", "ppo.py")
SAMPLED = ("grpo.py", "ppo.py")  # each process samples its own completions


def jobs(model: str, root: Path, per_device: int, dropout: bool = True, scripts=SCRIPTS) -> list:
    """-> [script, argv] for each script, writing to root/<script name>. `per_device` rows a process
    takes per step (one process with twice the rows sees what two processes see together).
    Without `dropout`, LoRA dropout is 0, so that runs with other batch splits are comparable."""
    common = ["--model_id", model, "--dataset_name", "triviaqa-sample", "--max_train_samples", "16",
              "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
              "--learning_rate", "1e-3", "--train_sampling_strategy", "random", "--seed", "7"]
    lora = ["--lora_r", "4"] + ([] if dropout else ["--lora_dropout", "0"])
    extra = {
        "dpo.py": ["--rejected_source", "other"], "kto.py": ["--rejected_source", "other"],
        "simpo.py": ["--rejected_source", "other"],
        "grpo.py": ["--reward_function", "triviaqa_f1", "--num_generations", "4", "--max_completion_length", "4"],
        # Two micro-batches per optimizer step: ppo.py's own accumulation, under DeepSpeed too
        "ppo.py": ["--reward_function", "triviaqa_f1", "--response_length", "4", "--gradient_accumulation_steps", "2"],
    }
    out = []
    for script in scripts:
        prompt_learning = script in ("prefix_tuning.py", "p_tuning.py", "prompt_tuning.py")
        batch = ["--per_device_train_batch_size", str(per_device)]
        if script == "grpo.py":  # GRPO's batch counts completions: 4 prompts x 4 generations
            batch = ["--per_device_train_batch_size", str(4 * per_device)]
        argv = [*common, *batch, *([] if prompt_learning else lora), *extra.get(script, []),
                "--output_dir", str(root / script.removesuffix(".py"))]
        if script == "ppo.py":
            argv.remove("--train_sampling_strategy"), argv.remove("random")  # PPO shuffles its prompts itself
        out.append([script, argv])
    return out


def write_jobs(path: Path, job_list: list) -> Path:
    path.write_text(json.dumps(job_list))
    return path


def saved_weights(out: Path) -> dict:
    """Every trained tensor a run saved: the adapter, and the value head (ppo.py) or score head
    (reward_model.py, inside the adapter file)."""
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(out.glob("*.safetensors")):
        weights.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    assert weights, f"no weights saved in {out}"
    return weights


def losses(out: Path) -> list:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    key = "loss" if any("loss" in e for e in history) else "policy_loss"
    return [e[key] for e in history if key in e]


def assert_bit_identical(a: Path, b: Path) -> None:
    wa, wb = saved_weights(a), saved_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{a.name}: {name} differs between two runs with the same seed"
