"""What a run prints: the progress bar, one readable line per logging step and the summary.

tqdm reads TQDM_MININTERVAL once, when it is imported, and transformers' logging has no filter
by message: a run decides from its stderr at start how often bars redraw, so the interval is
passed to each bar here, and library messages that tell the user nothing they can act on are
dropped here, each for a stated reason; every other warning stays visible.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# Progress bars where stderr is a log file, not a terminal -----------------------------------------
# A bar redraws itself in place with carriage returns; in a file each redraw is appended to one
# ever-longer line, and a bar drawn below another moves the cursor with escape codes a file shows
# as `^[[A`. So, in a log: the training, PPO and answering bars are redrawn at most every
# LOG_BAR_INTERVAL seconds; the evaluation bar drawn under the training bar is left out (its result
# is the log line that follows); so are the libraries' bars for each dataset pass and for loading
# weights. A notebook's `!python ...` runs under a pseudo-terminal, but a cell's output area
# understands carriage returns and nothing else: there, the training bar is the only bar (no bar
# drawn under it, no library bars) and is redrawn at most every NOTEBOOK_BAR_INTERVAL seconds.
LOG_BAR_INTERVAL = 30.0
NOTEBOOK_BAR_INTERVAL = 1.0

TERMINAL_VAR = "FINETUNE_TERMINAL"  # set by compare.py for the runs it starts, whose output it relays
NOTEBOOK_VAR = "FINETUNE_NOTEBOOK"  # 1 or 0 overrides the detection below


def in_notebook() -> bool:
    """Whether this process runs in a notebook cell (`!python ...`): Jupyter starts its kernels with
    JPY_PARENT_PID set, and ipykernel exports its inline MPLBACKEND; both reach the cell's commands."""
    forced = os.environ.get(NOTEBOOK_VAR)
    if forced in ("0", "1"):
        return forced == "1"
    backend = os.environ.get("MPLBACKEND", "")
    return "JPY_PARENT_PID" in os.environ or "matplotlib_inline" in backend or "ipykernel" in backend


def interactive(stream=None) -> bool:
    """Whether `stream` (stderr, where the bars go) is a terminal someone watches, or compare.py
    relays this run's output to one."""
    if os.environ.get(TERMINAL_VAR) == "1":
        return True
    try:
        return (stream or sys.stderr).isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(**kwargs):
    """A tqdm bar as in a terminal; in a log, redrawn every LOG_BAR_INTERVAL seconds at most (and
    at least: tqdm's monitor thread otherwise forces a redraw after 10 s)."""
    from tqdm.auto import tqdm

    if not interactive():
        kwargs.setdefault("mininterval", LOG_BAR_INTERVAL)
        kwargs.setdefault("maxinterval", LOG_BAR_INTERVAL)
    elif in_notebook():
        kwargs.setdefault("mininterval", NOTEBOOK_BAR_INTERVAL)
    return tqdm(**kwargs)


def nested_bars() -> bool:
    """Whether bars may be drawn under another bar, and the libraries may draw theirs (see above)."""
    return interactive() and not in_notebook()


def quiet_libraries() -> None:
    """Called once per run, before the libraries are imported."""
    if not nested_bars():  # the libraries' bars for dataset passes and weight loading (see above)
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # trl.experimental (ORPO, CPO/SimPO) announces on import that its API may change: a note to us, the
    # developers who pinned TRL, not to the user.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # PEFT's prefix tuning hands the model its prefix as `past_key_values`, which transformers 5.24
    # deprecates on every forward pass; nothing for a user to change.
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
    logging.getLogger("transformers.modeling_utils").addFilter(_load_report)
    # TRL's DPO trainer still calls `gradient_checkpointing_disable/enable` around its reference
    # pass, which transformers 5.24 deprecates; nothing for a user to change.
    warnings.filterwarnings("ignore", message=r"`gradient_checkpointing_(enable|disable)` is deprecated",
                            category=FutureWarning)
    # bitsandbytes fetches an optional CPU kernel through the `kernels` package, which says on every run
    # that it skips a trust check because of the offline mode these scripts set themselves.
    logging.getLogger("kernels._internals.hf_hub").addFilter(_dropping("Skipping publisher trust check"))
    # DeepSpeed calls torch.distributed collectives that torch 2.13 renamed, with a warning at each call.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # DeepSpeed, where installed, announces on import that a machine without a GPU is one without a GPU.
    logging.getLogger("DeepSpeed").addFilter(_dropping("Setting accelerator to CPU"))


def _dropping(start: str):
    """A logging filter that drops the records whose message starts with `start`."""
    return lambda record: not record.getMessage().startswith(start)


def _load_report(record: logging.LogRecord) -> bool:
    """transformers' LOAD REPORT table: dropped when it only says what a reward model's load must do
    (a new `score` head, the unused `lm_head`); otherwise kept, without raw colour codes."""
    message = record.getMessage()
    if "LOAD REPORT" not in message:
        return True
    rows = re.findall(r"^(\S+)\s*\|\s*(MISSING|UNEXPECTED|MISMATCH\w*)", _ANSI.sub("", message), re.MULTILINE)
    if rows and all((status == "MISSING" and key.startswith("score.")) or
                    (status == "UNEXPECTED" and key.startswith("lm_head.")) for key, status in rows):
        return False
    record.msg, record.args = _ANSI.sub("", message), ()
    return True


def checkpointing_kwargs(enabled: bool) -> dict:
    """Gradient checkpointing for a TrainingArguments, under the name this transformers uses
    (`activation_checkpointing` since 5.24; `gradient_checkpointing` before)."""
    from transformers import TrainingArguments

    name = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    # Under ZeRO-3 (a shipped config), TRL's trainers switch a PEFT model to the reentrant variant
    # with a warning the user can do nothing about: asked for here, it comes without one. Elsewhere
    # the non-reentrant one, which torch recommends.
    from common.model.precision import deepspeed_launch

    zero3 = deepspeed_launch() and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    return {f"{name}_checkpointing": enabled,
            f"{name}_checkpointing_kwargs": {"use_reentrant": zero3} if enabled else None}


# The console's log line: these keys, in this order, where logged (everything logged still goes to
# trainer_state.json, the reporters and the plots).
LINE_KEYS = ("loss", "grad_norm", "learning_rate", "rewards/accuracies", "rewards/margins", "eval_loss",
             "eval_em", "eval_f1", "eval_accuracy", "eval_rewards/accuracies", "eval_rewards/margins")


# ppo.py's line: what tells a user whether PPO is working.
PPO_LINE_KEYS = ("score", "kl", "policy_loss", "value_loss", "learning_rate")


def log_line(logs: dict, step: int, max_steps: int, keys=LINE_KEYS) -> str | None:
    """One readable line for a Trainer log record; None for the end-of-training totals (the run
    summary says them) and records with nothing to show."""
    if "train_loss" in logs:  # the end-of-training totals
        return None
    parts = []
    for key in keys:
        value = logs.get(key)
        if isinstance(value, (int, float)):
            name = key.replace("rewards/", "")
            parts.append(f"{name} {value:.2e}" if key == "learning_rate" else f"{name} {value:.4g}")
    if not parts:
        return None
    epoch = logs.get("epoch")
    where = f"step {step}/{max_steps}" + (f" (epoch {epoch:.2f})" if isinstance(epoch, (int, float)) else "")
    return where + ": " + ", ".join(parts)


def readable_progress(trainer) -> None:
    """Replace the Trainer's printing of raw metric dicts with `log_line`; the bar stays."""
    from transformers.trainer_callback import ProgressCallback
    from transformers.trainer_utils import has_length

    class ReadableProgress(ProgressCallback):
        pending: dict = {}  # what was logged at the current step, printed as one line when the step is over

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.training_bar = progress_bar(total=state.max_steps, dynamic_ncols=True)
            self.current_step = 0

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            # No bar under the training bar where it cannot be drawn there; in a notebook no bar at all.
            if in_notebook() or (self.training_bar is not None and not interactive()):
                return
            if state.is_world_process_zero and has_length(eval_dataloader):
                if self.prediction_bar is None:
                    self.prediction_bar = progress_bar(total=len(eval_dataloader), leave=self.training_bar is None,
                                                       dynamic_ncols=True)
                self.prediction_bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            # The step's training loss, its evaluation and its exact match arrive as separate records:
            # one line for all of them, written when the step is over.
            if state.is_world_process_zero and self.training_bar is not None and logs and "train_loss" not in logs:
                if self.pending and self.pending["step"] != state.global_step:
                    self.flush(state)
                self.pending = {**self.pending, **logs, "step": state.global_step}

        def flush(self, state):
            pending, self.pending = self.pending, {}
            line = pending and log_line(pending, pending["step"], state.max_steps)
            if line and self.training_bar is not None:
                self.training_bar.write(line)

        def on_step_begin(self, args, state, control, **kwargs):
            self.flush(state)

        def on_train_end(self, args, state, control, **kwargs):
            self.flush(state)
            super().on_train_end(args, state, control, **kwargs)

    if any(type(cb) is ProgressCallback for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ReadableProgress)


def say(line: str) -> None:
    """One line on stderr, on a line of its own even while a progress bar is drawn."""
    if "tqdm" in sys.modules:  # a bar may be on screen: tqdm clears it, writes, and redraws it
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)
