"""Command-line flags: small dataclasses, one per concern, combined per script.

Parsing is plain argparse built from the dataclass fields, so `--help` and every flag
error return at once: nothing here imports torch or transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional


class UsageError(ValueError):
    """A mistake in the user's flags or files: reported as one line, exit code 2."""


def _f(default: Any = None, help: str = "", **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


# Model & tokenizer
@dataclass
class ModelArguments:
    model_id: Optional[str] = _f(
        None,
        "Hub id (e.g. `meta-llama/Llama-3.1-8B-Instruct`), a local model dir, or an adapter dir "
        "written by one of these scripts (its base model is loaded with the adapter on top).",
        aliases=("model_name_or_path",),
    )
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) of the model.")
    trust_remote_code: bool = _f(
        False, "Run Python code shipped with the model. Off by default: only enable it for repos you trust."
    )
    use_bfloat16: bool = _f(
        False,
        "Train in bfloat16 where the GPU supports it; falls back to float16 on GPUs without bf16 (T4) "
        "and to float32 on the CPU.",
        aliases=("bf16",),
    )
    fp16: bool = _f(False, "Train in float16 mixed precision (CUDA only).")
    use_cache: Optional[bool] = _f(
        None, "KV cache during the forward pass. Default: off while training (it is forced off with "
        "gradient checkpointing)."
    )
    attn_implementation: Optional[str] = _f(
        None, "Attention kernel: `sdpa` (default), `eager`, `flash_attention_2` (if installed)."
    )


@dataclass
class QuantizationArguments:
    load_in_4bit: bool = _f(False, "Load the base model in 4-bit (bitsandbytes): QLoRA. qlora.py turns this on.")
    load_in_8bit: bool = _f(False, "Load the base model in 8-bit (bitsandbytes).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type; nf4 is what QLoRA uses.")
    bnb_4bit_use_double_quant: bool = _f(
        True, "Quantize the quantization constants too (saves ~0.4 bit/param, no quality cost)."
    )
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "dtype of the 4-bit matmuls. `auto` follows the training precision."
    )


# Dataset
@dataclass
class DataArguments:
    dataset_name: str = _f(
        "triviaqa",
        "`triviaqa` (hub `mandarjoshi/trivia_qa`), `triviaqa-sample` (bundled, offline), any hub dataset id, "
        "or a local .json/.jsonl/.parquet/.csv file or dataset directory.",
    )
    dataset_config: Optional[str] = _f(None, "Hub dataset config; for `triviaqa` defaults to `rc.nocontext`.")
    dataset_split: str = _f("train", "Training split, slices allowed: `train[:1000]`, `train[:10%]`.")
    eval_split: str = _f(
        "auto", "Held-out split for evaluation: a split name/slice, `none`, or `auto` (`validation` if it exists)."
    )
    max_train_samples: Optional[int] = _f(None, "Keep only the first N training rows (after slicing).")
    max_eval_samples: Optional[int] = _f(None, "Keep only the first N evaluation rows.")
    prompt_template: str = _f(
        "Question: {question}\nAnswer:", "Prompt format; `{question}` is replaced by the question."
    )
    use_chat_template: Literal["auto", "true", "false"] = _f(
        "auto", "Format with the tokenizer's chat template: `auto` uses it when the tokenizer has one."
    )
    system_prompt: Optional[str] = _f(
        "Answer the trivia question with a short answer only.",
        "System message used with a chat template (`none` to send none).",
    )
    max_seq_length: int = _f(512, "Longest tokenized example; longer ones are truncated. TriviaQA needs < 128.",
                             aliases=("max_length",))
    completion_only_loss: bool = _f(True, "Compute the loss on the answer only, not on the prompt.")
    dataset_num_proc: Optional[int] = _f(None, "Processes for dataset preparation (default: 1; every core, up "
                                               "to 8, for 20,000 rows or more).")
    dataset_format: str = _f(
        "auto", "Data format, detected from the columns by default (`auto`): `messages`, `sharegpt`, `alpaca`, "
                "`text`, or a question-answer schema (`qa`, `triviaqa`, `prompt-completion`, ...); preference scripts: "
                "`preference`, `implicit-prompt`, `unpaired` or a question-answer schema. README: \"Your own data\".")
    assistant_turns: Literal["all", "last"] = _f(
        "all", "Conversations: train on every assistant turn (`all`) or on the last one only (`last`).")


# LoRA family
@dataclass
class LoraArguments:
    lora_r: int = _f(16, "LoRA rank. 8-64 covers most uses; higher ranks rarely help on short answers.")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r). 2*r is a good default.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input. 0.05-0.1 for small datasets.")
    share_lora_dropout: bool = _f(
        True, "Adapters that read the same input (q/k/v, gate/up) share one dropout mask, as a fused qkv layer "
              "does: fewer masks to draw and keep. `False`: one mask per adapted layer, as PEFT draws them.")
    lora_bias: Literal["none", "all", "lora_only"] = _f("none", "Which biases to train.")
    target_modules: str = _f(
        "all-linear",
        "Comma-separated module names to adapt, or `all-linear`. Fused names are translated between "
        "architectures (`query_key_value` means GPT-2's `c_attn`, or Llama's q/k/v projections).",
    )
    modules_to_save: Optional[str] = _f(None, "Comma-separated extra modules trained in full and saved (e.g. `lm_head`).")
    use_rslora: bool = _f(False, "Rank-stabilised scaling alpha/sqrt(r): helps at high ranks.")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA). dora.py turns this on.")
    dora_ephemeral_gpu_offload: bool = _f(
        False, "DoRA: compute the weight norms on the GPU for CPU-offloaded layers (PEFT runtime option)."
    )


# Prompt learning (prefix tuning, P-tuning, prompt tuning)
@dataclass
class PromptLearningArguments:
    peft_type: Optional[str] = _f(
        None, "PEFT method, for compatibility with PEFT-style commands: PREFIX_TUNING, P_TUNING, PROMPT_TUNING, LORA."
    )
    task_type: str = _f("CAUSAL_LM", "PEFT task type. Only CAUSAL_LM is supported.")
    num_virtual_tokens: int = _f(20, "Number of virtual tokens. 10-30 is typical.")
    prefix_projection: bool = _f(False, "Prefix tuning: learn the prefix through a 2-layer MLP (steadier training).")
    encoder_hidden_size: Optional[int] = _f(
        None, "Hidden size of the prefix projection / P-tuning prompt encoder (default: the model's hidden size)."
    )
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = _f("MLP", "P-tuning prompt encoder.")
    encoder_num_layers: int = _f(2, "P-tuning: layers of the prompt encoder.")
    encoder_dropout: float = _f(0.0, "P-tuning: dropout in the prompt encoder.")
    prompt_tuning_init: Literal["TEXT", "RANDOM"] = _f(
        "TEXT", "Prompt tuning: start from the embeddings of `--prompt_tuning_init_text` (converges faster) or random."
    )
    prompt_tuning_init_text: str = _f(
        "Answer the following trivia question with a short factual answer:",
        "Prompt tuning: text whose embeddings initialise the virtual tokens.",
    )
    token_dim: Optional[int] = _f(None, "Hidden size of the model. Inferred from the model when omitted.")
    num_layers: Optional[int] = _f(None, "Transformer layers of the model. Inferred when omitted.")
    num_attention_heads: Optional[int] = _f(None, "Attention heads of the model. Inferred when omitted.")
    num_transformer_submodules: Optional[int] = _f(
        None, "1 for decoder-only models, 2 for encoder-decoder. Inferred when omitted."
    )


# Training
@dataclass
class TrainingArguments:
    output_dir: Optional[str] = _f(None, "Where the adapter, tokenizer, metrics and run_config.json are written.")
    overwrite_output_dir: bool = _f(False, "Replace a finished run already in `--output_dir`.")
    resume_from_checkpoint: Optional[str] = _f(
        None, "`auto` (latest checkpoint in --output_dir), or a checkpoint dir."
    )
    num_train_epochs: float = _f(3.0, "Passes over the training data (ignored when --max_steps > 0).")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: use --num_train_epochs).")
    per_device_train_batch_size: int = _f(4, "Examples per device per forward pass.")
    per_device_eval_batch_size: int = _f(8, "Examples per device per evaluation forward pass.")
    gradient_accumulation_steps: int = _f(1, "Forward passes per optimizer step.")
    # On by default, as in TRL: a run that fits at step 1 fits throughout. `False` trains ~1.4x faster
    # when memory allows (bench/README.md).
    gradient_checkpointing: bool = _f(True, "Recompute activations in the backward pass: less memory, ~30% "
                                            "slower. `False` when memory allows.")
    optimizer: str = _f("adamw_torch", "Optimizer name as in transformers (`adamw_torch_fused`, `paged_adamw_8bit`, ...).",
                        aliases=("optim",))
    learning_rate: float = _f(2e-4, "Peak learning rate. LoRA: 1e-4-3e-4; prompt learning: 1e-3-3e-2.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (the QLoRA paper uses 0.3).")
    warmup_ratio: float = _f(0.03, "Fraction of the steps spent warming the learning rate up.")
    warmup_steps: int = _f(0, "Warm-up steps; overrides --warmup_ratio when > 0.")
    lr_scheduler_type: str = _f("linear", "Learning-rate schedule: linear, cosine, constant, constant_with_warmup, ...")
    logging_steps: int = _f(10, "Log every N steps.")
    save_strategy: Literal["no", "steps", "epoch"] = _f("steps", "When to write checkpoints.")
    save_steps: int = _f(500, "Checkpoint every N steps with --save_strategy steps.")
    save_total_limit: Optional[int] = _f(2, "Keep at most N checkpoints (oldest deleted).")
    eval_strategy: Literal["no", "steps", "epoch"] = _f("no", "When to evaluate on the held-out split.",
                                                       aliases=("evaluation_strategy",))
    eval_steps: Optional[int] = _f(None, "Evaluate every N steps with --eval_strategy steps (default: --logging_steps).")
    eval_em_samples: int = _f(
        0, "Score TriviaQA exact match / F1 by generation on N held-out questions at each evaluation and at the "
        "end (0: off). 200 takes well under a minute on a GPU."
    )
    seed: int = _f(42, "Random seed (data order, initialisation, dropout).")
    train_sampling_strategy: Literal["group_by_length", "random"] = _f(
        "group_by_length", "`group_by_length` batches similar lengths together: less padding, faster."
    )
    # Both need flash attention to keep examples apart; without it, length grouping already cuts
    # padding to ~10% on TriviaQA (bench/README.md).
    packing: bool = _f(False, "Pack several examples into each sequence (best-fit); needs "
                              "`--attn_implementation flash_attention_2` (or 3).")
    padding_free: bool = _f(False, "Flatten each batch into one sequence without padding; needs "
                                   "`--attn_implementation flash_attention_2` (or 3).")
    use_liger_kernel: bool = _f(False, "Use Liger Triton kernels (CUDA GPUs; needs `pip install liger-kernel`).")
    neftune_noise_alpha: Optional[float] = _f(None, "NEFTune embedding noise (e.g. 5); off by default.")
    dataloader_num_workers: int = _f(0, "Background data-loading workers.")
    report_to: str = _f("none", "Where to log: none, tensorboard, wandb (comma-separated for several).")
    run_name: Optional[str] = _f(None, "Run name shown in wandb/tensorboard.")
    push_to_hub: bool = _f(False, "Upload the adapter to the Hub at the end (needs HF_TOKEN or `hf auth login`).")
    hub_model_id: Optional[str] = _f(None, "Hub repo for --push_to_hub (default: the output dir name).")
    hub_token: Optional[str] = _f(None, "Hub token; prefer the HF_TOKEN environment variable. Never logged.",
                                  secret=True)
    ddp_find_unused_parameters: Optional[bool] = _f(None, "DDP: look for unused parameters (slower).")


KNOWN_REPORTERS = ("none", "tensorboard", "wandb")

# transformers' optimizer and scheduler names, kept here so that a typo fails before any heavy
# import; tests/test_args.py checks these lists against the installed transformers.
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
    "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
    "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit",
    "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw",
    "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw", "schedule_free_radam",
    "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw",
)
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "greedy",
)


# Parsing -------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "y", "t", "on"}
_FALSE = {"false", "0", "no", "n", "f", "off"}


def str_to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/1/0, got {value!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _none_or(convert):
    def parse(value: str):
        if str(value).strip().lower() in ("none", "null", ""):
            return None
        return convert(value)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


# --help: group titles, and defaults that are not field values (None means "computed at run time").
GROUP_TITLES = {
    "ModelArguments": "model & tokenizer", "QuantizationArguments": "quantization (bitsandbytes)",
    "DataArguments": "data & prompt format", "LoraArguments": "LoRA / DoRA",
    "PromptLearningArguments": "prompt learning", "TrainingArguments": "training", "EvalArguments": "evaluation",
    "MergeArguments": "merge", "PreferenceArguments": "preference optimisation", "PPOArguments": "PPO",
    "GRPOArguments": "GRPO",
}
_OUTPUT_DEFAULTS = {"evaluate.py": "outputs/eval", "merge.py": None}
_METAVARS = {int: "N", float: "X", str: "TEXT"}


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's default once: appended unless its help already says it or there is none to show."""

    SAYS_DEFAULT = ("(default", "default:", "defaults to", "by default")

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)  # `liger-kernel` stays whole

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default == argparse.SUPPRESS or any(
                words in text.lower() for words in self.SAYS_DEFAULT):
            return text
        shown = str(action.default).replace("\n", "\\n").replace("%", "%%")
        return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(message)


@dataclass
class ParsedArgs:
    """All dataclass instances of one script, plus which flags the user actually set."""

    groups: dict[type, Any]
    explicit: set[str]
    script: str

    def __getattr__(self, name: str) -> Any:
        for obj in self.__dict__["groups"].values():
            if name in {f.name for f in dataclasses.fields(obj)}:
                return getattr(obj, name)
        raise AttributeError(name)

    def set(self, name: str, value: Any) -> None:
        for obj in self.groups.values():
            if name in {f.name for f in dataclasses.fields(obj)}:
                setattr(obj, name, value)
                return
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for obj in self.groups.values():
            out.update(dataclasses.asdict(obj))
        return out

    def secret_fields(self) -> set[str]:
        return {f.name for obj in self.groups.values() for f in dataclasses.fields(obj) if f.metadata.get("secret")}


class FlagParser:
    """Builds one argparse parser from several dataclasses.

    Adds what plain argparse lacks for this use: `--config run.yaml` (command line wins),
    "did you mean" on misspelled flags, flag aliases, booleans as `True/False/1/0` (or bare
    `--flag`), and a record of which flags were given explicitly.
    """

    def __init__(self, dataclass_types: list[type], prog: str, description: str = "",
                 defaults: Optional[dict[str, Any]] = None, hidden: tuple = ()):
        """`defaults` override field defaults for this script; `hidden` flags are accepted (scripts warn
        that they are ignored) but left out of `--help`, which lists the script's own flags only."""
        self.types = dataclass_types
        self.prog = prog
        self.overrides = dict(defaults or {})
        self.hidden = set(hidden)
        self.parser = _Parser(prog=prog, description=description, allow_abbrev=False,
                              usage=f"python {prog} [--flag VALUE ...] [--config run.yaml]",
                              formatter_class=lambda prog: _HelpFormatter(prog, max_help_position=32, width=100))
        self.parser.add_argument("--config", default=None, metavar="FILE",
                                 help="YAML file of flag: value pairs; command-line flags override it.")
        self.names: dict[str, str] = {}  # every accepted spelling -> field name
        for dc in dataclass_types:
            group = self.parser.add_argument_group(GROUP_TITLES.get(dc.__name__, dc.__name__))
            hints = typing.get_type_hints(dc)
            for f in dataclasses.fields(dc):
                self._add(group, f, hints[f.name])

    def _add(self, group, f: dataclasses.Field, tp: Any) -> None:
        base, optional = _unwrap_optional(tp)
        default = self.overrides.get(f.name, f.default)
        kwargs: dict[str, Any] = {"dest": f.name, "default": default,
                                  "help": f.metadata.get("help", "").replace("%", "%%")}
        if f.name == "output_dir" and default is None:  # computed by the script; shown as it will be
            shown = _OUTPUT_DEFAULTS.get(self.prog, f"outputs/{os.path.splitext(os.path.basename(self.prog))[0]}")
            if shown:
                kwargs["help"] += f" (default: {shown})"
        if f.name in self.hidden:
            kwargs["help"] = argparse.SUPPRESS
        if base is bool:
            kwargs.update(type=_none_or(str_to_bool) if optional else str_to_bool, nargs="?", const=True,
                          metavar="{True,False}")
        elif typing.get_origin(base) is Literal:
            choices = typing.get_args(base)
            lookup = {str(c).lower(): c for c in choices}

            def convert(value: str, lookup=lookup, choices=choices):
                key = str(value).strip().lower()
                if key not in lookup:
                    raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from {', '.join(choices)})")
                return lookup[key]

            convert.__name__ = "choice"
            kwargs.update(type=convert, metavar="{" + ",".join(choices) + "}")
        elif typing.get_origin(base) is list:  # `--runs a b c`
            kwargs.update(type=typing.get_args(base)[0], nargs="+")
        else:
            kwargs.update(type=_none_or(base) if optional else base, metavar=_METAVARS.get(base))
        spellings = [f.name, *f.metadata.get("aliases", ())]
        for s in spellings:
            self.names[s] = f.name
        group.add_argument(*[f"--{s}" for s in spellings], **kwargs)

    # --
    def _suggest(self, flag: str) -> str:
        name = flag.lstrip("-").split("=", 1)[0]
        match = difflib.get_close_matches(name, list(self.names) + ["config"], n=1, cutoff=0.6)
        return f"; did you mean `--{match[0]}`?" if match else f"; see `{self.prog} --help`"

    def _load_config(self, path: str) -> dict[str, Any]:
        if not os.path.isfile(path):
            raise UsageError(f"`--config`: file {path!r} not found.")
        import yaml

        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise UsageError(f"`--config` {path}: not valid YAML{where}; write one `flag: value` per line.") from None
        if not isinstance(data, dict):
            raise UsageError(f"`--config` {path}: expected a mapping of `flag: value` pairs.")
        out: dict[str, Any] = {}
        for key, value in data.items():
            key = str(key).lstrip("-")
            if key not in self.names:
                raise UsageError(f"`--config` {path}: unknown flag `{key}`" + self._suggest(key))
            out[key] = value
        return out

    def parse(self, argv: Optional[list[str]] = None) -> ParsedArgs:
        argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
        pre, _ = self.parser.parse_known_args(argv) if "--help" not in argv and "-h" not in argv else (None, None)
        config: dict[str, Any] = {}
        if pre is not None and pre.config:
            config = self._load_config(pre.config)
            # YAML values go through the same converters as command-line strings.
            for key, value in config.items():
                text = value if isinstance(value, str) else (
                    ",".join(map(str, value)) if isinstance(value, list) else str(value))
                action = next(a for a in self.parser._actions if f"--{key}" in a.option_strings)
                try:
                    if action.nargs == "+":
                        converted = [action.type(str(v)) for v in (value if isinstance(value, list) else [value])]
                    else:
                        converted = action.type(text) if action.type else text
                except (argparse.ArgumentTypeError, ValueError) as exc:
                    raise UsageError(f"`--config` {pre.config}: `{key}`: {exc}") from None
                self.parser.set_defaults(**{self.names[key]: converted})
        ns, unknown = self.parser.parse_known_args(argv)
        if unknown:
            flag = next((u for u in unknown if u.startswith("-")), unknown[0])
            if flag.startswith("-"):
                raise UsageError(f"unrecognized flag `{flag}`" + self._suggest(flag))
            raise UsageError(f"unexpected value {flag!r}: every value must follow a `--flag`.")
        explicit = {self.names[k] for k in config}
        for token in argv:
            if token.startswith("--"):
                name = token[2:].split("=", 1)[0]
                if name in self.names:
                    explicit.add(self.names[name])
        groups = {}
        for dc in self.types:
            groups[dc] = dc(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(dc)})
        return ParsedArgs(groups=groups, explicit=explicit, script=self.prog)


def format_flags(names) -> str:
    return ", ".join(f"`--{n}`" for n in sorted(names))


def _choice(flag: str, value: str, allowed) -> None:
    if value not in allowed:
        match = difflib.get_close_matches(value, list(allowed), n=1, cutoff=0.5)
        hint = f"; did you mean {match[0]!r}?" if match else f"; choose one of: {', '.join(allowed)}"
        raise UsageError(f"`--{flag}` {value!r} is not a known name" + hint)


def _positive(args: ParsedArgs, names: list[str], strict: bool = True) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        if (value <= 0) if strict else (value < 0):
            bound = "> 0" if strict else ">= 0"
            raise UsageError(f"`--{name}` must be {bound} (got {value}).")


def reporters(report_to: str) -> list[str]:
    return [r.strip().lower() for r in report_to.split(",") if r.strip()]


def check_common(args: ParsedArgs) -> None:
    """Flag checks shared by every training script; run before anything heavy is imported."""
    if not args.model_id:
        raise UsageError("`--model_id` is required: a hub id (e.g. `gpt2`), a local model dir or an adapter dir.")
    if args.load_in_4bit and args.load_in_8bit:
        raise UsageError("`--load_in_4bit` and `--load_in_8bit` cannot both be set; pick one.")
    if args.use_bfloat16 and args.fp16:
        raise UsageError("`--use_bfloat16` and `--fp16` cannot both be set; pick one precision.")
    _positive(args, ["lora_r", "lora_alpha", "learning_rate", "per_device_train_batch_size",
                     "per_device_eval_batch_size", "gradient_accumulation_steps", "max_seq_length",
                     "logging_steps", "save_steps", "eval_steps", "num_virtual_tokens", "max_train_samples",
                     "max_eval_samples", "encoder_num_layers", "save_total_limit", "dataset_num_proc",
                     "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules",
                     "encoder_hidden_size"])
    _positive(args, ["max_grad_norm", "weight_decay", "warmup_steps", "dataloader_num_workers", "eval_em_samples"],
              strict=False)
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise UsageError("`--num_train_epochs` must be > 0 (or set `--max_steps`).")
    for name in ("lora_dropout", "encoder_dropout", "warmup_ratio"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value < 1:
            raise UsageError(f"`--{name}` must be in [0, 1) (got {value}).")
    _choice("optimizer", args.optimizer, OPTIMIZERS)
    _choice("lr_scheduler_type", args.lr_scheduler_type, SCHEDULERS)
    for reporter in reporters(args.report_to):
        _choice("report_to", reporter, KNOWN_REPORTERS)
    if getattr(args, "task_type", "CAUSAL_LM").upper() != "CAUSAL_LM":
        raise UsageError(f"`--task_type {args.task_type}` is not supported; these scripts train CAUSAL_LM models.")
    if "{question}" not in args.prompt_template:
        raise UsageError("`--prompt_template` must contain `{question}`, e.g. 'Question: {question}\\nAnswer:'.")
    if (args.eval_strategy != "no" or args.eval_em_samples) and args.eval_split.lower() == "none":
        flag = "--eval_strategy" if args.eval_strategy != "no" else "--eval_em_samples"
        raise UsageError(f"`{flag}` needs held-out data: set `--eval_split` (e.g. `validation`).")
    if args.resume_from_checkpoint and args.overwrite_output_dir:
        raise UsageError("`--resume_from_checkpoint` and `--overwrite_output_dir` contradict; pick one.")
    from common.hub import check_push

    check_push(args)
    if args.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise UsageError("`--use_liger_kernel` needs the liger-kernel package (CUDA GPUs): `pip install "
                         "liger-kernel`, or leave the flag off.")


def check_sft(technique: str, args: ParsedArgs) -> None:
    """SFT-only flag checks."""
    for name in ("packing", "padding_free"):
        if getattr(args, name) and technique in ("prefix_tuning", "p_tuning", "prompt_tuning"):
            raise UsageError(f"`--{name}` cannot be used with {technique}: its virtual tokens are prepended to each "
                             f"sequence, not to each example; leave `--{name}` off.")
        if getattr(args, name) and "flash" not in (args.attn_implementation or ""):
            raise UsageError(f"`--{name}` puts several examples in one sequence, and only flash attention keeps them "
                             f"from attending to each other: add `--attn_implementation flash_attention_2` (CUDA, "
                             f"`pip install flash-attn`), or leave `--{name}` off (length-grouped batches already "
                             f"keep padding low).")


# Evaluation and merging
@dataclass
class EvalArguments:
    output_dir: Optional[str] = _f(None, "Where eval_results.json and predictions.jsonl are written.")
    max_samples: Optional[int] = _f(None, "Score only the first N questions of the split.")
    batch_size: int = _f(16, "Questions answered per batch.")
    max_new_tokens: int = _f(16, "Longest answer generated; TriviaQA answers are short.")


@dataclass
class MergeArguments:
    adapter: Optional[str] = _f(None, "Adapter dir (LoRA, DoRA or QLoRA) written by one of the training scripts "
                                      "(required).")
    output_dir: Optional[str] = _f(None, "Where the merged model (safetensors) and tokenizer are written (required).")
    overwrite_output_dir: bool = _f(False, "Replace an existing model in --output_dir.")
    merge_dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "dtype of the merged weights; `auto` keeps the base model's 16/32-bit dtype."
    )
    trust_remote_code: bool = _f(False, "Run Python code shipped with the base model (only for repos you trust).")


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


# Preference optimisation
@dataclass
class PreferenceArguments:
    beta: float = _f(0.1, "DPO: strength of the pull towards the reference (higher = closer). ORPO: weight of the "
                          "odds-ratio term (the paper's lambda).")
    loss_type: str = _f("sigmoid", "DPO loss: sigmoid (the DPO paper), ipo, hinge, robust, ... (comma-separated to "
                                   "combine).")
    max_prompt_length: Optional[int] = _f(
        256, "Longest prompt in tokens; longer text prompts keep their end (where the question is).")
    rejected_source: Literal["other", "model"] = _f(
        "other", "Question-answer data only: the rejected answer is `other` (another question's answer, by --seed) "
                 "or `model` (the starting model's own wrong greedy answer; questions it gets right are skipped).")
    generation_batch_size: int = _f(32, "Batch size when generating rejected answers with `--rejected_source model`.")
    simpo_gamma: float = _f(0.5, "SimPO: target reward margin (the paper's gamma; 0.5-1.5).")
    desirable_weight: float = _f(1.0, "KTO: weight of desirable examples (raise it when they are the minority).")
    undesirable_weight: float = _f(1.0, "KTO: weight of undesirable examples.")


def check_preference(args: ParsedArgs, kind: str) -> None:
    _positive(args, ["beta", "max_prompt_length", "generation_batch_size", "desirable_weight",
                     "undesirable_weight"])
    _positive(args, ["simpo_gamma"], strict=False)
    if kind == "dpo":
        for loss in [x.strip() for x in args.loss_type.split(",") if x.strip()]:
            _choice("loss_type", loss, DPO_LOSS_TYPES)
    if args.max_prompt_length and args.max_prompt_length >= args.max_seq_length:
        raise UsageError(f"`--max_prompt_length {args.max_prompt_length}` must be below `--max_length "
                         f"{args.max_seq_length}`, which bounds prompt plus answer.")


# PPO
@dataclass
class PPOArguments:
    reward_model: Optional[str] = _f(None, "Reward model dir written by reward_model.py.")
    reward_function: Optional[str] = _f(
        None, "Verifiable reward instead of a reward model: `triviaqa_em` or `triviaqa_f1` (scored against the "
              "gold aliases like evaluate.py).")
    response_length: int = _f(16, "Most tokens generated per answer; TriviaQA answers need few.")
    temperature: float = _f(1.0, "Sampling temperature of the rollouts (log-probs use the same temperature).")
    missing_eos_penalty: Optional[float] = _f(
        None, "Subtracted from the score of a response that does not end with EOS (e.g. 1.0): teaches stopping.")
    kl_coef: float = _f(0.05, "Weight of the per-token KL penalty against the reference.")
    target_kl: Optional[float] = _f(None, "Adapt --kl_coef so the KL per answer tracks this value (off: fixed).")
    kl_horizon: int = _f(10000, "Adaptive KL: samples over which the coefficient adjusts.")
    gamma: float = _f(1.0, "Discount; 1.0 is usual for short answers.")
    lam: float = _f(0.95, "GAE lambda.")
    cliprange: float = _f(0.2, "PPO ratio clip.")
    cliprange_value: float = _f(0.2, "Value-function clip around the rollout's values.")
    vf_coef: float = _f(0.1, "Weight of the value loss.")
    ppo_epochs: int = _f(4, "Optimisation passes over each batch of rollouts.")
    num_mini_batches: int = _f(1, "Mini-batches per rollout batch; each mini-batch is one optimizer step.")
    max_prompt_length: int = _f(256, "Longest prompt in tokens; longer prompts stop the run (exit 2).")


def check_ppo(args: ParsedArgs) -> None:
    if bool(args.reward_model) == bool(args.reward_function):
        raise UsageError("give exactly one of `--reward_model DIR` and `--reward_function triviaqa_em|triviaqa_f1`.")
    _positive(args, ["response_length", "temperature", "kl_horizon", "cliprange", "cliprange_value", "ppo_epochs",
                     "num_mini_batches", "max_prompt_length", "target_kl"])
    _positive(args, ["kl_coef", "vf_coef", "missing_eos_penalty"], strict=False)
    for name in ("gamma", "lam"):
        value = getattr(args, name)
        if not 0 <= value <= 1:
            raise UsageError(f"`--{name}` must be in [0, 1] (got {value}).")


# GRPO
@dataclass
class GRPOArguments:
    reward_function: Optional[str] = _f(
        None, "Comma-separated rewards: `triviaqa_em`, `triviaqa_f1` (against the gold aliases, like evaluate.py).")
    reward_weights: Optional[str] = _f(None, "Comma-separated weights, one per reward (default: all 1).")
    reward_model: Optional[str] = _f(None, "Reward model dir written by reward_model.py (added to the rewards).")
    num_generations: int = _f(4, "Answers sampled per prompt; advantages are relative within each group.")
    max_completion_length: int = _f(16, "Longest generated answer in tokens.")
    temperature: float = _f(1.0, "Sampling temperature.")
    beta: float = _f(0.04, "Weight of the KL penalty to the reference (0: no reference model needed).")
    max_prompt_length: int = _f(256, "Longest prompt in tokens; longer prompts stop the run (exit 2).")


def check_grpo(args: ParsedArgs) -> None:
    if not args.reward_function and not args.reward_model:
        raise UsageError("give `--reward_function triviaqa_em|triviaqa_f1` (comma-separated for several) and/or "
                         "`--reward_model DIR`.")
    names = [n.strip() for n in (args.reward_function or "").split(",") if n.strip()]
    if args.reward_weights:
        try:
            weights = [float(w) for w in args.reward_weights.split(",")]
        except ValueError:
            raise UsageError(f"`--reward_weights {args.reward_weights}`: write numbers separated by commas.") from None
        expected = len(names) + (1 if args.reward_model else 0)
        if len(weights) != expected:
            raise UsageError(f"`--reward_weights` has {len(weights)} values for {expected} rewards; give one each.")
    _positive(args, ["num_generations", "max_completion_length", "temperature", "max_prompt_length"])
    _positive(args, ["beta"], strict=False)
    if args.num_generations < 2:
        raise UsageError("`--num_generations` must be >= 2: GRPO compares answers within a group.")
