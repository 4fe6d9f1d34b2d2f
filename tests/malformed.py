"""The malformed inputs of issue #27, generated per script: each case builds its files under a
folder and returns the flags a user would pass. Shared by tests/test_malformed_input.py (which
asserts one line, exit 2, no traceback, nothing that looks finished) and by the count in the
README's Reliability section."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SFT = ["lora.py", "dora.py", "qlora.py", "prefix_tuning.py", "p_tuning.py", "prompt_tuning.py"]
PREF = ["dpo.py", "orpo.py", "kto.py", "simpo.py", "reward_model.py"]
RL = ["grpo.py", "ppo.py"]
TRAINING = [*SFT, *PREF, *RL]
LORA_TRAINING = [s for s in TRAINING if s not in ("prefix_tuning.py", "p_tuning.py", "prompt_tuning.py")]
ADAPTER_USERS = ["lora.py", "merge.py", "evaluate.py", "dpo.py"]
QA_ROW = {"question": "Which planet is known as the Red Planet?", "answer": "Mars"}


@dataclass
class Case:
    name: str
    scripts: list[str]
    build: Callable  # (folder: Path, models: dict) -> (flags, words the error line must name)
    kind: str = "traceback"  # the class issue #27 found: traceback, silent, misleading, late
    slow: bool = False  # a model is loaded before the error can be known
    tags: set = field(default_factory=set)


def _rows(folder: Path, name: str, rows: list, raw: bytes = b"") -> Path:
    path = folder / name
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + raw)
    return path


def _qa(folder: Path, n: int = 8, **extra) -> Path:
    return _rows(folder, "qa.jsonl", [{"question": f"Question number {i}?", "answer": f"answer {i}", **extra}
                                      for i in range(n)])


def _pairs(folder: Path, rows: list) -> Path:
    return _rows(folder, "pairs.jsonl", rows)


def _adapter(folder: Path, models: dict, damage: str) -> Path:
    """A copy of a trained LoRA adapter of tiny-llama (models['adapter']), damaged."""
    dst = folder / "adapter"
    shutil.copytree(models["adapter"], dst)
    config = dst / "adapter_config.json"
    weights = dst / "adapter_model.safetensors"
    if damage == "other width":
        cfg = json.loads(config.read_text())
        cfg["base_model_name_or_path"] = models["wide"]
        config.write_text(json.dumps(cfg))
    elif damage == "other architecture":
        cfg = json.loads(config.read_text())
        cfg["base_model_name_or_path"] = models["gpt2"]
        config.write_text(json.dumps(cfg))
    elif damage == "corrupt config":
        config.write_text('{"peft_type": "LORA", "base_model_name_or_path": ')
    elif damage == "missing weights":
        weights.unlink()
    elif damage == "truncated weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt run_config":
        (dst / "run_config.json").write_text("{not json")
    return dst


def _model(folder: Path, models: dict, damage: str) -> Path:
    dst = folder / "model"
    shutil.copytree(models["llama"], dst)
    config = dst / "config.json"
    if damage == "negative layers":
        cfg = json.loads(config.read_text())
        cfg["num_hidden_layers"] = -1
        config.write_text(json.dumps(cfg))
    elif damage == "corrupt config":
        config.write_text('{"model_type": "llama", ')
    elif damage == "no tokenizer":
        for p in dst.iterdir():
            if p.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                p.unlink()
    elif damage == "truncated weights":
        weights = dst / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    return dst


def _data_flag(script: str, path) -> list:
    return ["--dataset_name", path] + (["--dataset_split", "train"] if script == "evaluate.py" else [])


def _case_list() -> list[Case]:
    cases = []

    def add(name, scripts, kind="traceback", slow=False):
        def deco(build):
            cases.append(Case(name, list(scripts), build, kind, slow))
            return build
        return deco

    # Tracebacks --------------------------------------------------------------------------------
    @add("non-utf8 data", [*TRAINING, "evaluate.py"])
    def _(folder, models, script):
        path = _rows(folder, "bad.jsonl", [QA_ROW, QA_ROW], b'{"question": "caf\xe9?", "answer": "x"}\n')
        return _data_flag(script, path), [str(path), "line 3", "utf-8"]

    @add("every answer cut by --max_seq_length", SFT)
    def _(folder, models, script):
        return ["--dataset_name", "triviaqa-sample", "--max_seq_length", "2"], ["`--max_seq_length`", "dropped"]

    for flag, value in [("learning_rate", "nan"), ("num_train_epochs", "nan"), ("seed", "-1"),
                        ("seed", "99999999999999999999"), ("neftune_noise_alpha", "-5"), ("target_modules", "")]:
        scripts = {"neftune_noise_alpha": SFT, "target_modules": LORA_TRAINING}.get(flag, TRAINING)

        @add(f"--{flag} {value!r}", scripts)
        def _(folder, models, script, flag=flag, value=value):
            return ["--dataset_name", "triviaqa-sample", f"--{flag}", value], [f"`--{flag}`"]

    @add("num_hidden_layers -1", [*TRAINING, "evaluate.py"])
    def _(folder, models, script):
        model = _model(folder, models, "negative layers")
        return ["--model_id", model, *_data_flag(script, "triviaqa-sample")], [str(model), "num_hidden_layers"]

    @add("--config binary", [*TRAINING, "evaluate.py", "merge.py"])
    def _(folder, models, script):
        path = folder / "run.yaml"
        path.write_bytes(bytes(range(256)) * 4)
        return ["--config", path], ["`--config`", str(path)]

    @add("--output_dir uncreatable", [*TRAINING, "evaluate.py", "merge.py"])
    def _(folder, models, script):
        blocker = folder / "a-file"
        blocker.write_text("x")
        return ["--output_dir", blocker / "sub"], ["`--output_dir`", str(blocker / "sub")]

    for damage in ("other width", "other architecture", "corrupt config", "missing weights", "truncated weights"):
        @add(f"adapter: {damage}", ADAPTER_USERS)
        def _(folder, models, script, damage=damage):
            adapter = _adapter(folder, models, damage)
            flag = "--adapter" if script == "merge.py" else "--model_id"
            extra = [] if script == "merge.py" else _data_flag(script, "triviaqa-sample")
            return [flag, adapter, *extra], [str(adapter)]

    @add("kto completion null", ["kto.py"])
    def _(folder, models, script):
        path = _rows(folder, "kto.jsonl", [{"prompt": "Capital of France?", "completion": "Paris", "label": True},
                                           {"prompt": "Capital of Spain?", "completion": None, "label": False}])
        return ["--dataset_name", path], [str(path), "row 1", "`completion`"]

    # Silent runs -------------------------------------------------------------------------------
    @add("JSON NaN answer", [*TRAINING, "evaluate.py"], kind="silent")
    def _(folder, models, script):
        path = _rows(folder, "nan.jsonl", [QA_ROW], b'{"question": "What is it?", "answer": NaN}\n')
        return _data_flag(script, path), [str(path), "line 2", "NaN"]

    @add("--prompt_template with {answer}", [*TRAINING, "evaluate.py"], kind="silent")
    def _(folder, models, script):
        return ["--dataset_name", "triviaqa-sample", "--prompt_template", "{answer} {question}"], \
            ["`--prompt_template`", "{answer}"]

    @add("--modules_to_save no_such_module", ["lora.py", "dora.py", "dpo.py", "kto.py"], kind="silent")
    def _(folder, models, script):
        return ["--dataset_name", "triviaqa-sample", "--modules_to_save", "no_such_module"], \
            ["`--modules_to_save`", "no_such_module"]

    @add("--output_dir ''", TRAINING, kind="silent")
    def _(folder, models, script):
        return ["--dataset_name", "triviaqa-sample", "--output_dir", ""], ["`--output_dir`"]

    @add("adapter: corrupt run_config", ["lora.py", "evaluate.py", "merge.py"], kind="silent")
    def _(folder, models, script):
        adapter = _adapter(folder, models, "corrupt run_config")
        flag = "--adapter" if script == "merge.py" else "--model_id"
        extra = [] if script == "merge.py" else _data_flag(script, "triviaqa-sample")
        return [flag, adapter, *extra], [str(adapter / "run_config.json")]

    @add("prompt message content null", ["dpo.py", "orpo.py", "simpo.py", "reward_model.py"], kind="silent")
    def _(folder, models, script):
        good = {"prompt": [{"role": "user", "content": "Capital of France?"}],
                "chosen": [{"role": "assistant", "content": "Paris"}],
                "rejected": [{"role": "assistant", "content": "Rome"}]}
        bad = {**good, "prompt": [{"role": "user", "content": None}]}
        path = _pairs(folder, [good, bad])
        return ["--dataset_name", path], [str(path), "row 1", "content"]

    @add("implicit pairs whose prompts differ", ["dpo.py", "orpo.py", "reward_model.py"], kind="silent")
    def _(folder, models, script):
        rows = [{"chosen": "Human: Capital of France?\n\nAssistant: Paris",
                 "rejected": "Human: Capital of Italy?\n\nAssistant: Rome"},
                {"chosen": "Human: Capital of Spain?\n\nAssistant: Madrid",
                 "rejected": "Human: Capital of Spain?\n\nAssistant: Lisbon"}]
        path = _pairs(folder, rows)
        return ["--dataset_name", path], [str(path), "row 0", "prompt"]

    @add("kto every completion empty", ["kto.py"], kind="silent")
    def _(folder, models, script):
        path = _rows(folder, "kto.jsonl", [{"prompt": "Capital of France?", "completion": "", "label": True},
                                           {"prompt": "Capital of Spain?", "completion": "", "label": False}])
        return ["--dataset_name", path], [str(path), "`completion`"]

    # Misleading messages -----------------------------------------------------------------------
    @add("model: corrupt config.json", [*TRAINING, "evaluate.py"], kind="misleading")
    def _(folder, models, script):
        model = _model(folder, models, "corrupt config")
        return ["--model_id", model, *_data_flag(script, "triviaqa-sample")], [str(model / "config.json")]

    @add("model: no tokenizer", [*TRAINING, "evaluate.py"], kind="misleading")
    def _(folder, models, script):
        model = _model(folder, models, "no tokenizer")
        return ["--model_id", model, *_data_flag(script, "triviaqa-sample")], [str(model), "tokenizer"]

    @add("--attn_implementation bogus", [*TRAINING, "evaluate.py"], kind="misleading")
    def _(folder, models, script):
        return ["--attn_implementation", "bogus", *_data_flag(script, "triviaqa-sample")], \
            ["`--attn_implementation`", "bogus"]

    @add("merge --adapter missing", ["merge.py"], kind="misleading")
    def _(folder, models, script):
        return ["--adapter", folder / "nonexistent"], ["`--adapter`", str(folder / "nonexistent")]

    @add("ppo --reward_model missing", ["ppo.py"], kind="misleading")
    def _(folder, models, script):
        return ["--dataset_name", "triviaqa-sample", "--reward_model", folder / "nonexistent"], \
            ["`--reward_model`", str(folder / "nonexistent")]

    @add("unreadable CSV", [*TRAINING, "evaluate.py"], kind="misleading")
    def _(folder, models, script):
        path = folder / "bad.csv"
        path.write_text('question,answer\n"unterminated,x\nq2,a,extra,fields\n')
        return _data_flag(script, path), [str(path)]

    @add("dpo given conversation data", ["dpo.py", "orpo.py", "simpo.py", "reward_model.py"], kind="misleading")
    def _(folder, models, script):
        path = _rows(folder, "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "Hello"}]}])
        return ["--dataset_name", path], [str(path), "prompt", "chosen", "rejected"]

    # Clean but late ----------------------------------------------------------------------------
    @add("bad pairs", ["dpo.py", "orpo.py", "simpo.py", "reward_model.py"], kind="late")
    def _(folder, models, script):
        path = _pairs(folder, [{"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
                               {"prompt": "Capital of Spain?", "chosen": "", "rejected": "Rome"}])
        return ["--dataset_name", path], [str(path), "`chosen`"]

    @add("--resume_from_checkpoint missing", TRAINING, kind="late")
    def _(folder, models, script):
        return ["--dataset_name", "triviaqa-sample", "--resume_from_checkpoint", folder / "nonexistent"], \
            ["`--resume_from_checkpoint`", str(folder / "nonexistent")]

    @add("--target_modules not in the model", [s for s in LORA_TRAINING if s != "ppo.py"], kind="late")
    def _(folder, models, script):
        return ["--dataset_name", "triviaqa-sample", "--target_modules", "no_such_proj"], \
            ["`--target_modules`", "no_such_proj"]

    @add("model: truncated weights", [*TRAINING, "evaluate.py"], kind="late")
    def _(folder, models, script):
        model = _model(folder, models, "truncated weights")
        return ["--model_id", model, *_data_flag(script, "triviaqa-sample")], [str(model / "model.safetensors")]

    return cases


CASES = _case_list()


def argv_for(case: Case, script: str, folder: Path, models: dict) -> tuple[list[str], list[str], Path]:
    """-> (full argv, words, output dir): the case's flags over small defaults for `script`."""
    flags, words = case.build(folder, models, script)
    flags = [str(f) for f in flags]
    out = folder / "out"
    base = {"--model_id": models["llama"], "--output_dir": str(out)}
    if script == "merge.py":
        base = {"--adapter": models["adapter"], "--output_dir": str(out)}
    elif script == "evaluate.py":
        base.update({"--max_samples": "2", "--dataset_split": "train", "--dataset_name": "triviaqa-sample"})
    else:
        base.update({"--max_steps": "1", "--max_train_samples": "8", "--per_device_train_batch_size": "2",
                     "--report_to": "none", "--save_strategy": "no", "--lora_r": "2"})
        if script in ("grpo.py", "ppo.py"):
            base.update({"--reward_function": "triviaqa_em"} if "--reward_model" not in flags else {})
        if script == "grpo.py":
            base.update({"--num_generations": "2", "--max_completion_length": "4"})
        if script == "ppo.py":
            base["--response_length"] = "4"
    if "--adapter" in flags and "--adapter" in base:
        del base["--adapter"]
    for key in list(base):
        if key in flags:
            del base[key]
    argv = [*(x for kv in base.items() for x in kv), *flags]
    if "--output_dir" in flags:
        out = Path(flags[flags.index("--output_dir") + 1] or "outputs/lora")
    return argv, words, out


def build_models(folder: Path) -> dict:
    """The models the cases start from: tiny-llama, a wider llama, tiny-gpt2 and a LoRA adapter of
    tiny-llama with its run_config.json (written directly with PEFT: no training run needed)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from common.model.tiny_model import build_tiny_model

    models = {"llama": build_tiny_model(str(folder / "tiny-llama"), "llama"),
              "gpt2": build_tiny_model(str(folder / "tiny-gpt2"), "gpt2"),
              "wide": build_tiny_model(str(folder / "wide-llama"), "llama", hidden_size=96)}
    model = AutoModelForCausalLM.from_pretrained(models["llama"])
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    adapter = folder / "adapter"
    peft_model.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = models["llama"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    (adapter / "run_config.json").write_text(json.dumps({"technique": "lora", "flags": {}}))
    models["adapter"] = str(adapter)
    return models
