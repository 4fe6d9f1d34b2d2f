"""Our flags -> the keyword arguments that every TRL config (SFTConfig, DPOConfig, ...) shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.flags.parser import ParsedArgs
from common.recipe.dist import is_main_process
from common.recipe.progress import checkpointing_kwargs

# Flags whose value the TRL configs take under the same name.
SAME_NAMES = ("num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
              "gradient_accumulation_steps", "learning_rate", "weight_decay", "max_grad_norm",
              "lr_scheduler_type", "logging_steps", "save_strategy", "save_steps", "save_total_limit",
              "seed", "hub_model_id", "use_liger_kernel", "neftune_noise_alpha",
              "dataloader_num_workers", "ddp_find_unused_parameters", "train_sampling_strategy")


def trainer_kwargs(args: ParsedArgs, out: str, precision_mode: str, report_to: list[str],
                   has_eval: bool) -> dict[str, Any]:
    """Our flags -> keyword arguments shared by TRL's configs (SFTConfig, DPOConfig, ...)."""
    warmup = args.warmup_steps if args.warmup_steps > 0 else args.warmup_ratio
    kwargs: dict[str, Any] = {name: getattr(args, name) for name in SAME_NAMES}
    kwargs.update(
        output_dir=out,
        **checkpointing_kwargs(args.gradient_checkpointing),
        optim=args.optimizer,
        warmup_steps=warmup,
        # The default logs a NaN/inf loss as the mean of earlier ones (0.0 after a log): the NaN guard
        # would never see it and a diverged run would end with exit 0 and NaN weights.
        logging_nan_inf_filter=False,
        eval_strategy=args.eval_strategy if has_eval else "no",
        eval_steps=args.eval_steps or args.logging_steps,
        data_seed=args.seed,
        bf16=precision_mode == "bf16",
        fp16=precision_mode == "fp16",
        report_to=report_to,
        run_name=args.run_name or Path(out).name,
        push_to_hub=False,  # uploaded by finish_run once the result is saved locally (common/hub/upload.py)
        hub_token=None,  # taken from HF_TOKEN: the trainer pickles its arguments into every checkpoint
        save_only_model=False,
        disable_tqdm=not is_main_process(),
        dataloader_pin_memory=cuda_available(),
        # Without an accelerator, `use_cpu` is what makes torchrun/accelerate launches train as one
        # gloo process group instead of N independent runs.
        use_cpu=not cuda_available() and not mps_available(),
    )
    return kwargs


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
