"""ORPO, SimPO (CPO) and the reward model tokenise pairs exactly as SFT, DPO and KTO do.

TRL's experimental ORPOTrainer and CPOTrainer tokenise the prompt without the tokenizer's special
tokens, then put BOS in front of every prompt that does not start with it and EOS after every
answer that does not end with it. With a tokenizer that defines BOS but does not add it (the
GPT-2 family, the tiny test models) every prompt gains a BOS that SFT, DPO, KTO and evaluation
never see; with a chat template that closes a turn with `</s>\\n`, answers end in `</s>\\n</s>`.

`aligned(cls)` replaces their per-row tokenisation with SFTTrainer's rule:
  - text: prompt + answer + EOS text, tokenised with the tokenizer's own special tokens;
  - conversations: the chat template's rendering, tokenised with nothing added.
The answer starts where the tokenised prompt and prompt + answer stop agreeing.

`sft_ids` is the same rule for one prompt and answer: reward_model.py trains on it (TRL's
RewardTrainer wrote two BOS for a plain-rendered conversation on a BOS-adding tokenizer, and no
space after `Assistant:`), and ppo.py and grpo.py score their answers with it.
"""

from __future__ import annotations


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def aligned(trainer_cls):
    """A subclass of TRL's ORPOTrainer or CPOTrainer whose token ids equal SFT's."""
    from trl.data_utils import is_conversational

    class SFTAlignedTokens(trainer_cls):
        def __init__(self, *args, train_dataset=None, **kwargs):
            # TRL renders conversations to text before tokenize_row sees them: remember which it was.
            self._from_chat = train_dataset is not None and is_conversational(next(iter(train_dataset)))
            super().__init__(*args, train_dataset=train_dataset, **kwargs)

        def tokenize_row(self, feature, model=None):
            if self.is_encoder_decoder:
                return super().tokenize_row(feature, model)
            tok = self.processing_class
            specials = not self._from_chat  # a chat template writes its own special tokens
            end = "" if self._from_chat else tok.eos_token
            prompt = feature["prompt"]
            prompt_ids = tok(prompt, add_special_tokens=specials)["input_ids"]
            full = {}
            for side in ("chosen", "rejected"):
                answer = feature[side]
                if end and not answer.endswith(end):
                    answer += end
                full[side] = tok(prompt + answer, add_special_tokens=specials)["input_ids"]
            n = min(_common_prefix(prompt_ids, ids) for ids in full.values())
            out = {"prompt_input_ids": prompt_ids[:n], "prompt_attention_mask": [1] * n}
            for side, ids in full.items():
                ids = ids[:max(self.max_length, n)]  # as TRL: a too-long pair loses the end of its answer
                out[f"{side}_input_ids"] = ids
                out[f"{side}_attention_mask"] = [1] * len(ids)
                out[f"{side}_labels"] = [-100] * n + ids[n:]
            return out

    SFTAlignedTokens.__name__ = SFTAlignedTokens.__qualname__ = trainer_cls.__name__
    return SFTAlignedTokens


def sft_ids(tokenizer, prompt, answer, finished: bool = True, eot=None) -> list[int]:
    """The token ids SFT trains on for prompt + answer (the reward model's training format, and what
    it scores in PPO and GRPO):
      - text: prompt + answer + EOS text, tokenised with the tokenizer's own special tokens;
      - a conversation (message list; `answer` is the reply's text or its messages): as
        common.data.masking trains it (the chat template's rendering, or the plain rendering without
        one, through the reply's end-of-turn token; the prompt as inference renders it).
    `finished=False` (a reply cut off before its end) stops right after the reply's text: no EOS or
    end of turn. `eot`: common.data.masking.end_of_turn(tokenizer), for callers that score many."""
    if isinstance(prompt, str):
        end = tokenizer.eos_token if finished and not answer.endswith(tokenizer.eos_token) else ""
        return tokenizer(prompt + answer + end)["input_ids"]
    from common.data.masking import conversation_rows

    reply = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else list(answer)
    return conversation_rows(tokenizer, list(prompt) + reply, "last", finished, eot)[0]["input_ids"]
