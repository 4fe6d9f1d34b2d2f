"""Generation from every adapter this project trains equals a cache-free greedy decode through the
training forward (tests/oracles.py), at batch size 1 and 16, with plain and chat prompts; and one
answer-extraction rule for evaluation, the in-training EM, the RL rewards and preference data."""

import pytest
import torch

from tests.helpers import peft_llama, run_script
from tests.oracles import cache_free_greedy
from tests.test_inference_prompt import tiny_bert  # noqa: F401 (fixture)

TECHNIQUES = ["lora", "dora", "qlora", "prefix_tuning", "p_tuning", "prompt_tuning"]
MAX_NEW = 8
N_QUESTIONS = 24  # batch 16 makes two batches of unequal length: sorting and restoring order matter


@pytest.fixture(scope="module")
def questions():
    import json

    from common.data.sources import BUNDLED

    lines = (BUNDLED["triviaqa-sample"] / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["question"] for line in lines[:N_QUESTIONS]]


@pytest.fixture(scope="module", params=TECHNIQUES)
def trained(request, tiny_chat_llama, tmp_path_factory):
    """One adapter per technique, trained briefly with a high learning rate on chat prompts so that
    its answers differ from the base model's."""
    technique = request.param
    out = tmp_path_factory.mktemp("gen") / technique
    lr = "3e-2" if technique in ("prefix_tuning", "p_tuning", "prompt_tuning") else "1e-2"
    assert run_script(f"{technique}.py", [
        "--model_id", tiny_chat_llama, "--dataset_name", "triviaqa-sample", "--output_dir", out,
        "--max_train_samples", "64", "--per_device_train_batch_size", "16", "--max_steps", "12",
        "--learning_rate", lr, "--num_virtual_tokens", "8", "--logging_steps", "50", "--save_strategy", "no",
        "--report_to", "none"]) == 0
    return technique, out


def _load(run_dir, technique, chat: bool):
    from common.data import prompts
    from common.evaluation.run import make_parser
    from common.model.source import inherit_from_adapter, resolve_model
    from common.model.loading import load_for_inference
    from common.model.precision import select_precision

    argv = ["--model_id", str(run_dir), "--use_chat_template", "true" if chat else "false"]
    if technique == "qlora":
        argv += ["--load_in_4bit", "True"]
    args = make_parser().parse(argv)
    inherit_from_adapter(args, resolve_model(args.model_id))
    model, tokenizer, _ = load_for_inference(args, select_precision(args, warn=lambda *_: None))
    return model, tokenizer, prompts.prompt_format(args, tokenizer, "triviaqa")


def _oracle(model, tokenizer, questions, fmt):
    from common.data.prompts import generation_prompt
    from common.evaluation.answers import stop_token_ids

    stops = set(stop_token_ids(tokenizer))
    out = []
    for q in questions:
        prompt = tokenizer(generation_prompt(q, fmt, tokenizer), add_special_tokens=not fmt.use_chat)["input_ids"]
        out.append(cache_free_greedy(model, prompt, stops, lambda new: "\n" in tokenizer.decode(new), MAX_NEW))
    return out


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_generation_equals_cache_free_greedy(trained, chat, questions):
    from common.evaluation.answers import stop_token_ids, answer_from_ids, generate_answers, generate_ids

    technique, run_dir = trained
    model, tokenizer, fmt = _load(run_dir, technique, chat)
    assert fmt.use_chat is chat
    expected = _oracle(model, tokenizer, questions, fmt)
    expected_answers = [answer_from_ids(tokenizer, ids, stop_token_ids(tokenizer)) for ids in expected]
    for batch_size in (1, 16):
        assert generate_ids(model, tokenizer, questions, fmt, batch_size, MAX_NEW) == expected, batch_size
        assert generate_answers(model, tokenizer, questions, fmt, batch_size, MAX_NEW) == expected_answers
    # The adapter must matter, or the comparison above proves nothing about it.
    with model.disable_adapter():
        plain = _oracle(model, tokenizer, questions, fmt)
    assert plain != expected


class _Scripted(torch.nn.Module):
    """A 'model' whose greedy continuation of any prompt is a fixed list of token ids."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.script, self.vocab_size = script, vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.prompt_width = 0

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **_):
        from types import SimpleNamespace

        if past_key_values is None:
            self.prompt_width = attention_mask.shape[1]
        step = attention_mask.shape[1] - self.prompt_width
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab_size)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values="cache")


# Generated text (as the model wrote it, "</s>" being its EOS token) -> the answer evaluate.py scores.
COMPLETIONS = [
    (" Paris", "Paris"),
    ("\n Paris", ""),                        # leading newline: generation ends before the answer
    (" \nParis", ""),
    (" Paris\nQuestion: What else?", "Paris"),  # trailing text after the line
    (" Paris France", "Paris France"),        # trailing text on the line: partial F1
    (" Paris</s> and more", "Paris"),         # EOS mid-line
    ("</s> Paris", ""),
    ("   ", ""),                             # whitespace only
    ("\n", ""),
    (" The paris.", "The paris."),
]


@pytest.mark.parametrize("text,answer", COMPLETIONS)
def test_rl_reward_equals_evaluate_score_of_the_same_text(text, answer, tiny_llama):
    """The TriviaQA rewards of GRPO/PPO score a completion exactly as evaluate.py scores the same
    generated text (one extraction rule); evaluate's answer is checked against the hand-written one."""
    from transformers import AutoTokenizer

    from common.data.prompts import PromptFormat
    from common.evaluation.answers import evaluate_qa
    from common.model.loading import ensure_pad_token
    from rlhf.rewards import triviaqa_em, triviaqa_f1

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ensure_pad_token(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    model = _Scripted(ids, len(tokenizer))
    aliases = ["Paris", "Paris, France"]
    _, records = evaluate_qa(model, tokenizer, [{"question": "Capital of France?", "aliases": aliases}],
                             PromptFormat())
    assert records[0]["prediction"] == answer
    assert triviaqa_em([text], [aliases]) == [records[0]["em"]]
    assert triviaqa_f1([text], [aliases]) == [records[0]["f1"]]


@pytest.mark.parametrize("peft_type", ["PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"])
@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_bert"])
def test_prompt_learning_on_absolute_positions_equals_cache_free_greedy(arch, peft_type, request, questions):
    """GPT-2 and BERT learn absolute position embeddings: under left padding (batch 16, prompts of
    unequal length) a wrong position id changes the answer. Fresh adapters (random virtual tokens,
    scaled up so that they matter) against the cache-free oracle; no training needed."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.data.prompts import PromptFormat, generation_prompt
    from common.evaluation.answers import stop_token_ids, generate_ids
    from common.model.loading import ensure_eos_token, ensure_pad_token

    path = request.getfixturevalue(arch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_eos_token(tokenizer, path)
    ensure_pad_token(tokenizer)
    config = {"PREFIX_TUNING": PrefixTuningConfig, "PROMPT_TUNING": PromptTuningConfig,
              "P_TUNING": PromptEncoderConfig}[peft_type](task_type="CAUSAL_LM", num_virtual_tokens=5)
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(path, **({"is_decoder": True} if arch == "tiny_bert" else {}))
    model = get_peft_model(base, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(3.0)
    fmt = PromptFormat()
    stops = set(stop_token_ids(tokenizer))
    from common.evaluation.answers import prompt_ids

    prompts = prompt_ids(tokenizer, [generation_prompt(q, fmt, tokenizer) for q in questions], False)
    assert len({len(p) for p in prompts}) > 1
    expected = [cache_free_greedy(model, p, stops, lambda new: "\n" in tokenizer.decode(new), MAX_NEW)
                for p in prompts]
    for batch_size in (1, 16):
        assert generate_ids(model, tokenizer, questions, fmt, batch_size, MAX_NEW) == expected, batch_size
    with model.disable_adapter():
        plain = [cache_free_greedy(model, p, stops, lambda new: "\n" in tokenizer.decode(new), MAX_NEW)
                 for p in prompts]
    assert plain != expected


def test_newline_ids_belong_to_their_tokenizer_even_at_a_reused_address(monkeypatch):
    """Reference: the ids whose decoded text holds a newline, computed here per tokenizer. Two
    tokenizers of one length, the first gone before the second is made, may share an id() in
    CPython; simulated by making id() constant. The second must not get the first's newline ids."""
    from common.evaluation import generation
    from common.model.tiny_model import build_tokenizer

    monkeypatch.setattr(generation, "id", lambda obj: 12345, raising=False)
    with_newline, without = build_tokenizer(), build_tokenizer()
    with_newline.add_tokens(["odd\ntoken"])
    without.add_tokens(["oddtoken"])
    assert len(with_newline) == len(without)
    for tok in (with_newline, without):
        reference = {i for i in range(len(tok)) if "\n" in tok.decode([i])}
        assert generation.newline_ids(tok) == reference


def _lora_model(model_dir, dtype=torch.float32, **lora):
    return peft_llama(model_dir, dtype=dtype, **lora).eval()


def _swapped(model):
    return sum("forward" in vars(m) for m in model.modules())


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
@pytest.mark.parametrize("case", ["lora", "lora_bias", "bf16_base_fp32_adapter"])
def test_plain_lora_forward_logits_equal_peft_forward(case, tiny_llama):
    """generation.py's lean LoRA forward against PEFT's own: bit for bit the same logits."""
    from common.evaluation.generation import plain_lora_forward

    if case == "bf16_base_fp32_adapter":  # as qlora.py/`--use_bfloat16` train: the input is cast to the adapter's dtype
        model = _lora_model(tiny_llama, dtype=torch.bfloat16)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
    else:
        model = _lora_model(tiny_llama, lora_bias=case == "lora_bias")
    ids = torch.randint(3, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with plain_lora_forward(model):
            assert _swapped(model) == 7 * model.config.num_hidden_layers
            got = model(input_ids=ids).logits
            with model.disable_adapter():  # switched off inside the block: the base model's logits
                base = model(input_ids=ids).logits
        with model.disable_adapter():
            expected_base = model(input_ids=ids).logits
    assert _swapped(model) == 0  # PEFT's forward is back
    assert torch.equal(base, expected_base) and not torch.equal(base, expected)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_plain_lora_forward_leaves_other_layers_to_peft(tiny_llama):
    from common.evaluation.generation import plain_lora_forward

    dora = _lora_model(tiny_llama, use_dora=True)
    two = _lora_model(tiny_llama)
    two.add_adapter("second", two.peft_config["default"])
    two.base_model.set_adapter(["default", "second"])
    hooked = _lora_model(tiny_llama)
    layer = hooked.get_base_model().model.layers[0].self_attn.q_proj
    layer.base_layer.register_forward_hook(lambda *args: None)
    training = _lora_model(tiny_llama).train()
    for model, expected in ((dora, 0), (two, 0), (training, 0),
                            (hooked, 7 * hooked.config.num_hidden_layers - 1)):
        with plain_lora_forward(model):
            assert _swapped(model) == expected
        assert _swapped(model) == 0


def _fsdp_generation_worker(rank, world, port, model_dir, out):
    import os

    import torch.distributed as dist
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from common.evaluation.generation import greedy_generate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _lora_model(model_dir)  # the same seed, the same adapter on both processes
        prompts = [[1, 40, 41, 42], [1, 50, 51], [1, 60, 61, 62, 63]]
        expected = greedy_generate(model, prompts, pad_id=0, stop_ids=[2], max_new_tokens=5)
        wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                       device_id=torch.device("cpu"))
        try:
            got = greedy_generate(wrapped, prompts, pad_id=0, stop_ids=[2], max_new_tokens=5)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            got = f"{type(exc).__name__}: {exc}"
        (out / f"rank{rank}.txt").write_text(repr((got, expected)))
    finally:
        dist.destroy_process_group()


def test_generation_under_fsdp_equals_the_unwrapped_model(tiny_llama, tmp_path):
    """Two gloo processes, FULL_SHARD with the auto-wrap policy the Trainer uses for PEFT models: each
    LoRA matrix is an FSDP unit whose weights exist only while FSDP runs it. In-training evaluation
    under FSDP must still answer as the unwrapped model does."""
    import torch.multiprocessing as mp

    from tests.test_distributed import _free_port

    mp.spawn(_fsdp_generation_worker, args=(2, _free_port(), tiny_llama, tmp_path), nprocs=2)
    for rank in range(2):
        got, expected = eval((tmp_path / f"rank{rank}.txt").read_text())
        assert got == expected
