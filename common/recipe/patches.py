"""Where the Trainer falls short for exact resume and one TensorBoard curve: the patches of
transformers' Trainer internals live here, and so does PRIVATE_API, the table of every private
library member the project reads or patches anywhere (each entry names the module that does),
which tests/test_private_api.py checks against the installed versions."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

from common.recipe.callbacks import check_finite_weights
from common.recipe.dist import barrier
from common.recipe.outputs import RESUME_STATE, rotate_checkpoints

log = logging.getLogger("finetune")

# Resuming exactly ----------------------------------------------------------------------------

TENSORBOARD_DIR = ("runs", "train")  # under the output dir


def one_tensorboard_run(trainer) -> None:
    """`--report_to tensorboard`: one event folder per output dir (runs/train), not one per start,
    and a resumed run first purges what the stopped run logged after its checkpoint (steps it
    trains again). TensorBoard then shows a resumed run as one curve, that of the run never
    stopped. TENSORBOARD_LOGGING_DIR, where set, still names the folder."""
    from transformers.integrations import TensorBoardCallback

    found = [cb for cb in trainer.callback_handler.callbacks if type(cb) is TensorBoardCallback]
    if not found:
        return

    class ResumableTensorBoard(TensorBoardCallback):
        purge_step = None

        def on_train_begin(self, args, state, control, **kwargs):
            if self.logging_dir is None:
                self.logging_dir = os.path.join(args.output_dir, *TENSORBOARD_DIR)
            # Events of later steps are a stopped run's (on a fresh start, 1: all of an earlier start's).
            self.purge_step = state.global_step + 1
            super().on_train_begin(args, state, control, **kwargs)

        def _init_summary_writer(self, args):
            if self._SummaryWriter is not None:
                # Once: a writer opened again after training (the final evaluation's) purges nothing.
                self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=self.purge_step)
                self.purge_step = None

    callbacks = trainer.callback_handler.callbacks
    callbacks[callbacks.index(found[0])] = ResumableTensorBoard(tb_writer=found[0].tb_writer)  # same place


def exact_resume(trainer, resume: Optional[str]) -> None:
    """Makes a run resumed from any checkpoint end like the run that was never stopped, where the
    Trainer alone does not:
    - length-grouped batches are shuffled from a generator seeded with (seed, epoch), not from the
      global random state, which a resumed run reaches in a different state after epoch 1;
    - a run resumed from a checkpoint at `max_steps` trains no further step;
    - the loss summed so far (and the part not yet logged) goes into each checkpoint, so the final
      `train_loss` and the next logged loss cover the whole run;
    - the process count is recorded, so a checkpoint missing one process's random state is seen;
    - `--save_total_limit` counts complete checkpoints only, after every process has written;
    - no checkpoint is written from weights that are no longer finite (callbacks.check_finite_weights)."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
    from transformers.trainer_pt_utils import nested_gather

    limit = trainer.args.save_total_limit
    trainer.args.save_total_limit = None  # the Trainer's own rotation runs before the other ranks finish
    resumed = _resume_attributes(resume)

    class ResumeState(TrainerCallback, ExportableState):
        saved: dict = {}

        def state(self) -> dict:
            return {"args": {}, "attributes": dict(self.saved)}

        def on_train_begin(self, targs, state, control, **kwargs):
            state.stateful_callbacks.setdefault(RESUME_STATE, {})  # a checkpoint from before this callback
            if resumed:
                trainer._total_loss_scalar = float(resumed.get("loss_sum", 0.0))
                trainer._tr_loss += float(resumed.get("loss_partial", 0.0))
                trainer._globalstep_last_logged = int(resumed.get("last_logged_step", state.global_step))

        def on_save(self, targs, state, control, **kwargs):
            barrier()  # every process has written its files before the oldest are judged
            for old in rotate_checkpoints(targs.output_dir, limit):
                log.info("--save_total_limit %s: removed %s", limit, old.name)

    callback = ResumeState()
    trainer.add_callback(callback)
    save_checkpoint, run_epoch = trainer._save_checkpoint, trainer._run_epoch

    def _save_checkpoint(*a, **k):
        check_finite_weights(trainer.model, trainer.state.global_step, trainer.args.device)
        # Every process takes part in the gather; the main process then writes it with the state.
        partial = nested_gather(trainer._tr_loss.detach().clone(), trainer.args.parallel_mode).mean().item()
        callback.saved = {"world_size": trainer.args.world_size, "loss_sum": trainer._total_loss_scalar,
                          "loss_partial": partial, "last_logged_step": trainer._globalstep_last_logged}
        return save_checkpoint(*a, **k)

    def _run_epoch(*a, **k):
        if 0 < trainer.state.max_steps <= trainer.state.global_step:  # resumed from the last step
            trainer.control.should_training_stop = True
            return None
        return run_epoch(*a, **k)

    trainer._save_checkpoint, trainer._run_epoch = _save_checkpoint, _run_epoch
    if trainer.args.train_sampling_strategy == "group_by_length":
        from transformers import Trainer

        if type(trainer)._get_train_sampler is Trainer._get_train_sampler:
            trainer._get_train_sampler = lambda dataset=None: _epoch_seeded_sampler(trainer, dataset)


def _resume_attributes(resume: Optional[str]) -> dict:
    if not resume:
        return {}
    try:
        state = json.loads((Path(resume) / "trainer_state.json").read_text(encoding="utf-8"))
        return dict(state.get("stateful_callbacks", {}).get(RESUME_STATE, {}).get("attributes", {}))
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _epoch_seeded_sampler(trainer, dataset=None):
    """transformers' LengthGroupedSampler with its shuffle drawn from (seed, epoch): the epoch is read
    from the trainer state when the epoch's iterator is made (a resumed epoch reads the same number)."""
    import torch
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    base = Trainer._get_train_sampler(trainer, dataset)
    if not isinstance(base, LengthGroupedSampler):
        return base
    seed = trainer.args.data_seed if trainer.args.data_seed is not None else trainer.args.seed

    class EpochSeeded(LengthGroupedSampler):
        def __iter__(self):
            epoch = int(trainer.state.epoch or 0)
            self.generator = torch.Generator().manual_seed(seed + epoch)
            return super().__iter__()

    sampler = EpochSeeded(base.batch_size, lengths=base.lengths)
    return sampler


def whole_run_loss(trainer, metrics: dict[str, Any]) -> None:
    """`train_loss` over every step of the run, also when it was resumed (the Trainer's covers only the
    steps since the resume); the closing entry of the log history is set to the same value."""
    steps = trainer.state.global_step
    if not steps or "train_loss" not in metrics:
        return
    loss = trainer._total_loss_scalar / steps
    metrics["train_loss"] = loss
    for entry in reversed(trainer.state.log_history):
        if "train_loss" in entry:
            entry["train_loss"] = loss
            break


# Private library members this project relies on ---------------------------------------------

# "module" or "module:Class" -> the members the code named beside it reads, overrides or patches. Read by
# tests only (check_private_api), never at run time. A member counts as there when it is an attribute or
# when the source of the class (with its bases) or module names it: instance attributes such as
# Trainer._tr_loss exist only once training starts.
PRIVATE_API: dict[str, tuple[str, ...]] = {
    # exact_resume, whole_run_loss (above)
    "transformers.trainer:Trainer": ("_save_checkpoint", "_run_epoch", "_get_train_sampler", "_tr_loss",
                                     "_total_loss_scalar", "_globalstep_last_logged"),
    # _epoch_seeded_sampler: the shuffle is drawn from `self.generator`
    "transformers.trainer_pt_utils:LengthGroupedSampler": ("generator", "lengths", "batch_size"),
    # one_tensorboard_run
    "transformers.integrations:TensorBoardCallback": ("_init_summary_writer", "_SummaryWriter", "tb_writer",
                                                      "logging_dir"),
    # progress.readable_progress: the bars the ProgressCallback hooks it keeps still update
    "transformers.trainer_callback:ProgressCallback": ("training_bar", "prediction_bar", "current_step"),
    # rlhf/grpo.py sft_prompt_tokens; summary.summary reads `_total_train_tokens` of every trainer that counts
    "trl:GRPOTrainer": ("_tokenize_prompts", "_total_train_tokens"),
    # rlhf/reward.py pooled_accuracy_trainer
    "trl:RewardTrainer": ("_metrics", "_total_train_tokens"),
    "trl:SFTTrainer": ("_total_train_tokens",),
    "trl:DPOTrainer": ("_total_train_tokens",),
    "trl:KTOTrainer": ("_total_train_tokens",),
    # rlhf/pair_tokens.py aligned
    "trl.experimental.orpo:ORPOTrainer": ("tokenize_row", "is_encoder_decoder", "max_length"),
    "trl.experimental.cpo:CPOTrainer": ("tokenize_row", "is_encoder_decoder", "max_length"),
    # rlhf/preference.py quiet_trl_balance_warning: the logger and the start of the warning it drops
    "trl.trainer.kto_trainer": ("logger", "You have different amounts of desirable"),
    # common/model/loss.py install: the forward TRL puts on the model, called with `fused_lm_head=True`
    "trl.trainer.utils": ("add_fused_lm_head", "FusedCausalLMOutput", "fused_lm_head"),
    # common/evaluation/generation.py plain_lora_forward
    "peft.tuners.lora.layer:Linear": ("base_layer", "lora_A", "lora_B", "lora_variant", "scaling", "merged",
                                      "disable_adapters", "active_adapters", "active_adapter"),
    "torch.nn:Module": ("_forward_hooks", "_forward_pre_hooks"),
    # common/model/dropout.py: a tensor's in-place version counter
    "torch:Tensor": ("_version",),
    # common/flags/parser.py, comparison/run.py: the flags a parser declares
    "argparse:ArgumentParser": ("_actions",),
}


def check_private_api(table: Optional[dict[str, tuple[str, ...]]] = None) -> list[str]:
    """-> 'owner.member (package version)' for each member of `table` (PRIVATE_API) that the installed
    libraries lack; a module or class that is gone is named alone."""
    import importlib

    missing = []
    for owner, members in (PRIVATE_API if table is None else table).items():
        module_name, _, class_name = owner.partition(":")
        version = _installed_version(module_name)
        try:
            found = importlib.import_module(module_name)
            found = getattr(found, class_name) if class_name else found
        except (ImportError, AttributeError):
            missing.append(f"{owner} ({version})")
            continue
        source = _source(found)
        missing += [f"{owner}.{member} ({version})" for member in members
                    if not hasattr(found, member) and not re.search(rf"\b{re.escape(member)}\b", source)]
    return missing


def _source(found) -> str:
    import inspect

    parts = []
    for part in (found.__mro__[:-1] if inspect.isclass(found) else (found,)):  # [:-1]: not `object`
        try:
            parts.append(inspect.getsource(part))
        except (OSError, TypeError):  # built in (torch.Tensor's C base)
            pass
    return "\n".join(parts)


def _installed_version(module_name: str) -> str:
    import importlib.metadata
    import platform
    import sys

    package = module_name.split(".")[0]
    if package in sys.stdlib_module_names:
        return f"Python {platform.python_version()}"
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{package} not installed"
