"""evaluate.py on conversation or text data: held-out loss and perplexity on the tokens SFT trains
(the assistant's replies of a conversation, every token of a text), and sample generations for a
handful of held-out prompts."""

from __future__ import annotations

import json
import math
import os
import time

SAMPLES = 5  # held-out prompts answered in samples.jsonl


def token_loss(model, rows: list[dict], batch_size: int = 8) -> tuple[float, int]:
    """-> (summed negative log-likelihood, number of trained tokens) over {input_ids, labels} rows."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, r in enumerate(batch):  # right padding: positions are those of the unpadded sequence
                n = len(r["input_ids"])
                ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logits = logits[:, -width:]  # prompt tuning / P-tuning put their virtual tokens' logits first
            target = labels[:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), target.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            total += nll.item()
            count += int((target != -100).sum())
    finally:
        model.train(was_training)
    return total, count


def sample_generations(model, tokenizer, samples, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations of each prompt (rendered text, tokenized as SFT tokenizes it), through the
    project's one decoder (common/evaluation/generation.py, right for every adapter type). A reply may span
    lines, so only EOS or an end-of-turn token ends it."""
    from common.evaluation.answers import prompt_ids, stop_token_ids
    from common.evaluation.generation import greedy_generate

    stops = stop_token_ids(tokenizer)
    encoded = [prompt_ids(tokenizer, [s.prompt], use_chat=not s.add_special_tokens)[0] for s in samples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    generated = greedy_generate(model, encoded, pad_id=pad, stop_ids=stops, end_ids=(), batch_size=batch_size,
                                max_new_tokens=max_new_tokens)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]


def run_lm_evaluate(args, data, out, model, tokenizer) -> dict:
    from common.data import chat, templates

    start = time.perf_counter()
    templates.say_plain(tokenizer, args.model_id) if data.schema != "text" else None
    tokenized = chat.tokenized_dataset(data.train, tokenizer, getattr(args, "assistant_turns", "all"),
                                       system_mode=getattr(args, "system_message", "keep"))
    rows = [{"input_ids": r["input_ids"][:args.max_seq_length], "labels": r["labels"][:args.max_seq_length]}
            for r in tokenized]
    nll, count = token_loss(model, rows, args.batch_size)
    loss = nll / count if count else float("nan")
    samples = chat.heldout_prompts(data.train, tokenizer, SAMPLES, getattr(args, "system_message", "keep"))
    generations = sample_generations(model, tokenizer, samples, args.max_new_tokens, args.batch_size)
    elapsed = time.perf_counter() - start
    summary = {"n": len(rows), "schema": data.schema, "loss": loss, "perplexity": math.exp(loss) if count else None,
               "trained_tokens": count, "time_s": round(elapsed, 2), "model_id": args.model_id,
               "dataset": data.source, "split": args.dataset_split, "chat_template": templates.has_template(tokenizer)}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl.tmp", "w", encoding="utf-8") as fh:
        for s, g in zip(samples, generations):
            fh.write(json.dumps({"prompt": s.prompt, "reference": s.reference, "generation": g},
                                ensure_ascii=False) + "\n")
    os.replace(out / "samples.jsonl.tmp", out / "samples.jsonl")
    (out / "eval_results.json.tmp").write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(out / "eval_results.json.tmp", out / "eval_results.json")
    print(f"\n{data.schema}  n={len(rows)}  loss={loss:.4f}  perplexity={summary['perplexity']:.2f}  "
          f"(on {count} trained tokens)  time={elapsed:.1f}s\n"
          f"written to {out.resolve()}/eval_results.json and samples.jsonl ({len(samples)} sample generations)",
          flush=True)
    return summary
