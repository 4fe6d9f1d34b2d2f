"""The training recipe: the same steps in the same order for every Trainer-based technique (SFT,
DPO/ORPO/KTO/SimPO, the reward model, GRPO). A technique supplies only what differs, by
overriding the hooks of `Steps`; `train()` owns the order:

  output dir -> model source (and the settings a starting adapter carries) -> data, checked
  -> precision and tokenizer -> prompt format -> rows the tokenizer can build -> reporters
  -> the trainer configuration (before the model, so that DeepSpeed ZeRO-3 can shard as it loads)
  -> seed -> model -> seed -> adapter -> rows that need the model -> trainer -> guarded training
  -> final evaluation -> the finish (outputs, summary, upload).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from common.flags.parser import ParsedArgs

log = logging.getLogger("finetune")


@dataclass
class Run:
    """What the steps have built so far; each hook reads it and fills in its part."""

    args: ParsedArgs
    name: str  # the technique recorded in run_config.json
    out: str = ""
    source: Any = None  # common.model.source.ModelSource
    data: Any = None  # what load_data read (the technique's own kind)
    precision: Any = None
    tokenizer: Any = None
    fmt: Any = None  # common.data.prompts.PromptFormat
    report_to: list = field(default_factory=list)
    config: Any = None  # the TRL config
    model: Any = None
    adapter: str = "lora"  # the adapter kind attached: lora, dora, qlora or a prompt-learning method
    trainable: int = 0
    total: int = 0
    train_rows: Any = None
    eval_rows: Any = None
    trainer: Any = None
    metrics: dict = field(default_factory=dict)  # training's, then the final evaluation's


class Steps:
    """The hooks a technique overrides; the defaults are those of LoRA-family training."""

    name = ""  # run_config's technique and the default output dir (outputs/<name>)
    title = ""
    drop_adapters: tuple = ()  # adapters the trainer added that are not saved (DPO's reference)
    labelled_positions_only = True  # common.model.loss replaces TRL's fused LM head (SFT, DPO, KTO)

    # Before any model
    def check_source(self, run: Run) -> None:
        """The model source, before the settings of a starting adapter are taken over."""

    def load_data(self, run: Run) -> None:
        raise NotImplementedError

    def schema(self, run: Run) -> str:
        return run.data.schema

    def prepare(self, run: Run) -> None:
        """Rows built with the tokenizer alone, before the model loads (errors come early)."""

    def has_eval(self, run: Run) -> bool:
        return run.eval_rows is not None

    def config(self, run: Run, kwargs: dict) -> Any:
        raise NotImplementedError

    # The model
    def load_model(self, run: Run):
        from common.model.loading import load_model

        return load_model(run.source, run.args, run.precision, training=True)

    def adapter_kind(self, run: Run) -> str:
        from common.model.adapters import adapter_kind

        return adapter_kind(run.args, run.model)

    def attach(self, run: Run):
        from common.model.adapters import attach_adapter

        return attach_adapter(run.adapter, run.args, run.model, run.source)

    def after_model(self, run: Run) -> None:
        """Rows that need the model (answers it generates), dropout settings, rewards."""

    # Training
    def trainer(self, run: Run, callbacks: list):
        raise NotImplementedError

    def final_metrics(self, run: Run, metrics: dict) -> None:
        if run.eval_rows is not None:
            metrics.update(run.trainer.evaluate())

    def record(self, run: Run) -> dict:
        """run_config.json's `data` entry and any other entry beside model and parameters."""
        return {}

    def more_summary(self, run: Run, metrics: dict) -> Optional[dict]:
        return None


def train(steps: Steps, args: ParsedArgs) -> tuple[Run, dict]:
    """Runs the recipe; -> (the run, its summary)."""
    run = begin(args, steps.name, steps.check_source)
    steps.load_data(run)

    # Nothing heavy is imported before the checks above: a mistake there is reported in a second.
    from transformers import set_seed

    from common.data import prompts
    from common.model import loss
    from common.model.adapters import LORA_FAMILY, check_targets_before_loading
    from common.model.loading import count_parameters, is_quantized, keep_float32_trainables, load_tokenizer
    from common.model.precision import select_precision
    from common.recipe import training
    from common.recipe.callbacks import nan_guard_callback
    from common.recipe.config import trainer_kwargs
    from common.recipe.outputs import clear_previous_run
    from common.recipe.reporting import setup_reporting

    # Model & tokenizer, before any weights
    run.precision = select_precision(args)
    run.tokenizer = load_tokenizer(run.source, args)
    run.fmt = prompts.prompt_format(args, run.tokenizer, steps.schema(run))
    steps.prepare(run)
    run.report_to = setup_reporting(args, run.out)
    run.config = steps.config(run, trainer_kwargs(args, run.out, run.precision.mode, run.report_to,
                                                  has_eval=steps.has_eval(run)))

    if getattr(steps, "adapter", "lora") in LORA_FAMILY:  # SFT's technique; the others train LoRA
        check_targets_before_loading(args, run.source)

    # The model: --seed fixes whatever is initialised at load (a score head) and the new adapter
    set_seed(args.seed)
    run.model = steps.load_model(run)
    run.adapter = steps.adapter_kind(run)
    set_seed(args.seed)
    run.model = steps.attach(run)
    run.trainable, run.total = count_parameters(run.model)
    log.info("%s (%s): %s trainable parameters of %s (%.4f%%)", steps.title, run.adapter, f"{run.trainable:,}",
             f"{run.total:,}", 100 * run.trainable / max(run.total, 1))
    steps.after_model(run)

    # Training
    if args.overwrite_output_dir:
        clear_previous_run(run.out)
    run.trainer = steps.trainer(run, [nan_guard_callback()])
    if steps.labelled_positions_only and args.lm_head_impl == "ours":
        loss.install(run.trainer)  # the LM head only where a label is (ORPO, SimPO keep full logits)
    keep_float32_trainables(run.trainer.model, run.precision)  # TRL stores k-bit models' adapters in bf16
    run.metrics, wall = training.train_guarded(run.trainer, args, run.out, run.name)
    steps.final_metrics(run, run.metrics)
    extra = {"model": {"base": run.source.base, "start_adapter": run.source.adapter_dir,
                       "precision": run.precision.mode, "quantized": is_quantized(run.model)},
             **steps.record(run),
             "parameters": {"trainable": run.trainable, "total": run.total}}
    info = training.finish_run(run.trainer, run.tokenizer, args, run.out, run.name, run.metrics, wall, extra,
                               run.report_to, drop_adapters=steps.drop_adapters,
                               more_summary=steps.more_summary(run, run.metrics))
    return run, info


def begin(args: ParsedArgs, name: str, check_source=None) -> Run:
    """The first steps of every run, PPO's too: the output dir (locked), the model source (checked
    by `check_source`, where given) and the prompt settings a starting adapter carries."""
    from common.model.source import inherit_from_adapter, resolve_model
    from common.recipe.outputs import prepare_output_dir

    check_fsdp_has_gpus()
    run = Run(args=args, name=name)
    run.out = prepare_output_dir(args, default=f"outputs/{name}")
    run.source = resolve_model(args.model_id)
    if check_source is not None:
        check_source(run)
    inherit_from_adapter(args, run.source)
    return run


def check_fsdp_has_gpus() -> None:
    """`accelerate launch` with an FSDP config on a machine without GPUs: accelerate keeps its CPU
    mode and the run would be plain data parallel, every process holding the whole model, under a
    config that promises sharding. Stopped before anything is written."""
    from common.model.precision import fsdp_enabled

    if not fsdp_enabled():
        return
    import torch

    if not torch.cuda.is_available():
        from common.flags.errors import UsageError

        raise UsageError("the accelerate config asks for FSDP, which shards the model across GPUs, and this machine "
                         "has none (the run would be plain data parallel, each process holding the whole model); on "
                         "CPUs launch with configs/accelerate/cpu_2proc.yaml.")
