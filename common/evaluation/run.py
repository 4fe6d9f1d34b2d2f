"""evaluate.py: TriviaQA exact match / F1 (or held-out loss and samples for conversation and text
data) of a model, an adapter dir or a checkpoint."""

from __future__ import annotations

from common.evaluation.answers import gather_records, evaluate_qa, summarize

# evaluate.py -----------------------------------------------------------------------------------


def make_parser():
    from common.flags.groups import (
        DataArguments,
        EvalArguments,
        ModelArguments,
        QuantizationArguments,
    )
    from common.flags.parser import FlagParser

    return FlagParser([ModelArguments, QuantizationArguments, DataArguments, EvalArguments], prog="evaluate.py",
                      defaults={"dataset_split": "validation", "dataset_name": "triviaqa"},
                      description="TriviaQA exact match and F1 of a model or of an adapter from any of these "
                                  "scripts, scored like the official TriviaQA evaluation script.")


def run_evaluate(args) -> dict:
    import json
    import os
    from pathlib import Path

    from common.data import prompts
    from common.flags import checks
    from common.flags.errors import UsageError
    from common.model.loading import load_for_inference
    from common.model.precision import select_precision
    from common.model.source import inherit_from_adapter, resolve_model

    if not args.model_id:
        raise UsageError("`--model_id` is required: a hub id, a local model dir or an adapter dir.")
    if args.load_in_4bit and args.load_in_8bit:
        raise UsageError("`--load_in_4bit` and `--load_in_8bit` cannot both be set; pick one.")
    for name in ("batch_size", "max_new_tokens", "max_samples"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"`--{name}` must be > 0 (got {value}).")
    out = Path(args.output_dir or "outputs/eval")
    if out.exists() and not out.is_dir():
        raise UsageError(f"`--output_dir` {out} is a file; choose a directory.")
    checks.check_finite(args)
    checks.check_template(args)
    checks.check_output_dir(args)
    if args.attn_implementation:
        checks.check_attention(args.attn_implementation)
    source = resolve_model(args.model_id)
    inherit_from_adapter(args, source)
    args.set("max_train_samples", args.max_samples)
    from common.data.chat import FORMATS, load_sft_data

    data = load_sft_data(args, need_eval=False)  # the split to score is --dataset_split

    from common.recipe.dist import is_main_process, world_size

    # Under torchrun / accelerate launch each process answers every world-th question.
    world = world_size()
    rows = data.train
    if world > 1:
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # joins the process group (gloo on the CPU)
        rows = rows.select(range(state.process_index, len(rows), world))
    model, tokenizer, _ = load_for_inference(args, select_precision(args, warn=lambda *_: None))
    if data.schema in FORMATS:  # conversations or text: held-out loss, perplexity and sample generations
        from common.evaluation.lm_eval import run_lm_evaluate

        if world > 1 and not is_main_process():
            return {}  # one process scores conversation and text data

        return run_lm_evaluate(args, data, out, model, tokenizer)
    fmt = prompts.prompt_format(args, tokenizer, data.schema)
    summary, records = evaluate_qa(model, tokenizer, rows, fmt, args.batch_size, args.max_new_tokens,
                                   progress=is_main_process())
    if world > 1:
        records, elapsed = gather_records(records, summary["time_s"], world)
        summary = summarize(records, elapsed)
        summary["processes"] = world
        if not is_main_process():
            return summary
    summary.update({"model_id": args.model_id, "dataset": data.source, "split": args.dataset_split,
                    "chat_template": fmt.use_chat})
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "predictions.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out / "predictions.jsonl")
    (out / "eval_results.json.tmp").write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(out / "eval_results.json.tmp", out / "eval_results.json")
    pairs = f" ({summary['denominator']} question-document pairs)" if "denominator" in summary else ""
    print(f"\nTriviaQA  n={summary['n']}{pairs}  EM={summary['exact_match_percent']:.2f}  "
          f"F1={summary['f1_percent']:.2f}  (percent, as the official script)  "
          f"time={summary['time_s']:.1f}s  ({summary['samples_per_s']} samples/s)\n"
          f"written to {out.resolve()}/eval_results.json and predictions.jsonl", flush=True)
    return summary


def main(argv=None) -> int:
    from common.recipe.cli import run_cli

    return run_cli("evaluate.py", lambda: run_evaluate(make_parser().parse(argv)))
