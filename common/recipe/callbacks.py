"""Trainer callbacks every run adds: the NaN guard (the loss, and the weights before any save, which
ppo.py checks too), run_config.json in each checkpoint, exact match during training."""

from __future__ import annotations

import math
from pathlib import Path

from common.flags.parser import ParsedArgs
from common.recipe.outputs import RUN_CONFIG, write_json
from common.recipe.run_config import run_config

# Callbacks -----------------------------------------------------------------------------------


def nan_guard_callback():
    """Stops the run when the loss turns NaN/inf instead of training on garbage, and when the weights
    do after step 1 (the loss logged for step 1 comes from before its update: the loss alone sees an
    update that overflowed only at step 2)."""
    from transformers import TrainerCallback

    class NanGuard(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1 and model is not None:
                check_finite_weights(model, state.global_step, args.device)

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise NonFiniteLoss(
                    f"the training loss became {loss} at step {state.global_step}; lower `--learning_rate`, keep "
                    f"`--max_grad_norm` on, or use `--use_bfloat16` instead of fp16."
                )

    return NanGuard()


def run_config_callback(args: ParsedArgs, technique: str):
    """Writes run_config.json into every checkpoint-N the trainer saves: a checkpoint evaluated,
    merged or chained from is then prompted exactly as the run trained (template, system prompt,
    chat template, quantization), like the final output directory."""
    from transformers import TrainerCallback

    class RunConfigInCheckpoints(TrainerCallback):
        def on_save(self, targs, state, control, model=None, **kwargs):
            folder = Path(targs.output_dir) / f"checkpoint-{state.global_step}"
            if not state.is_world_process_zero or not folder.is_dir():
                return
            from common.model.loading import is_quantized

            extra = {"model": {"quantized": bool(model is not None and is_quantized(model))},
                     "checkpoint": {"step": state.global_step}}
            try:
                write_json(folder / RUN_CONFIG, run_config(args, technique, extra))
            except Exception:
                # Without it the checkpoint would resume but be evaluated with the wrong prompt format:
                # it does not count as complete (trainer_state.json, written before, makes it so).
                (folder / "trainer_state.json").unlink(missing_ok=True)
                raise

    return RunConfigInCheckpoints()


class SaveClock:
    """`--save_minutes`: whether a checkpoint is due because N minutes have passed since the last
    one (or the start). Every process must save together, so one process's clock decides for all."""

    def __init__(self, minutes):
        import time

        self.seconds = None if minutes is None else float(minutes) * 60
        self.last = time.monotonic()

    def due(self, device) -> bool:
        import time

        from common.recipe.signals import on_any_process

        return self.seconds is not None and on_any_process(time.monotonic() - self.last >= self.seconds, device)

    def saved(self) -> None:
        import time

        self.last = time.monotonic()


def timed_save_callback(minutes):
    """The Trainer's side of `--save_minutes` (ppo.py asks its SaveClock itself)."""
    from transformers import TrainerCallback

    class TimedSave(TrainerCallback):
        clock = SaveClock(minutes)

        def on_train_begin(self, targs, state, control, **kwargs):
            self.clock.saved()  # counted from the start of training, not from loading the model

        def on_step_end(self, targs, state, control, **kwargs):
            if self.clock.due(targs.device):
                control.should_save = True

        def on_save(self, targs, state, control, **kwargs):
            self.clock.saved()

    return TimedSave()


class NonFiniteLoss(RuntimeError):
    pass


def _held(param):
    """The values of `param` this process holds: all of them, or under ZeRO-3 its part (`ds_tensor`)
    without the padding that makes the parts equal (uninitialised memory, NaN at times)."""
    part = getattr(param, "ds_tensor", None)
    if part is None:
        return param
    import torch.distributed as dist

    size = part.numel()
    return part.narrow(0, 0, max(0, min(size, param.ds_numel - dist.get_rank() * size)))


def check_finite_weights(model, step: int, device=None) -> None:
    """Raises NonFiniteLoss when a trainable weight holds NaN or inf on any process. Called before
    every save (a checkpoint, the final outputs), so that nothing saved from such weights looks usable:
    the loss guard sees them only at the next logged loss."""
    import torch

    from common.recipe.signals import on_any_process

    bad = next((name for name, p in model.named_parameters()
                if p.requires_grad and not bool(torch.isfinite(_held(p)).all())), None)
    if on_any_process(bad is not None, device):
        raise NonFiniteLoss(f"the trained weights became NaN or infinite at step {step}" + (f" ({bad})" if bad else "")
                            + "; nothing was saved from them. Lower `--learning_rate`, keep `--max_grad_norm` on, "
                              "or use `--use_bfloat16` instead of fp16.")


def exact_match_callback(rows, fmt, tokenizer, batch_size: int):
    """Scores TriviaQA EM/F1 by greedy generation on held-out rows at each evaluation; `score()`
    is also called once at the end of training. Results go to the reporter and the final metrics."""
    from transformers import TrainerCallback

    from common.evaluation.answers import evaluate_qa

    class ExactMatch(TrainerCallback):
        trainer = None

        def score(self, model) -> dict:
            summary, _ = evaluate_qa(model, tokenizer, rows, fmt, batch_size=batch_size)
            return {"eval_em": summary["exact_match"], "eval_f1": summary["f1"]}

        def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
            result = self.score(model)
            if metrics is not None:
                metrics.update(result)
            if self.trainer is not None:
                self.trainer.log(result)

    return ExactMatch()
