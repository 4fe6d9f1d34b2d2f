"""merge.py --export gguf, checked by readers this project did not write: transformers' GGUF loader
(model and tokenizer) against the merged safetensors model, and llama.cpp (llama-cpp-python, where
installed) against evaluate.py's answers. The rounding each --gguf_type may cause is given by a
hand-rounded copy of the merged model (tests/oracles.py: rounded_like_gguf)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import run_script
from tests.oracles import ollama_prompt, rounded_like_gguf

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--dataset_name", "triviaqa-sample", "--max_steps", "8", "--max_train_samples", "64",
         "--per_device_train_batch_size", "8", "--learning_rate", "2e-2", "--lora_dropout", "0",
         "--save_strategy", "no", "--report_to", "none"]
SYSTEM = "Answer the trivia question with a short answer only."  # the runs' default --system_prompt
GGUF_TYPES = ["f32", "f16", "bf16", "q8_0"]


def _held_out() -> list[str]:
    """The 60 held-out (validation) questions of the bundled sample, as evaluate.py scores them."""
    rows = (ROOT / "data" / "triviaqa_sample" / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(r)["question"] for r in rows]


@pytest.fixture(scope="module")
def tiny_qwen2_chat(tmp_path_factory):
    """Qwen2 as its small instruct releases ship: tied embeddings, q/k/v biases, Qwen's regex
    pre-tokenizer and Qwen 2.5's chat template."""
    from transformers import AutoTokenizer

    from common.model.tiny_model import build_tiny_model

    path = build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-qwen2"), "qwen2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = (ROOT / "tests" / "chat_templates" / "qwen2_5.jinja").read_text()
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_mistral_chat(tmp_path_factory):
    """Mistral 7B's kind: a sentencepiece-style tokenizer that adds BOS, Mistral v0.3's chat template."""
    from transformers import AutoTokenizer

    from common.model.tiny_model import build_tiny_model

    path = build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-mistral"), "mistral")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = (ROOT / "tests" / "chat_templates" / "mistral_v0_3.jinja").read_text()
    tokenizer.save_pretrained(path)
    return path


# (arch, --gguf_type) exported: every type for Llama and Qwen2, f16 and q8_0 for Mistral.
EXPORTS = [("llama", t) for t in GGUF_TYPES] + [("qwen2", t) for t in GGUF_TYPES] + [("mistral", "f16"),
                                                                                     ("mistral", "q8_0")]
FIRST = {"llama": "f32", "qwen2": "q8_0", "mistral": "f16"}  # the type merge.py writes with the merge


@pytest.fixture(scope="module")
def exports(tiny_llama, tiny_qwen2_chat, tiny_mistral_chat, tmp_path_factory):
    """{(arch, gguf_type): folder}: a LoRA run per model merged and exported by merge.py, FIRST's type
    from the adapter, the other types from the merged model (`--model`)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch, base in (("llama", tiny_llama), ("qwen2", tiny_qwen2_chat), ("mistral", tiny_mistral_chat)):
        first = FIRST[arch]
        assert run_script("lora.py", ["--model_id", base, "--output_dir", root / f"{arch}-lora", *TRAIN]) == 0
        merged = root / f"{arch}-{first}"
        assert run_script("merge.py", ["--adapter", root / f"{arch}-lora", "--output_dir", merged,
                                       "--export", "gguf", "--gguf_type", first]) == 0
        out[arch, first] = merged
        for gguf_type in (t for a, t in EXPORTS if a == arch):
            if gguf_type != first:
                folder = root / f"{arch}-{gguf_type}"
                assert run_script("merge.py", ["--model", merged, "--output_dir", folder, "--export", "gguf",
                                               "--gguf_type", gguf_type]) == 0
                out[arch, gguf_type] = folder
    return out


def _merged_folder(exports, arch: str) -> Path:
    return exports[arch, FIRST[arch]]


def _format(arch: str):
    from common.data.prompts import PromptFormat

    # The runs' prompt formats: the plain question template (Llama, no chat template); Qwen's and
    # Mistral's chat templates with the default system prompt.
    return PromptFormat() if arch == "llama" else PromptFormat(use_chat=True, system_prompt=SYSTEM)


def _load(folder: Path, gguf_type: str):
    """The GGUF read by transformers on its own, as a user who has only the file reads it (next to the
    merged model's tokenizer files, transformers 5.25 mixes those in and loses the special tokens)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = f"model-{gguf_type}.gguf"
    alone = folder.parent / f"{folder.name}-alone"
    if not (alone / name).exists():
        alone.mkdir(exist_ok=True)
        shutil.copy(folder / name, alone / name)
    model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(alone, gguf_file=name)


def _logits(model, tokenizer, prompts: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0] for ids in prompts]


@pytest.mark.parametrize("arch, gguf_type", EXPORTS)
def test_transformers_reads_back_the_merged_model_rounded_as_the_gguf_type(exports, arch, gguf_type):
    """Reference: the merged safetensors model merge.py saved, its matrices rounded by hand as the
    type stores them. Token ids of every prompt identical; logits equal that reference; greedy
    answers to the 60 held-out questions (evaluate.py's decoder) identical for f32 and f16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.data.prompts import generation_prompt
    from common.evaluation.answers import generate_answers, prompt_ids

    merged_dir = _merged_folder(exports, arch)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    merged_tok = AutoTokenizer.from_pretrained(merged_dir)
    gguf_model, gguf_tok = _load(exports[arch, gguf_type], gguf_type)
    fmt, questions = _format(arch), _held_out()

    texts = [generation_prompt(q, fmt, merged_tok) for q in questions]
    ids = prompt_ids(merged_tok, texts, fmt.use_chat)
    assert prompt_ids(gguf_tok, [generation_prompt(q, fmt, gguf_tok) for q in questions], fmt.use_chat) == ids

    rounded = rounded_like_gguf(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval(),
                                gguf_type)
    got, want, exact = _logits(gguf_model, gguf_tok, ids), _logits(rounded, merged_tok, ids), \
        _logits(merged, merged_tok, ids)
    off_reference = max((g - w).abs().max().item() for g, w in zip(got, want))
    off_merged = max((g - w).abs().max().item() for g, w in zip(got, exact))
    assert off_reference <= 1e-4, off_reference

    answers = generate_answers(gguf_model, gguf_tok, questions, fmt)
    reference = generate_answers(merged, merged_tok, questions, fmt)
    agree = sum(a == b for a, b in zip(answers, reference))
    print(f"{arch} {gguf_type}: largest logit difference to the merged model {off_merged:.3g} "
          f"(to the hand-rounded reference {off_reference:.2g}); greedy answers agree on {agree}/{len(questions)}")
    if gguf_type in ("f32", "f16"):
        assert answers == reference
    if gguf_type == "f32":
        assert off_merged <= 1e-5
    # q8_0 keeps ~8 bits per weight; on these random tiny models its logits move by a few hundredths.
    assert off_merged < 0.5 and agree >= len(questions) * 0.8, (off_merged, agree)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_gguf_chat_template_renders_the_runs_prompt(exports, arch):
    """Reference: the prompt evaluate.py gives the merged model. A GGUF reader's chat mode renders
    the file's chat template: the run's own chat template (Qwen2) or, for the plain question
    template (Llama), one written to render it."""
    from transformers import AutoTokenizer

    from common.data.prompts import generation_prompt

    merged_tok = AutoTokenizer.from_pretrained(_merged_folder(exports, arch))
    _, gguf_tok = _load(exports[arch, "f16"], "f16")
    fmt = _format(arch)
    for question in _held_out()[:10]:
        messages = [{"role": "system", "content": SYSTEM}] if fmt.use_chat else []
        rendered = gguf_tok.apply_chat_template(messages + [{"role": "user", "content": question}], tokenize=False,
                                                add_generation_prompt=True)
        assert rendered == generation_prompt(question, fmt, merged_tok)


def _modelfile(folder: Path) -> dict:
    """The Modelfile's commands as Ollama's parser reads them: `NAME value` or a value in triple
    double quotes, `#` comments; PARAMETER keeps its name."""
    import re

    text = (folder / "Modelfile").read_text(encoding="utf-8")
    commands: dict = {}
    for name, param, quoted, bare in re.findall(r'^(\w+) (?:(\w+) )?(?:"""(.*?)"""|(\S+))$', text, flags=re.DOTALL | re.MULTILINE):
        commands.setdefault(f"{name} {param}".strip(), []).append(quoted or bare)
    return commands


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_modelfile_template_renders_evaluate_prompt(exports, arch):
    """Reference: the prompt evaluate.py gives the merged model, for each held-out question; the
    Modelfile's TEMPLATE is rendered as Ollama renders one question (tests/oracles.py)."""
    from transformers import AutoTokenizer

    from common.data.prompts import PromptFormat, generation_prompt

    merged_tok = AutoTokenizer.from_pretrained(_merged_folder(exports, arch))
    commands = _modelfile(exports[arch, "q8_0"])
    assert commands["FROM"] == ["./model-q8_0.gguf"]
    fmt = _format(arch)
    system = commands.get("SYSTEM", [""])[0]
    assert system == (SYSTEM if fmt.use_chat else "")
    # Where the tokenizer adds BOS (Mistral), Ollama puts it before the rendered template itself.
    bos = merged_tok.bos_token if merged_tok("a")["input_ids"][0] == merged_tok.bos_token_id else ""
    for question in _held_out():
        want = generation_prompt(question, fmt, merged_tok)
        assert bos + ollama_prompt(commands["TEMPLATE"][0], system, question) == (want if want.startswith(bos)
                                                                                 else bos + want)
    stops = commands["PARAMETER stop"]
    assert "\n" in stops and merged_tok.eos_token in stops
    if arch == "qwen2":
        assert "<|im_end|>" in stops
    if fmt.use_chat:
        # Without the Modelfile's SYSTEM, the template falls back to what the chat template writes then.
        assert bos + ollama_prompt(commands["TEMPLATE"][0], "", "Q") == generation_prompt(
            "Q", PromptFormat(use_chat=True), merged_tok)
    assert commands["PARAMETER temperature"] == ["0"]


@pytest.mark.parametrize("template", sorted(p.name for p in (ROOT / "tests" / "chat_templates").glob("*.jinja")))
@pytest.mark.parametrize("system_flags", [{}, {"system_prompt": "none"}, {"system_message": "fold"}])
def test_modelfile_template_of_each_chat_family_renders_evaluate_prompt(tiny_llama, template, system_flags):
    """Reference: evaluate.py's prompt under each chat template the project tests, with the run's
    system prompt kept, absent or folded into the question; the TEMPLATE rendered as Ollama does."""
    from transformers import AutoTokenizer

    from common.data.prompts import generation_prompt
    from common.flags.errors import UsageError
    from common.model.modelfile import modelfile, run_format

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = (ROOT / "tests" / "chat_templates" / template).read_text()
    fmt = run_format({"flags": system_flags}, tok)
    try:
        want = generation_prompt("Who wrote Hamlet?", fmt, tok)
    except UsageError:  # Gemma 2 refuses a system message: no run could train so
        return
    text, notes = modelfile("m.gguf", tok, fmt, adds_bos=False)
    template_text = text.split('TEMPLATE """')[1].split('"""')[0]
    system = fmt.system_prompt or ""
    assert ollama_prompt(template_text, system, "Who wrote Hamlet?") == want, notes
    assert (f'SYSTEM """{system}"""' in text) == bool(system)


@pytest.mark.parametrize("script", ["dora.py", "qlora.py"])
def test_dora_and_qlora_adapters_export_the_merged_model(tiny_llama, tmp_path, script):
    """Reference: the merged safetensors model merge.py writes in the same run (for QLoRA, merged into
    the dequantized 4-bit weights): the f32 GGUF gives its logits."""
    from transformers import AutoModelForCausalLM

    assert run_script(script, ["--model_id", tiny_llama, "--output_dir", tmp_path / "run", *TRAIN]) == 0
    assert run_script("merge.py", ["--adapter", tmp_path / "run", "--output_dir", tmp_path / "out", "--export", "gguf",
                                   "--gguf_type", "f32"]) == 0
    model, tok = _load(tmp_path / "out", "f32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.tensor([tok("Question: Who wrote Hamlet?\nAnswer:")["input_ids"]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() <= 1e-5


def test_qwen2_pre_tokenizer_regex_is_qwen2s():
    """Reference: transformers' Qwen2 tokenizer. The export names a tokenizer `qwen2` by this regex."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from common.model.gguf_export import PRE_TOKENIZERS, QWEN2_SPLIT

    assert QWEN2_SPLIT == PRETOKENIZE_REGEX and PRE_TOKENIZERS[QWEN2_SPLIT] == "qwen2"


def _legacy_sentencepiece(path: str) -> str:
    """The tiny Mistral's tokenizer.json as older Llama 2 and Mistral repos spell it: no pre-tokenizer,
    a normalizer that prepends `▁` and turns spaces into `▁`."""
    state = json.loads((Path(path) / "tokenizer.json").read_text(encoding="utf-8"))
    state["pre_tokenizer"] = None
    state["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                              {"type": "Replace", "pattern": {"String": " "},
                                                               "content": "\u2581"}]}
    (Path(path) / "tokenizer.json").write_text(json.dumps(state), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["gpt-2", "qwen2", "sentencepiece", "sentencepiece-legacy"])
def test_gguf_tokenizer_ids_equal_transformers_on_every_bundled_question(kind, tiny_llama, tiny_qwen2_chat,
                                                                          tmp_path):
    """Reference: the model's own tokenizer (tokenizer.json), on the 360 questions of the bundled
    sample as prompts and with their answers. transformers' GGUF reader, and llama.cpp where
    installed, give the same ids."""
    from transformers import AutoTokenizer

    from common.model.tiny_model import build_tiny_model

    base = {"gpt-2": tiny_llama, "qwen2": tiny_qwen2_chat}.get(kind) or build_tiny_model(str(tmp_path / "m"), "mistral")
    if kind == "sentencepiece-legacy":
        _legacy_sentencepiece(base)
    assert run_script("merge.py", ["--model", base, "--output_dir", tmp_path / "out", "--export", "gguf"]) == 0
    tok = AutoTokenizer.from_pretrained(base)
    _, gguf_tok = _load(tmp_path / "out", "f16")
    texts = []
    for split in ("train", "validation"):
        for line in (ROOT / "data" / "triviaqa_sample" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            prompt = f"Question: {row['question']}\nAnswer:"
            texts += [prompt, f"{prompt} {row['answer']['value']}"]
    want = [tok(t)["input_ids"] for t in texts]
    assert [gguf_tok(t)["input_ids"] for t in texts] == want
    try:
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(model_path=str(tmp_path / "out" / "model-f16.gguf"), vocab_only=True, verbose=False)
    add_bos = llm.metadata["tokenizer.ggml.add_bos_token"] == "true"
    assert [llm.tokenize(t.encode(), add_bos=add_bos, special=True) for t in texts] == want
    llm.close()


@pytest.mark.parametrize("variant", [{"attention_bias": True}, {"head_dim": 32}, {"tie_word_embeddings": True}])
def test_llama_variants_read_back_exactly(tmp_path, variant):
    """Reference: the model itself. Llama configs that change what is written: q/k/v biases (reordered
    like their weights), a head size other than hidden_size / heads, tied embeddings (no `output`).
    transformers reads the f32 file back, and llama.cpp where installed."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.model.tiny_model import build_tiny_model

    base = build_tiny_model(str(tmp_path / "m"), "llama", **variant)
    if "attention_bias" in variant:  # random biases: zeros would hide a wrong order
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("proj.bias"):
                    param.normal_(0, 0.5)
        model.save_pretrained(base)
    assert run_script("merge.py", ["--model", base, "--output_dir", tmp_path / "out", "--export", "gguf",
                                   "--gguf_type", "f32"]) == 0
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(base)("Question: Who wrote Hamlet?\nAnswer:")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0]
    if "attention_bias" not in variant:  # transformers' GGUF reader builds Llama without attention biases
        gguf_model, _ = _load(tmp_path / "out", "f32")
        with torch.no_grad():
            assert (gguf_model(input_ids=torch.tensor([ids])).logits[0] - want).abs().max() <= 1e-5
    try:
        import llama_cpp
    except ImportError:
        if "attention_bias" in variant:
            pytest.skip("llama-cpp-python is not installed (optional), and transformers' GGUF reader drops "
                        "Llama's attention biases")
        return
    llm = llama_cpp.Llama(model_path=str(tmp_path / "out" / "model-f32.gguf"), n_ctx=64, n_threads=1,
                          logits_all=True, verbose=False)
    llm.eval(ids)
    assert float(np.abs(llm.scores[:len(ids)] - want.numpy()).max()) < 0.01
    llm.close()


def test_llama3_rotary_scaling_reaches_llama_cpp(tmp_path):
    """Reference: the transformers model itself, on a prompt longer than the scaling's original context
    (where Llama 3.1's `llama3` frequencies differ from plain ones). transformers' GGUF reader ignores
    the scaling (its limit, see docs), so llama.cpp is the reader here."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional)")
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.model.tiny_model import build_tiny_model

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    base = build_tiny_model(str(tmp_path / "m"), "llama", rope_parameters=rope)
    assert run_script("merge.py", ["--model", base, "--output_dir", tmp_path / "out", "--export", "gguf",
                                   "--gguf_type", "f32"]) == 0
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(base)(f"Question: {' '.join(_held_out()[:3])}\nAnswer:")["input_ids"]
    assert len(ids) > 2 * rope["original_max_position_embeddings"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "out" / "model-f32.gguf"), n_ctx=256, n_threads=1,
                          logits_all=True, verbose=False)
    llm.eval(ids)
    worst = float(np.abs(llm.scores[:len(ids)] - want).max())
    llm.close()
    print(f"llama.cpp, llama3 rotary scaling: largest logit difference to the model {worst:.3g}")
    assert worst < 0.01


# Bad input: one line, exit 2, nothing written -------------------------------------------------

def _refused(capsys, argv, *words) -> str:
    assert run_script("merge.py", argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def test_unsupported_architecture_exits_2_naming_what_is_supported(tiny_gpt2, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(capsys, ["--model", tiny_gpt2, "--output_dir", out, "--export", "gguf"], "gpt2", "llama", "qwen2")
    assert not out.exists() and not (tmp_path / "out.tmp").exists()


def test_prompt_learning_adapter_exits_2(tiny_llama, tmp_path, capsys):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "prefix"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.save_pretrained(adapter)
    capsys.readouterr()
    _refused(capsys, ["--adapter", adapter, "--output_dir", tmp_path / "out", "--export", "gguf"],
             "PREFIX_TUNING", "cannot be merged")
    assert not (tmp_path / "out").exists()


def test_missing_gguf_package_exits_2_before_loading(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    out = tmp_path / "out"
    _refused(capsys, ["--model", tiny_llama, "--output_dir", out, "--export", "gguf"], "`gguf`", "pip install")
    assert not out.exists() and not (tmp_path / "out.tmp").exists()


def test_existing_output_dir_exits_2_and_stays_untouched(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _refused(capsys, ["--model", tiny_llama, "--output_dir", out, "--export", "gguf"], "--output_dir",
             "--overwrite_output_dir")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("reads", ["model", "adapter"])
def test_output_dir_holding_what_merge_reads_exits_2_and_keeps_it(reads, tiny_llama, tmp_path, capsys):
    """`--overwrite_output_dir True` replaces the output dir once the new files are written: pointed at
    the model or adapter being read, or a folder holding it, it would delete it."""
    import shutil

    source = tmp_path / "runs" / "source"
    if reads == "model":
        shutil.copytree(tiny_llama, source)
    else:
        assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", source, *TRAIN]) == 0
    before = sorted(p.name for p in source.iterdir())
    capsys.readouterr()
    for out in (source, source.parent):
        _refused(capsys, [f"--{reads}", source, "--output_dir", out, "--export", "gguf", "--overwrite_output_dir",
                          "True"], "--output_dir", "choose another")
        assert sorted(p.name for p in source.iterdir()) == before


def test_plain_template_chat_template_puts_the_bos_the_tokenizer_adds(tiny_llama):
    """Reference: evaluate.py's prompt ids, with the BOS the tokenizer adds (a byte-level tokenizer
    that adds BOS, as Llama 3's does). A GGUF reader's chat mode may tokenize the rendered template
    without adding BOS, so the template for a plain-template run writes it, as Llama 3's does."""
    from transformers import AutoTokenizer

    from common.data.prompts import PromptFormat, generation_prompt
    from common.data.templates import adds_bos
    from common.model.modelfile import qa_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.add_bos_token = True
    assert adds_bos(tokenizer)
    fmt = PromptFormat()
    template = qa_chat_template(fmt, adds_bos(tokenizer))
    for question in _held_out()[:10]:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": question}], chat_template=template,
                                                 tokenize=False, add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer(generation_prompt(question, fmt, tokenizer))["input_ids"]


@pytest.mark.parametrize("argv, flag", [
    (["--gguf_type", "q8_0"], "--gguf_type"),
    (["--export", "gguf", "--gguf_type", "q4_k"], "gguf_type"),
    (["--export", "onnx"], "export"),
])
def test_bad_export_flags_exit_2(tiny_llama, tmp_path, capsys, argv, flag):
    _refused(capsys, ["--model", tiny_llama, "--output_dir", tmp_path / "out", *argv], flag)


def test_a_failed_write_leaves_no_gguf_and_no_output_dir(tiny_llama, tmp_path, monkeypatch):
    from common.model import gguf_export

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_export, "encode", fail)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        run_script("merge.py", ["--model", tiny_llama, "--output_dir", out, "--export", "gguf"])
    assert not out.exists() and not (tmp_path / "out.tmp").exists()


# llama.cpp ----------------------------------------------------------------------------------------

def _llama_cpp_greedy(llm, prompt: list[int], stop_ids: set, newline_ids: frozenset, steps: int = 16) -> list[int]:
    """Greedy decoding in llama.cpp: argmax of its own logits, one token at a time."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    new = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(token)
        if token in stop_ids or token in newline_ids:
            break
        llm.eval([token])
    return new


@pytest.mark.parametrize("arch, gguf_type", [e for e in EXPORTS if e[1] != "bf16"])
def test_llama_cpp_answers_equal_evaluate_answers(exports, arch, gguf_type):
    """Reference: evaluate.py's greedy answers from the merged safetensors model, and its prompt ids.
    llama.cpp renders the prompt from the GGUF's chat template (llama-cpp-python's Jinja renderer) as
    evaluate.py builds it, tokenizes it to the same ids and, for f32/f16, gives the same answers."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional; "
                                    "docs/evaluation-and-merging.md has the build command)")
    import numpy as np
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.data.prompts import generation_prompt
    from common.evaluation.answers import (
        answer_from_ids,
        generate_answers,
        prompt_ids,
        stop_token_ids,
    )
    from common.evaluation.generation import newline_ids

    merged_dir = _merged_folder(exports, arch)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(merged_dir)
    fmt, questions = _format(arch), _held_out()
    reference = generate_answers(merged, tok, questions, fmt)
    llm = llama_cpp.Llama(model_path=str(exports[arch, gguf_type] / f"model-{gguf_type}.gguf"), n_ctx=256,
                          n_threads=1, logits_all=True, verbose=False)
    meta = llm.metadata
    chat = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=tok.eos_token, bos_token=tok.bos_token,
                               add_generation_prompt=True)
    stops, newlines = set(stop_token_ids(tok)), newline_ids(tok)
    agree, worst = 0, 0.0
    for question, want in zip(questions, reference):
        text = generation_prompt(question, fmt, tok)
        messages = ([{"role": "system", "content": SYSTEM}] if fmt.use_chat else []) + [
            {"role": "user", "content": question}]
        assert chat(messages=messages).prompt == text
        ids = prompt_ids(tok, [text], fmt.use_chat)[0]
        # As evaluate.py: a chat template's rendering is tokenized as it is (it writes BOS itself).
        add_bos = meta["tokenizer.ggml.add_bos_token"] == "true" and not fmt.use_chat
        assert llm.tokenize(text.encode(), add_bos=add_bos, special=True) == ids
        new = _llama_cpp_greedy(llm, ids, stops, newlines)  # keeps the prompt's logits in llm.scores
        agree += answer_from_ids(tok, new, stops) == want
        with torch.no_grad():
            last = merged(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
        worst = max(worst, float(np.abs(llm.scores[len(ids) - 1] - last).max()))
    llm.close()
    print(f"llama.cpp {arch} {gguf_type}: largest logit difference to the merged model {worst:.3g} (last prompt "
          f"position); greedy answers agree with evaluate.py's on {agree}/{len(questions)}")
    if gguf_type in ("f32", "f16"):
        assert agree == len(questions)
    assert agree >= len(questions) * 0.8
