"""What every training script shares around its trainer: reporters, the trainer config, stop
signals, run_config.json and the closing summary. Output directories, checkpoints and the final
save live in common/outputs.py (their names stay importable from here)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import resource
import shlex
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from common.args import ParsedArgs, UsageError, reporters
from common.outputs import (RESUME_STATE, RUN_CONFIG, WEIGHT_FILES, _absolute_base_path,  # noqa: F401
                            checkpoint_dirs, clear_previous_run, disk_full_error, is_complete_checkpoint,
                            is_disk_full, is_finished_run, is_main_process, last_complete_checkpoint,
                            move_into_place, prepare_output_dir, release_output_locks, resolve_resume,
                            rotate_checkpoints, save_final, world_size, write_json)
from common.quiet import checkpointing_kwargs, readable_progress

log = logging.getLogger("finetune")
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
_SECRET_KEY = re.compile(r"(^|_)(token|api_key|apikey|secret|password)$", re.IGNORECASE)


def setup_logging(script: str) -> None:
    level = logging.INFO if is_main_process() else logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{script}: %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    # On CPUs with AVX-512 BF16, importing bitsandbytes warns that an optional kernel could not be
    # fetched from the Hub; 4-bit layers work without it, so the warning is only noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # PEFT and TRL still read `model.is_gradient_checkpointing`, which transformers 5.24 deprecates
    # on every access; nothing for a user to change.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    from common.quiet import quiet_libraries

    quiet_libraries()


# Reporting -----------------------------------------------------------------------------------

def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def setup_reporting(args: ParsedArgs, out: str) -> list[str]:
    """-> `report_to` for the trainer. wandb without credentials or network runs offline, never prompts."""
    if args.hub_token:
        os.environ["HF_TOKEN"] = args.hub_token
    chosen = [r for r in reporters(args.report_to) if r != "none"]
    if "wandb" in chosen:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UsageError("`--report_to wandb`: the wandb package is not installed; `pip install wandb`.") from None
        os.environ.setdefault("WANDB_DIR", os.path.abspath(out))  # absolute: the wandb service has its own cwd
        mode = os.environ.get("WANDB_MODE", "").lower()
        if mode not in ("offline", "disabled", "dryrun"):
            if not _wandb_credentials():
                os.environ["WANDB_MODE"] = "offline"
                log.warning("wandb: no credentials (WANDB_API_KEY or `wandb login`); logging offline to %s/wandb. "
                            "Upload later with `wandb sync %s/wandb/offline-run-*`.", out, out)
            elif not _reachable("api.wandb.ai"):
                os.environ["WANDB_MODE"] = "offline"
                log.warning("wandb: api.wandb.ai is unreachable; logging offline to %s/wandb. Upload later with "
                            "`wandb sync %s/wandb/offline-run-*`.", out, out)
        elif mode in ("offline", "dryrun"):
            log.info("wandb: offline mode; runs are written to %s/wandb.", out)
    return chosen or ["none"]


# Trainer config ------------------------------------------------------------------------------

def trainer_kwargs(args: ParsedArgs, out: str, precision_mode: str, report_to: list[str],
                   has_eval: bool) -> dict[str, Any]:
    """Our flags -> keyword arguments shared by TRL's configs (SFTConfig, DPOConfig, ...)."""
    warmup = args.warmup_steps if args.warmup_steps > 0 else args.warmup_ratio
    kwargs: dict[str, Any] = dict(
        output_dir=out,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        **checkpointing_kwargs(args.gradient_checkpointing),
        optim=args.optimizer,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        warmup_steps=warmup,
        lr_scheduler_type=args.lr_scheduler_type,
        logging_steps=args.logging_steps,
        # The default logs a NaN/inf loss as the mean of earlier ones (0.0 after a log): the NaN guard
        # would never see it and a diverged run would end with exit 0 and NaN weights.
        logging_nan_inf_filter=False,
        save_strategy=args.save_strategy,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        eval_strategy=args.eval_strategy if has_eval else "no",
        eval_steps=args.eval_steps or args.logging_steps,
        seed=args.seed,
        data_seed=args.seed,
        bf16=precision_mode == "bf16",
        fp16=precision_mode == "fp16",
        report_to=report_to,
        run_name=args.run_name or Path(out).name,
        push_to_hub=False,  # uploaded by finish_run once the result is saved locally (common/hub.py)
        hub_model_id=args.hub_model_id,
        hub_token=None,  # taken from HF_TOKEN: the trainer pickles its arguments into every checkpoint
        use_liger_kernel=args.use_liger_kernel,
        neftune_noise_alpha=args.neftune_noise_alpha,
        dataloader_num_workers=args.dataloader_num_workers,
        ddp_find_unused_parameters=args.ddp_find_unused_parameters,
        train_sampling_strategy=args.train_sampling_strategy,
        save_only_model=False,
        disable_tqdm=not is_main_process(),
        dataloader_pin_memory=_cuda(),
        # Without an accelerator, `use_cpu` is what makes torchrun/accelerate launches train as one
        # gloo process group instead of N independent runs.
        use_cpu=not _cuda() and not _mps(),
    )
    return kwargs


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _mps() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


# Callbacks -----------------------------------------------------------------------------------

def nan_guard_callback():
    """Stops the run when the loss turns NaN/inf instead of training on garbage."""
    from transformers import TrainerCallback

    class NanGuard(TrainerCallback):
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
            from common.model import is_quantized

            extra = {"model": {"quantized": bool(model is not None and is_quantized(model))},
                     "checkpoint": {"step": state.global_step}}
            write_json(folder / RUN_CONFIG, run_config(args, technique, extra))

    return RunConfigInCheckpoints()


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a checkpoint was saved; the script exits with
    128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int = 2):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """Set by the first SIGINT or SIGTERM: the run stops after its current step, with a checkpoint."""

    signum: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


def _signal_name(signum: int) -> str:
    import signal

    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


@contextlib.contextmanager
def stop_requests():
    """While training: the first SIGINT (Ctrl-C) or SIGTERM (a notebook's stop button, a batch
    scheduler's pre-emption) asks for a checkpoint after the current step; the same signal again
    stops at once. torchrun answers Ctrl-C with a SIGTERM to its workers, which is not "again"."""
    import signal
    import threading

    request = StopRequest()

    def handler(signum, frame):
        if request.signum == signum:
            raise KeyboardInterrupt
        if request.signum is None:
            request.signum = signum
            log.warning("%s: saving a checkpoint after this step; %s again to stop at once without one.",
                        _signal_name(signum), "press Ctrl-C" if signum == signal.SIGINT else "send it")

    # Only the main thread may set signal handlers; elsewhere signals keep their usual effect.
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def announce_stop(args: ParsedArgs, step: int, checkpoint: Path, request: StopRequest) -> None:
    """After the stop checkpoint is written: say where and how to resume, then raise Interrupted."""
    if is_main_process():
        say(f"{args.script}: stopped at step {step}; checkpoint saved in {checkpoint}. Resume with: "
            f"{resume_command(args)}")
    raise Interrupted(request.signum or 2)


@contextlib.contextmanager
def save_on_interrupt(trainer, args: ParsedArgs):
    """Around trainer.train(): the first Ctrl-C (or SIGTERM) lets the current step finish, saves a
    checkpoint (output_dir/checkpoint-<step> with the trainer state, which `--resume_from_checkpoint
    auto` picks), prints the command that resumes and raises Interrupted. A second one stops at once."""
    from transformers import TrainerCallback

    class StopAfterStep(TrainerCallback):
        stopped_at: Optional[int] = None

        def __init__(self, request: StopRequest):
            self.request = request

        def on_step_end(self, targs, state, control, **kwargs):
            if on_any_process(self.request.requested, targs.device):  # every process stops at the same step
                self.stopped_at = state.global_step
                control.should_log = control.should_save = control.should_training_stop = True

    with stop_requests() as request:
        stop = StopAfterStep(request)
        trainer.add_callback(stop)
        try:
            yield
        finally:
            trainer.remove_callback(stop)
    if stop.stopped_at is not None:
        announce_stop(args, stop.stopped_at, Path(trainer.args.output_dir) / f"checkpoint-{stop.stopped_at}",
                      request)


def on_any_process(flag: bool, device) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def resume_command(args: ParsedArgs) -> str:
    """This run's command line with `--resume_from_checkpoint auto` (secret flags and
    `--overwrite_output_dir`, which contradicts resuming, left out)."""
    drop = {"resume_from_checkpoint", "overwrite_output_dir", *args.secret_fields()}
    if Path(sys.argv[0]).name == args.script:  # run from the command line: keep the user's spelling
        script, rest, argv, i = sys.argv[0], sys.argv[1:], [], 0
        while i < len(rest):
            token, i = rest[i], i + 1
            if token.startswith("--") and token[2:].split("=", 1)[0] in drop:
                if "=" not in token and i < len(rest) and not rest[i].startswith("--"):
                    i += 1  # its value
                continue
            argv.append(token)
        if args.overwrite_output_dir and not any(t.startswith("--overwrite_output_dir") for t in rest):
            argv += ["--overwrite_output_dir", "False"]  # it came from --config; the command line wins
    else:  # called as main(argv): rebuild from the flags that were set
        flags = args.to_dict()
        script, argv = args.script, [x for n in sorted(args.explicit - drop) for x in (f"--{n}", str(flags[n]))]
    return shlex.join([*_launcher(), script, *argv, "--resume_from_checkpoint", "auto"])


def _launcher() -> list[str]:
    """`python`, or a torchrun line with this run's process count when several processes run
    (torchrun and `accelerate launch` both set these variables; on several nodes, add the
    rendezvous flags you launched with)."""
    world = world_size()
    if world <= 1:
        return ["python"]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    nodes = [f"--nnodes={world // local}"] if world > local else []
    return ["torchrun", *nodes, f"--nproc_per_node={local}"]


def exact_match_callback(rows, fmt, tokenizer, batch_size: int):
    """Scores TriviaQA EM/F1 by greedy generation on held-out rows at each evaluation; `score()`
    is also called once at the end of training. Results go to the reporter and the final metrics."""
    from transformers import TrainerCallback

    from common.evaluation import evaluate_qa

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


# Saving --------------------------------------------------------------------------------------

def redact(value: Any, secret_keys: set[str]) -> Any:
    secrets = [os.environ[k] for k in SECRET_ENV if os.environ.get(k)]

    def scrub(v: Any, key: str = "") -> Any:
        if isinstance(v, dict):
            return {k: scrub(x, k) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [scrub(x, key) for x in v]
        if v is not None and (key in secret_keys or _SECRET_KEY.search(key)):
            return "***"
        if isinstance(v, str):
            for s in secrets:
                if s and s in v:
                    v = v.replace(s, "***")
        return v

    return scrub(value)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_config(args: ParsedArgs, technique: str, extra: dict[str, Any]) -> dict[str, Any]:
    argv = [a for a in sys.argv]
    return redact({
        "script": args.script,
        "technique": technique,
        "flags": args.to_dict(),
        "explicit_flags": sorted(args.explicit),
        "command": argv,
        "versions": library_versions(),
        **extra,
    }, args.secret_fields())


def finish_reporting(report_to: list[str]) -> None:
    """Close the wandb run so that the next run in this process (tests, chained runs) starts its own."""
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()  # settings (WANDB_DIR, mode) are read again by the next run


def write_plots(out: str) -> None:
    """Training curves into out/plots; a plotting problem never fails a finished run."""
    if not is_main_process():
        return
    try:
        from common.plotting import plot_run

        paths = plot_run(out)
        if paths:
            log.info("plots: %s", ", ".join(str(p) for p in paths))
    except Exception as exc:  # matplotlib missing or a backend problem
        log.warning("could not draw the training curves (%s); `python -m common.plotting %s` retries.", exc, out)


# Summary -------------------------------------------------------------------------------------

def peak_memory_gib() -> tuple[float, str]:
    """(GiB, what was measured): this process's peak allocated GPU memory, or its peak RSS on the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "GPU (allocated)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return rss_bytes / 2**30, "process RSS"


def peak_memory() -> str:
    gib, kind = peak_memory_gib()
    return f"{gib:.2f} GiB {kind}"


def summary(trainer, metrics: dict[str, Any], out: str, wall: float) -> dict[str, Any]:
    tokens = getattr(trainer, "_total_train_tokens", 0) or 0
    runtime = metrics.get("train_runtime") or wall
    info = {
        "steps": trainer.state.global_step,
        "train_loss": metrics.get("train_loss"),
        "runtime_s": round(runtime, 2),
        "tokens_trained": int(tokens) or None,  # None: this trainer does not count them (ORPO, SimPO)
        "tokens_per_s": round(tokens / runtime, 1) if runtime and tokens else None,
        "peak_memory": peak_memory(),
        "peak_memory_gib": round(peak_memory_gib()[0], 3),  # the same figure as a number (compare.py)
        "output_dir": os.path.abspath(out),
    }
    return info


def train_guarded(trainer, args: ParsedArgs, out: str,
                  technique: Optional[str] = None) -> tuple[dict[str, Any], float]:
    """trainer.train(), resuming as `--resume_from_checkpoint` asks, with a checkpoint on Ctrl-C or
    SIGTERM and a non-finite loss turned into a one-line error; every checkpoint carries
    run_config.json; -> (metrics, wall seconds)."""
    trainer.add_callback(run_config_callback(args, technique or Path(args.script).stem))
    resume = resolve_resume(args, out)
    exact_resume(trainer, resume)
    one_tensorboard_run(trainer)
    readable_progress(trainer)  # one readable line per logging step instead of raw dicts
    with Timer() as timer, save_on_interrupt(trainer, args):
        try:
            result = trainer.train(resume_from_checkpoint=resume)
        except NonFiniteLoss as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(out, resume_command(args)) from None
            raise
    metrics = dict(result.metrics)
    whole_run_loss(trainer, metrics)
    return metrics, timer.elapsed


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
    - `--save_total_limit` counts complete checkpoints only, after every process has written."""
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
            _barrier()  # every process has written its files before the oldest are judged
            for old in rotate_checkpoints(targs.output_dir, limit):
                log.info("--save_total_limit %s: removed %s", limit, old.name)

    callback = ResumeState()
    trainer.add_callback(callback)
    save_checkpoint, run_epoch = trainer._save_checkpoint, trainer._run_epoch

    def _save_checkpoint(*a, **k):
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


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _epoch_seeded_sampler(trainer, dataset=None):
    """transformers' LengthGroupedSampler with its shuffle drawn from (seed, epoch): the epoch is read
    from the trainer state when the epoch's iterator is made (a resumed epoch reads the same number)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from transformers import Trainer

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


def finish_run(trainer, tokenizer, args: ParsedArgs, out: str, technique: str, metrics: dict[str, Any],
               wall: float, extra: dict[str, Any], report_to: list[str], drop_adapters: tuple = (),
               more_summary: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The end of every Trainer-based run: metrics and trainer state, the final outputs written
    atomically with run_config.json (`extra` plus the summary), reporters closed, plots, summary."""
    info = {**summary(trainer, metrics, out, wall), **(more_summary or {})}
    try:
        trainer.save_metrics("all", metrics)
        trainer.save_state()
        save_final(trainer, tokenizer, out, run_config(args, technique, {**extra, "summary": info}),
                   drop_adapters=drop_adapters)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(out, resume_command(args)) from None
        raise
    finish_reporting(report_to)
    write_plots(out)
    print_summary(info)
    push_when_asked(args, out)
    return info


def push_when_asked(args: ParsedArgs, out: str) -> None:
    """`--push_to_hub`: upload the finished output directory, from the main process only."""
    if args.push_to_hub and is_main_process():
        from common.hub import push_result

        repo = push_result(args, out)  # UploadFailed: run_cli says so and exits with hub.UPLOAD_FAILED
        log.info("uploaded to the hub: %s", repo)


def print_summary(info: dict[str, Any]) -> None:
    if not is_main_process():
        return
    loss = info.get("train_loss")
    lines = [
        "",
        "── run summary " + "─" * 40,
        f"  steps        {info['steps']}",
        f"  train loss   {loss:.4f}" if isinstance(loss, float) else "  train loss   n/a",
        f"  runtime      {info['runtime_s']:.1f} s",
        f"  tokens/s     {info['tokens_per_s']} ({info['tokens_trained']} non-padding tokens)" if info.get(
            "tokens_trained") else "  tokens/s     not counted by this trainer",
        f"  peak memory  {info['peak_memory']}",
        f"  written to   {info['output_dir']}  (adapter, tokenizer, {RUN_CONFIG}, metrics)",
    ]
    print("\n".join(lines), flush=True)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.start


def run_cli(script: str, train_fn, leave_group: bool = True) -> int:
    """A training script's main(): user mistakes are one line and exit 2; Ctrl-C exits 130.
    No network unless a hub id is given (common/network.py). After a finished run the process
    group is left (`leave_group=False` for a caller that runs several jobs in one process and
    leaves it after the last)."""
    from common import hub, network

    setup_logging(script)
    network.start_offline()
    try:
        train_fn()
        code = 0
    except UsageError as exc:
        say(f"{script}: error: {exc}")
        code = 2
    except hub.UploadFailed as exc:
        say(f"{script}: upload failed: {exc}")
        code = hub.UPLOAD_FAILED
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted):  # announce_stop already said how to resume
            return 128 + exc.signum
        say(f"{script}: interrupted.")
        return 130
    finally:
        network.end_run()
        release_output_locks()
    if code == 0 and leave_group:
        leave_process_group()
    return code


def leave_process_group() -> None:
    """Under torchrun / accelerate launch: destroys this process's group once its work is done.
    A gloo group left for the interpreter's exit to tear down can abort a finished process
    ("terminate called without an active exception", exit code -6, after every file was written),
    and NCCL warns that the group was never destroyed. Only after a finished run: after an error,
    Ctrl-C or a crash a peer may still be blocked in a collective (a full disk is found on the main
    process alone), and destroying an NCCL group then waits for it."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def say(line: str) -> None:
    """One line on stderr, on a line of its own even while a progress bar is drawn."""
    if "tqdm" in sys.modules:  # a bar may be on screen: tqdm clears it, writes, and redraws it
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)
