"""Build a tiny, randomly initialised causal LM and a tokenizer trained on the bundled sample.

It shows the pipeline end to end offline in seconds; it knows nothing, so its answers are
meaningless until trained (and even then only on what it was trained on).

    python -m common.model.tiny_model --output_dir models/tiny-llama
    python -m common.model.tiny_model --output_dir models/tiny-gpt2 --arch gpt2
    python -m common.model.tiny_model --output_dir models/tiny-qwen2 --arch qwen2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.data.sources import BUNDLED
from common.model.gguf_export import (
    QWEN2_SPLIT,  # Qwen2's pre-tokenizer regex, as its tokenizer.json has it
)

# A minimal chat template in the shape instruct models ship (role headers, end-of-turn token).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _corpus() -> list[str]:
    lines = []
    for path in sorted(BUNDLED["triviaqa-sample"].glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                lines.append(f"Question: {row['question']}\nAnswer: {row['answer']['value']}")
                lines.extend(row["answer"]["aliases"])
    return lines


QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_tokenizer(vocab_size: int = 1024, chat: bool = False, split: str | None = None, extra_specials=()):
    """Byte-level BPE trained on the bundled sample. `split`: a pre-tokenizer regex in place of
    GPT-2's (QWEN2_SPLIT), split first and then mapped to bytes, as Llama 3 and Qwen2 ship theirs;
    `extra_specials`: more special tokens after the six every tiny tokenizer has."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", *extra_specials]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else \
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # No pad token on purpose, like GPT-2 and Llama: the training code must choose one.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_sentencepiece_tokenizer(vocab_size: int = 1024, chat: bool = False):
    """A tokenizer of Llama 2's and Mistral 7B's kind, trained on the bundled sample: BPE over words
    marked with a leading `▁`, bytes as <0xXX> tokens for unknown characters, BOS added to text."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Trained word by word, as sentencepiece trains; used on whole text, as Llama's tokenizer.json is.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]", *byte_tokens])
    tok.train_from_iterator(_corpus(), trainer=trainer)
    state = json.loads(tok.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] not in byte_tokens]  # plain vocab
    tok = Tokenizer.from_str(json.dumps(state))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_config(arch: str, vocab_size: int, **overrides):
    # initializer_range 0.1 (not 0.02): at width 64 the usual init gives near-uniform logits that
    # prompt-learning methods can barely move; a wider init lets every technique learn visibly.
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":
        cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.1)
        cfg.update(overrides)
        return LlamaConfig(**cfg)
    if arch == "mistral":
        from transformers import MistralConfig

        cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=None,
                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.1)
        cfg.update(overrides)
        return MistralConfig(**cfg)
    # Qwen2 as its small releases ship: biases on q/k/v, input and output embeddings tied.
    if arch == "qwen2":
        from transformers import Qwen2Config

        cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                   eos_token_id=2, tie_word_embeddings=True, initializer_range=0.1)
        cfg.update(overrides)
        return Qwen2Config(**cfg)
    if arch == "gpt2":
        cfg = dict(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                   eos_token_id=2, initializer_range=0.1)
        cfg.update(overrides)
        return GPT2Config(**cfg)
    # OPT and GPT-NeoX with dropout 0.1, as their released configs ship it: OPT's decoder layers
    # call F.dropout themselves, the case where "dropout off" needs more than eval mode.
    if arch == "opt":
        from transformers import OPTConfig

        cfg = dict(vocab_size=vocab_size, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0, dropout=0.1, attention_dropout=0.1, init_std=0.1)
        cfg.update(overrides)
        return OPTConfig(**cfg)
    if arch == "gpt_neox":
        from transformers import GPTNeoXConfig

        cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                   hidden_dropout=0.1, attention_dropout=0.1, initializer_range=0.1, tie_word_embeddings=False)
        cfg.update(overrides)
        return GPTNeoXConfig(**cfg)
    raise ValueError(f"unknown arch {arch!r}")


def build_tiny_model(output_dir: str, arch: str = "llama", chat: bool = False, seed: int = 0,
                     **overrides) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # Qwen2's tokenizer class pads with <|endoftext|> and adds it where the vocabulary lacks it;
    # <|im_start|>/<|im_end|> let the model take Qwen's ChatML template.
    # Mistral 7B and Llama 2 ship sentencepiece-style tokenizers; the tiny Mistral has one.
    if arch == "qwen2":
        tokenizer = build_tokenizer(chat=chat, split=QWEN2_SPLIT, extra_specials=QWEN2_SPECIALS)
    else:
        tokenizer = build_sentencepiece_tokenizer(chat=chat) if arch == "mistral" else build_tokenizer(chat=chat)
    config = build_model_config(arch, len(tokenizer), **overrides)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def build_tiny_bert(output_dir: str, seed: int = 0, **dims) -> str:
    """A BERT-style model: a WordPiece tokenizer of the bundled sample's words ([CLS] ... [SEP], no EOS),
    saved as bert-base-uncased ships (is_decoder off). `dims` override the small default shape."""
    import collections
    import re

    import torch
    from transformers import AutoModelForCausalLM, BertConfig, BertTokenizer

    words: collections.Counter = collections.Counter()
    for line in _corpus():
        words.update(re.findall(r"\w+|[^\w\s]", line.lower()))
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars),
             *(w for w, _ in words.most_common(400) if len(w) > 1)]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))})
    torch.manual_seed(seed)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    shape.update(dims)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=256, **shape)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--arch", choices=["llama", "mistral", "qwen2", "gpt2", "opt", "gpt_neox"], default="llama")
    parser.add_argument("--chat_template", action="store_true", help="Ship a chat template, like instruct models.")
    parser.add_argument("--hidden_size", type=int, default=64, help="Width; 128 memorises the bundled sample.")
    args = parser.parse_args(argv)
    width = {"n_embd": args.hidden_size} if args.arch == "gpt2" else \
        {"hidden_size": args.hidden_size, "word_embed_proj_dim": args.hidden_size, "ffn_dim": 2 * args.hidden_size} \
        if args.arch == "opt" else {"hidden_size": args.hidden_size, "intermediate_size": 2 * args.hidden_size}
    path = build_tiny_model(args.output_dir, args.arch, chat=args.chat_template, **width)
    print(f"tiny {args.arch} model written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
