"""TRL 1.12's PPOTrainer (`trl.experimental.ppo`) on bench_ppo.py's model, prompts and shape.

Run by bench_ppo.py with the Python of its own virtual environment (TRL 1.12 and the libraries
pinned for it), so this file imports nothing from the project. Set up as TRL's own PPO example
script does: the policy is a LoRA adapter on the model (the reference is the same model with
the adapter off), and the value and reward models are separate sequence-classification copies
of it, the value model fully trained. One argument: a JSON file of settings; the result is
written to the settings' `output`.
"""

from __future__ import annotations

import json
import sys
import time


def peak_rss() -> int:
    with open("/proc/self/status", encoding="utf-8") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def main(path: str) -> int:
    settings = json.loads(open(path, encoding="utf-8").read())
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(settings["seed"])
    model_dir = settings["model"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.unk_token  # a pad token distinct from EOS, as ppo.py picks
    tokenizer.padding_side = "left"
    rows = [json.loads(line) for line in open(settings["data"], encoding="utf-8")]
    prompts = [settings["template"].replace("{question}", r["question"]) for r in rows]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})

    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    for model in (policy, value, reward):
        model.config.pad_token_id = tokenizer.pad_token_id
    steps = settings["steps"] + 1  # the first is an untimed warm-up, as in bench_ppo.py
    rollouts = settings["per_device_train_batch_size"] * settings["num_mini_batches"]
    config = PPOConfig(
        output_dir=settings["work"], report_to="none", save_strategy="no", seed=settings["seed"],
        learning_rate=settings["learning_rate"],
        per_device_train_batch_size=settings["per_device_train_batch_size"],
        gradient_accumulation_steps=settings["num_mini_batches"],  # rollouts a step = batch x accumulation
        num_mini_batches=settings["num_mini_batches"], num_ppo_epochs=settings["ppo_epochs"],
        response_length=settings["response_length"], stop_token="eos", total_episodes=steps * rollouts,
        num_sample_generations=0, gradient_checkpointing=settings["gradient_checkpointing"], use_cpu=True,
    )
    lora = LoraConfig(r=settings["lora_r"], lora_alpha=settings["lora_alpha"], lora_dropout=settings["lora_dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")

    ends = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
                         value_model=value, train_dataset=dataset, peft_config=lora, callbacks=[StepClock()])
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    timed = ends[-1] - ends[0]
    result = {
        "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
        "steps": len(ends) - 1, "rollouts": (len(ends) - 1) * rollouts, "runtime_s": round(timed, 2),
        "rollouts_per_s": round((len(ends) - 1) * rollouts / timed, 3), "train_wall_s": round(wall, 2),
        "peak_memory_bytes": peak_rss(), "peak_memory_kind": "process RSS",
        "trainable_parameters": sum(p.numel() for m in (trainer.model,) for p in m.parameters() if p.requires_grad),
    }
    with open(settings["output"], "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
