"""What every RL trainer with a reference needs from its policy model: no dropout anywhere (so the
policy and its reference, or the rollout and the update, compute the same log-probs), and sampling
that follows the policy's own distribution, not the decoding preferences in a model's
generation_config.json. And the prompts it answers: the ids SFT puts before the answer, within
`--max_prompt_length`."""

from __future__ import annotations

# Names under which transformers' models keep dropout probabilities (config fields and the float
# copies layers take of them): OPT's `dropout`, GPT-2's `resid_pdrop`, Falcon's `hidden_dropout`...
_DROPOUT_WORDS = ("dropout", "pdrop")


def _is_dropout_name(name: str) -> bool:
    return any(word in name.lower() for word in _DROPOUT_WORDS)


def disable_dropout(model) -> None:
    """Dropout probability 0 everywhere: `nn.Dropout` modules (TRL's `disable_dropout` stops there),
    and the float probabilities that layers such as OPT's, BioGPT's, XGLM's or Falcon's pass to
    `F.dropout(..., training=self.training)`, which gradient checkpointing (it needs the layers in
    training mode) would otherwise switch on. Layer drop too. The saved adapter keeps its own
    `lora_dropout` setting; only this run's modules change."""
    import torch

    configs = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and not isinstance(value, bool) and (
                    _is_dropout_name(name) or name == "layerdrop"):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and id(config) not in configs:
            configs.add(id(config))
            for cfg in {id(c): c for c in (config, _text_config(config))}.values():
                for name, value in list(vars(cfg).items()):
                    if isinstance(value, float) and (_is_dropout_name(name) or name == "layerdrop"):
                        setattr(cfg, name, 0.0)


def _text_config(config):
    try:
        return config.get_text_config()
    except Exception:  # configs without sub-configs
        return config


# Generation settings that change the sampled distribution, at their neutral values. None cannot
# switch a setting off (generate() fills None from the model's generation_config), so the model's
# own generation config is replaced by a plain one as well (its min_length is 0; passing min_length
# next to min_new_tokens would make generate() warn on every call).
NEUTRAL_SAMPLING = {"do_sample": True, "top_k": 0, "top_p": 1.0, "typical_p": 1.0, "min_p": 0.0,
                    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0,
                    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                    "encoder_no_repeat_ngram_size": 0, "min_new_tokens": 0, "num_beams": 1,
                    "renormalize_logits": False}


def sample_from_the_policy_only(model) -> None:
    """Replaces the generation config of `model` (and of the transformers model under a PeftModel)
    by a plain one that keeps only the special-token ids, so nothing in generation_config.json
    (repetition_penalty, top_k, top_p, min_p, no_repeat_ngram_size, bad_words_ids, ...) reshapes
    the rollouts' distribution."""
    from transformers import GenerationConfig

    targets = [model]
    base = getattr(model, "get_base_model", None)
    if base is not None:
        targets.append(base())
    for target in targets:
        old = getattr(target, "generation_config", None)
        if old is None:
            continue
        target.generation_config = GenerationConfig(
            bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id, pad_token_id=old.pad_token_id,
            decoder_start_token_id=getattr(old, "decoder_start_token_id", None))


def rl_prompts(args, data, fmt, tokenizer) -> tuple[list[str], list[list[int]]]:
    """PPO's and GRPO's prompts for `data.train`: (generation prompts, their ids as SFT puts them
    before the answer: a BOS the tokenizer adds in front stays, a [SEP] or EOS it appends does not).
    A prompt longer than `--max_prompt_length` stops the run before any model loads."""
    from common.data import prompts
    from common.evaluation.answers import prompt_ids
    from common.flags.errors import UsageError

    texts = [prompts.generation_prompt(q, fmt, tokenizer) for q in data.train["question"]]
    ids = prompt_ids(tokenizer, texts, fmt.use_chat)
    too_long = [i for i, p in enumerate(ids) if len(p) > args.max_prompt_length]
    if too_long:
        raise UsageError(f"{len(too_long)} prompts of {data.source} are longer than `--max_prompt_length "
                         f"{args.max_prompt_length}` tokens (row {too_long[0]}: {len(ids[too_long[0]])}); raise "
                         f"the limit or filter the data.")
    return texts, ids
