"""What ppo.py builds before its loop, once its inputs are checked (rlhf/ppo.py check_inputs), in
order: precision and accelerator, tokenizer and prompt format, the policy (LoRA adapter, reference,
value head), the reward, the prompts, then optimizer and schedule. `setup_ppo` returns them as one
PPORun. The seed is set where the original order set it, so the adapter, the value head and each
process's rollouts follow `--seed` as they always have."""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate.utils import set_seed

from common.flags.checks import reporters

log = logging.getLogger("finetune")


# The model: policy + reference + value head on one set of base weights -----------------------

class PolicyAndValue(torch.nn.Module):
    """The policy and a linear value head on its last hidden states; the reference is the same
    module with the adapter disabled (or switched to the frozen "ref" copy)."""

    def __init__(self, policy, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(hidden_size + 1))
        torch.nn.init.zeros_(self.value_head.bias)
        forward = policy.get_base_model().forward
        self.keeps_logits = "logits_to_keep" in inspect.signature(forward).parameters

    def forward(self, input_ids, attention_mask, response_length: int, temperature: float):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # The vocabulary projection only where answer tokens are predicted: with a 128k-token
        # vocabulary, logits for the prompt too would be most of the activation memory.
        keep = {"logits_to_keep": response_length + 1} if self.keeps_logits else {}
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=True, use_cache=False, **keep)
        logits = out.logits[:, -response_length - 1:-1].float() / temperature
        hidden = out.hidden_states[-1][:, -response_length - 1:-1]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return logits, values


@dataclass
class Policy:
    wrapper: PolicyAndValue
    quantized: bool
    technique: str
    trainable: int
    total: int


@dataclass
class Reward:
    name: str
    scorer: Optional[object] = None  # a RewardModelScorer for `--reward_model`
    function: Optional[Callable] = None  # else the verifiable `--reward_function`


@dataclass
class Prompts:
    texts: list  # as the policy sees them
    ids: list  # token ids, as SFT put them before the answer
    scored: list  # as the reward model sees them (a conversation where the policy chats)
    aliases: list  # gold answers, for a reward function


@dataclass
class PPORun:
    """Everything the loop and the finish read; nothing here changes during the run."""
    args: object
    out: str
    resume: Optional[str]
    source: object
    data: object
    precision: object
    trackers: list
    report_to: list
    accelerator: object
    tokenizer: object
    fmt: object
    policy: Policy
    reward: Reward
    prompts: Prompts
    wrapper: object  # prepared by the accelerator
    unwrapped: PolicyAndValue
    optimizer: object
    scheduler: object
    steps: int
    rollouts_per_step: int
    stop_ids: list


def setup_ppo(args, out: str, resume: Optional[str], source, data) -> PPORun:
    """After `check_inputs` (rlhf/ppo.py): everything else the loop needs, in order."""
    from common.data import prompts
    from common.evaluation.answers import stop_token_ids
    from common.model.loading import load_tokenizer

    precision, trackers, report_to, accelerator = _accelerator(args, out)

    # Model & tokenizer
    tokenizer = load_tokenizer(source, args)
    fmt = prompts.prompt_format(args, tokenizer, data.schema)
    policy = _policy(args, source, precision)
    set_seed(args.seed + accelerator.process_index)  # each process samples its own rollouts
    log.info("PPO (%s): %s trainable policy parameters of %s, plus a %d-wide value head", policy.technique,
             f"{policy.trainable:,}", f"{policy.total:,}", policy.wrapper.value_head.in_features)

    reward = _reward(args, tokenizer, accelerator)
    batch = _prompts(args, data, fmt, tokenizer)

    # Optimisation
    optimizer, steps, rollouts_per_step = _optimisation(args, policy.wrapper, accelerator, len(batch.texts))
    wrapper, prepared = accelerator.prepare(policy.wrapper, optimizer)
    # Not through accelerator.prepare: its scheduler steps once per process at every optimizer step
    # (made for data loaders whose batches grow with the processes), so with N processes the
    # schedule would end N times too early. It is stepped in ppo_updates after each optimizer step,
    # on the optimizer that takes the steps: under DeepSpeed with the optimizer offloaded to the
    # CPU, accelerate has replaced ours by DeepSpeed's CPU Adam.
    scheduler = _scheduler(args, getattr(wrapper, "basic_optimizer", None) or optimizer, steps)
    optimizer = prepared
    if args.overwrite_output_dir:
        # Before the trackers and the first checkpoint, which rotation would weigh against the old ones.
        from common.recipe.outputs import clear_previous_run

        clear_previous_run(out)
    if trackers:
        from common.recipe import run_config

        accelerator.init_trackers(args.run_name or Path(out).name, config=run_config.redact(args.to_dict(),
                                                                                   args.secret_fields()))
    return PPORun(args=args, out=out, resume=resume, source=source, data=data, precision=precision,
                  trackers=trackers, report_to=report_to, accelerator=accelerator, tokenizer=tokenizer, fmt=fmt,
                  policy=policy, reward=reward, prompts=batch, wrapper=wrapper,
                  unwrapped=accelerator.unwrap_model(wrapper), optimizer=optimizer, scheduler=scheduler,
                  steps=steps, rollouts_per_step=rollouts_per_step, stop_ids=stop_token_ids(tokenizer))


def _accelerator(args, out: str) -> tuple:
    """Precision, trackers and the Accelerator; the seed for what runs before the model loads."""
    from accelerate import Accelerator

    from common.model.precision import select_precision
    from common.recipe import reporting
    from common.recipe.config import cuda_available, mps_available

    precision = select_precision(args)
    trackers = [r for r in reporters(args.report_to) if r != "none"]
    report_to = reporting.setup_reporting(args, out)
    plugin = deepspeed_plugin(args, precision.mode)
    cpu = not cuda_available() and not mps_available()
    if plugin is not None and cpu:
        from accelerate import PartialState

        # Several CPU processes form one gloo group, as the Trainer forms it, and DeepSpeed runs on
        # it; `cpu=True` below would make accelerate ignore DeepSpeed and run plain data parallel.
        PartialState(cpu=True)
    with _launcher_env(ACCELERATE_GRADIENT_ACCUMULATION_STEPS=str(args.gradient_accumulation_steps)):
        # (the launcher's value, `auto` in the DeepSpeed configs, would be read as an integer)
        accelerator = Accelerator(mixed_precision={"bf16": "bf16", "fp16": "fp16"}.get(precision.mode, "no"),
                                  cpu=cpu and plugin is None,
                                  gradient_accumulation_steps=args.gradient_accumulation_steps,
                                  deepspeed_plugin=plugin, log_with=trackers or None, project_dir=out)
    set_seed(args.seed + accelerator.process_index)
    return precision, trackers, report_to, accelerator


@contextlib.contextmanager
def _launcher_env(**values):
    """These environment variables set while the block runs, as they were after it."""
    import os

    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def deepspeed_plugin(args, precision_mode: str):
    """Under `accelerate launch` with a DeepSpeed config: the plugin with the config's `auto` values
    resolved from the flags, as the Trainer resolves them for the other scripts (micro-batch,
    accumulation, clipping, precision). PPO prepares no data loader, from which accelerate would
    read the batch size. None without DeepSpeed. Built before the model loads, so that ZeRO-3
    partitions the weights as they load."""
    from common.model.precision import deepspeed_launch

    if not deepspeed_launch():
        return None
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(gradient_accumulation_steps=args.gradient_accumulation_steps,
                             gradient_clipping=float(args.max_grad_norm))
    config = plugin.deepspeed_config
    config.update(train_micro_batch_size_per_gpu=args.per_device_train_batch_size,
                  gradient_accumulation_steps=args.gradient_accumulation_steps,
                  gradient_clipping=float(args.max_grad_norm))
    # DeepSpeed derives it (micro-batch x accumulation x processes), also where ZeRO-3 reads the
    # config at load time, before DeepSpeed counts the processes.
    config.pop("train_batch_size", None)
    for key in ("bf16", "fp16"):
        if config.get(key, {}).get("enabled") == "auto":
            config[key]["enabled"] = precision_mode == key
    return plugin


def _policy(args, source, precision) -> Policy:
    """The base model with a trainable adapter (and a frozen copy of the SFT adapter as the
    reference, when starting from one), wrapped with its value head."""
    from common.model.adapters import adapter_kind, attach_adapter
    from common.model.loading import count_parameters, enable_checkpointing, is_quantized, load_model
    from rlhf.policy_model import disable_dropout, sample_from_the_policy_only

    model = load_model(source, args, precision, training=True)
    quantized = is_quantized(model)
    technique = adapter_kind(args, model)
    set_seed(args.seed)  # the new adapter's initial weights (and the value head) follow --seed
    policy = attach_adapter(technique, args, model, source)
    trainable, total = count_parameters(policy)
    if source.adapter_dir:  # the SFT model is the reference: keep a frozen copy of its adapter
        policy.load_adapter(source.adapter_dir, adapter_name="ref", is_trainable=False)
        policy.set_adapter("default")
    # Dropout off everywhere (also where gradient checkpointing puts layers in training mode), and
    # rollouts sampled from the policy's distribution alone, whatever generation_config.json says.
    disable_dropout(policy)
    sample_from_the_policy_only(policy)
    if args.gradient_checkpointing and not quantized:  # (4-bit bases have it from prepare_model_for_kbit_training)
        enable_checkpointing(policy.get_base_model(), {"use_reentrant": False})
    hidden = policy.get_base_model().config.get_text_config().hidden_size
    wrapper = PolicyAndValue(policy, hidden)
    wrapper.eval()  # no dropout: rollout and update log-probs must agree
    return Policy(wrapper=wrapper, quantized=quantized, technique=technique, trainable=trainable, total=total)


def _reward(args, tokenizer, accelerator) -> Reward:
    from rlhf.rewards import RewardModelScorer, get_reward_function

    if args.reward_model:
        from common.recipe.dist import loaded_whole

        with loaded_whole(accelerator.state.deepspeed_plugin):
            scorer = RewardModelScorer(args.reward_model, tokenizer, args, accelerator.device)
        return Reward(name=f"reward model {args.reward_model}", scorer=scorer)
    return Reward(name=args.reward_function, function=get_reward_function(args.reward_function))


def _prompts(args, data, fmt, tokenizer) -> Prompts:
    """The ids SFT puts before the answer (and evaluation feeds the model): a BOS the tokenizer adds
    in front stays, a [SEP] or EOS it appends does not."""
    from common.data import prompts
    from rlhf.policy_model import rl_prompts

    texts, ids = rl_prompts(args, data, fmt, tokenizer)
    # The reward model renders a conversation itself, as reward_model.py did in training.
    scored = [prompts.chat_messages(q, fmt) for q in data.train["question"]] if fmt.use_chat else texts
    return Prompts(texts=texts, ids=ids, scored=scored, aliases=list(data.train["aliases"]))


def _optimisation(args, wrapper, accelerator, num_prompts: int) -> tuple:
    """-> (optimizer, steps, rollouts per step and process)."""
    params = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = _optimizer(args, params)
    rollouts_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.num_mini_batches
    steps = args.max_steps if args.max_steps > 0 else max(1, int(args.num_train_epochs * num_prompts
                                                                 / (rollouts_per_step * accelerator.num_processes)))
    return optimizer, steps, rollouts_per_step


def _scheduler(args, optimizer, steps: int):
    from transformers import get_scheduler

    updates = steps * args.ppo_epochs * args.num_mini_batches
    warmup = args.warmup_steps or int(args.warmup_ratio * updates)
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=updates)


def _optimizer(args, params):
    name = args.optimizer
    if "8bit" in name:
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        return cls(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    if not name.startswith("adamw"):
        log.warning("ppo.py: `--optimizer %s` is not supported here; using AdamW.", name)
    fused = name == "adamw_torch_fused" and torch.cuda.is_available()
    return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay, fused=fused)
