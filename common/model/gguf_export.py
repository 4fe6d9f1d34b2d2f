"""merge.py --export gguf: a transformers Llama, Mistral or Qwen2 model as one GGUF file (weights,
hyperparameters, tokenizer, chat template) that llama.cpp, Ollama and LM Studio load. The `gguf`
package writes the container; it has no mapping from a transformers model to GGUF's tensor names,
hyperparameter keys and tokenizer keys, which this module supplies."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from common.flags.errors import UsageError

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")

# transformers model_type -> GGUF architecture. Mistral's layers are Llama's; GGUF readers run it as
# `llama` (its sliding window, where a config sets one, is not written: see docs).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

# Pre-tokenizer regexes of the byte-level BPE families, as their tokenizer.json spell them, and the
# name GGUF readers know each by (`tokenizer.ggml.pre`). GPT-2's own regex is ByteLevel's built-in one.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}

TOKENIZER_FAMILIES = ("byte-level BPE as GPT-2, Llama 3 and Qwen2/2.5 ship it, and sentencepiece-style BPE with "
                      "byte fallback as Llama 2 and Mistral 7B ship it")

# Per-layer tensors: transformers' module path inside `model.layers.N.` -> GGUF's name inside `blk.N.`.
LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
TOP_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

GGUF_FILE = "model-{type}.gguf"


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise UsageError("`--export gguf` needs the `gguf` package, which is not installed: "
                         "`pip install 'gguf>=0.19,<0.20'` (it is in requirements.txt).") from None
    return gguf


# Checks, before any weight is loaded ------------------------------------------------------------

def check_exportable(config, tokenizer, where: str) -> None:
    """The model's architecture, rotary embedding and tokenizer are ones this export writes faithfully."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UsageError(f"`--export gguf`: {where} is a {model_type!r} model; the export supports model types "
                         f"llama, mistral and qwen2 (Llama 2/3, Mistral, Qwen2/2.5); leave out `--export` to merge "
                         f"into safetensors only.")
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" and not (rope_type == "llama3" and ARCHITECTURES[model_type] == "llama"):
        raise UsageError(f"`--export gguf`: {where} uses {rope_type!r} rotary scaling, which this export does not "
                         f"write yet (the plain rotary embedding and Llama 3.1's `llama3` scaling); leave out "
                         f"`--export` to merge into safetensors only.")
    tokenizer_kind(tokenizer, where)


def rope_parameters(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def tokenizer_kind(tokenizer, where: str) -> tuple[str, str, str]:
    """-> (GGUF tokenizer model, pre-tokenizer name, where a `▁` is put before text: `never`, `first`
    (the start of the whole text) or `always` (every piece of text between special tokens)): `gpt2`
    for byte-level BPE, `llama` for sentencepiece-style BPE (words marked with `▁`, unknown characters
    as <0xXX> byte tokens). Anything else would be split differently by a GGUF reader than by
    transformers, so it is refused rather than written approximately."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # none for tokenizers outside `tokenizers` (Tekken)
    if backend is None:
        raise UsageError(f"`--export gguf`: the tokenizer of {where} is not one this export writes faithfully; "
                         f"supported: {TOKENIZER_FAMILIES}; leave out `--export` to merge into safetensors only.")
    state = json.loads(backend.to_str())
    model, pre = state["model"], state.get("pre_tokenizer") or {}
    decoder = json.dumps(state.get("decoder") or {})
    if model["type"] == "BPE" and '"ByteLevel"' in decoder:
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            return "gpt2", "gpt-2", "never"
        if pre.get("type") == "Sequence" and len(pre["pretokenizers"]) == 2:
            split, byte_level = pre["pretokenizers"]
            name = PRE_TOKENIZERS.get((split.get("pattern") or {}).get("Regex"))
            if name and split.get("type") == "Split" and byte_level.get("type") == "ByteLevel" \
                    and not byte_level.get("use_regex", True):
                return "gpt2", name, "never"
    if model["type"] == "BPE" and model.get("byte_fallback") and '"ByteFallback"' in decoder:
        normalizer = json.dumps(state.get("normalizer") or {}, ensure_ascii=False)
        if pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581" and not pre.get("split", True):
            return "llama", "default", pre.get("prepend_scheme", "always")
        if not pre and '"Prepend"' in normalizer and "\u2581" in normalizer:
            return "llama", "default", "always"  # older tokenizer.json: a normalizer prepends `▁` to each piece
    raise UsageError(f"`--export gguf`: the tokenizer of {where} is not one this export writes faithfully; supported: "
                     f"{TOKENIZER_FAMILIES}; leave out `--export` to merge into safetensors only.")


# Weights --------------------------------------------------------------------------------------

def tensor_name(hf_name: str) -> str:
    stem, _, kind = hf_name.rpartition(".")
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    gguf_stem = f"blk.{match[1]}.{LAYER_TENSORS.get(match[2], '')}" if match else TOP_TENSORS.get(stem)
    if not gguf_stem or gguf_stem.endswith(".") or kind not in ("weight", "bias"):
        raise UsageError(f"`--export gguf`: the model has a tensor {hf_name!r} that no GGUF Llama/Qwen2 "
                         f"layer holds; this model cannot be exported.")
    return f"{gguf_stem}.{kind}"


def interleave_rotary(w, n_head: int):
    """transformers' Llama rotates each head's dimension i with i + d/2 (two halves); llama.cpp's
    `llama` architecture rotates 2i with 2i + 1. Reordering each head's rows (weights, or a bias)
    as [0, d/2, 1, d/2 + 1, ...] makes the two compute the same attention."""
    import numpy as np

    head = w.shape[0] // n_head
    within = np.arange(head).reshape(2, head // 2).T.reshape(-1)  # 0, d/2, 1, d/2 + 1, ...
    rows = (np.arange(n_head)[:, None] * head + within).reshape(-1)
    return w[rows]


def planned_tensors(model, arch: str) -> list[tuple[str, object, int | None]]:
    """-> [(GGUF name, the model's tensor, heads to reorder Q/K by or None)] in the model's order; no
    `output` where the output layer is the input embedding (tied): readers then use token_embd.
    Tensors are converted one at a time when written, so the export needs no second copy of the model."""
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    out = []
    if rope_parameters(config).get("rope_type") == "llama3":
        out.append(("rope_freqs.weight", rope_factors(config), None))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = tensor_name(hf_name)
        reorder = None
        if arch == "llama" and re.search(r"\.attn_[qk]\.", name):
            reorder = heads if ".attn_q." in name else kv_heads
        out.append((name, tensor, reorder))
    return out


def rope_factors(config):
    """Llama 3.1's rotary scaling as GGUF's `llama` architecture takes it: per rotary frequency, the
    factor the plain frequency is divided by (transformers' `llama3` frequencies, from its own rule)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = float(rope_parameters(config)["rope_theta"])
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    return (plain / scaled.double()).float()


def storage(shape, gguf_type: str) -> str:
    """How one tensor is stored. Vectors (norms, biases) stay f32, as GGUF readers expect; a matrix whose
    rows are not a multiple of q8_0's 32-value block is f16."""
    if gguf_type == "f32" or len(shape) < 2:
        return "f32"
    if gguf_type == "q8_0" and shape[-1] % 32:
        return "f16"
    return gguf_type


def encode(gguf, tensor, reorder: int | None, kind: str):
    array = tensor.detach().float().cpu().numpy()
    if reorder:
        array = interleave_rotary(array, reorder)
    if kind in ("f32", "f16"):
        return array.astype("float32" if kind == "f32" else "float16")
    return gguf.quants.quantize(array, getattr(gguf.GGMLQuantizationType, kind.upper()))


def tensor_info(gguf, shape, kind: str) -> tuple:
    """-> (shape, numpy dtype, bytes, GGML type or None) as GGUFWriter.add_tensor_info takes them."""
    import numpy as np

    if kind in ("f32", "f16"):
        dtype = np.dtype("float32" if kind == "f32" else "float16")
        return shape, dtype, math.prod(shape) * dtype.itemsize, None
    ggml = getattr(gguf.GGMLQuantizationType, kind.upper())
    byte_shape = gguf.quant_shape_to_byte_shape(shape, ggml)
    return byte_shape, np.dtype("uint8"), math.prod(byte_shape), ggml


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def write_hparams(writer, config, gguf, gguf_type: str, name: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[gguf_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:  # readers would otherwise take hidden_size / heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope_parameters(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


# Tokenizer ------------------------------------------------------------------------------------

def write_tokenizer(writer, tokenizer, gguf, vocab_size: int, chat_template: str | None, eot: str = "",
                    chat: bool = False) -> None:
    """The vocabulary by id (ids the embedding has beyond the tokenizer's are unused padding), the
    merges, the token kinds (special added tokens are control tokens, other added ones user-defined),
    the special ids, whether BOS/EOS are added to text, and the chat template. A sentencepiece-style
    vocabulary also gets scores: GGUF readers merge the pair whose result scores highest, so a token
    scores minus the rank of the first merge that makes it, and byte tokens are marked as bytes."""
    from common.data.templates import adds_bos

    kind, pre, space_prefix = tokenizer_kind(tokenizer, "the model")
    kinds = gguf.TokenType
    state = json.loads(tokenizer.backend_tokenizer.to_str())  # tokenizer_kind has refused a tokenizer without one
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UsageError(f"`--export gguf`: the tokenizer has {max(by_id) + 1} tokens but the model's embedding only "
                         f"{vocab_size} rows; resize the embedding before exporting.")
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        scores.setdefault(merge.replace(" ", ""), -float(rank))
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if i not in by_id:
            types.append(kinds.UNUSED)
        elif i in added and i != tokenizer.unk_token_id:
            types.append(kinds.CONTROL if added[i].special else kinds.USER_DEFINED)
        elif kind == "llama" and i == tokenizer.unk_token_id:
            types.append(kinds.UNKNOWN)
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types.append(kinds.BYTE)
        else:
            types.append(kinds.CONTROL if i in added else kinds.NORMAL)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if kind == "llama":
        writer.add_token_scores([scores.get(t, 0.0) for t in tokens])
        # llama.cpp puts the `▁` before every piece of text between special tokens, or nowhere. Where
        # transformers puts it only at the start of the text (`first`), a chat prompt, which starts
        # with special tokens (BOS, [INST]) and spaces its text itself, gets none.
        writer.add_add_space_prefix(space_prefix == "always" or (space_prefix == "first" and not chat))
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    eot_ids = tokenizer(eot, add_special_tokens=False)["input_ids"] if eot else []
    if len(eot_ids) == 1 and eot_ids[0] != tokenizer.eos_token_id:  # generation must stop there too
        writer.add_eot_token_id(eot_ids[0])
    writer.add_add_bos_token(adds_bos(tokenizer))
    ids = tokenizer("a")["input_ids"]
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and bool(ids) and ids[-1] == tokenizer.eos_token_id)
    if chat_template:
        writer.add_chat_template(chat_template)


# The file -------------------------------------------------------------------------------------

def write_gguf(model, tokenizer, folder: Path, gguf_type: str, name: str, chat_template: str | None,
               eot: str = "", chat: bool = False) -> Path:
    """Writes folder/model-<type>.gguf through a temporary name, so that a stopped export leaves no
    file that looks complete. Tensors are converted one at a time as they are written."""
    gguf = require_gguf()
    config = model.config
    arch = ARCHITECTURES[config.model_type]
    path = folder / GGUF_FILE.format(type=gguf_type)
    tmp = path.with_name(path.name + ".tmp")
    tensors = planned_tensors(model, arch)
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        write_hparams(writer, config, gguf, gguf_type, name)
        write_tokenizer(writer, tokenizer, gguf, config.vocab_size, chat_template, eot, chat)
        for gguf_name, tensor, _ in tensors:
            shape, dtype, nbytes, ggml = tensor_info(gguf, tuple(tensor.shape), storage(tensor.shape, gguf_type))
            writer.add_tensor_info(gguf_name, shape, dtype, nbytes, raw_dtype=ggml)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, tensor, reorder in tensors:
            writer.write_tensor_data(encode(gguf, tensor, reorder, storage(tensor.shape, gguf_type)))
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return path


def export_files(model, tokenizer, trained: dict, folder: Path, gguf_type: str, name: str) -> tuple[Path, list[str]]:
    """The GGUF and, next to it, the Ollama Modelfile, both carrying the run's prompt format (the
    chat template it trained with, or its plain question template written as one). -> (GGUF, notes)."""
    from common.data.masking import end_of_turn
    from common.data.templates import adds_bos
    from common.model import modelfile

    fmt = modelfile.run_format(trained, tokenizer)
    notes = []
    window = getattr(model.config, "sliding_window", None)
    if window and window < model.config.max_position_embeddings and model.config.model_type == "mistral":
        notes.append(f"the model attends to the last {window} tokens only (sliding window); GGUF's llama "
                     f"architecture attends to all, which differs for prompts longer than {window} tokens")
    if fmt.use_chat:
        chat_template, eot = tokenizer.chat_template, end_of_turn(tokenizer)
        if not isinstance(chat_template, str):  # transformers allows several, by name
            raise UsageError("`--export gguf`: the tokenizer has several named chat templates; GGUF holds one. "
                             "Keep the one the run used as `chat_template` in tokenizer_config.json.")
    else:
        chat_template, eot = modelfile.qa_chat_template(fmt, adds_bos(tokenizer)), ""
        if getattr(tokenizer, "chat_template", None):
            notes.append("the run prompted with its plain question template, not the tokenizer's chat template; "
                         "the GGUF's chat template renders the question template")
    path = write_gguf(model, tokenizer, folder, gguf_type, name, chat_template, eot, fmt.use_chat)
    text, more = modelfile.modelfile(path.name, tokenizer, fmt, adds_bos(tokenizer))
    (folder / "Modelfile").write_text(text, encoding="utf-8")
    return path, notes + more
