"""The SFT loss computed only at labelled positions (common/model/loss.py) against the plain path: full
logits from the model's own forward, shifted by hand, cross-entropy summed over the labelled
positions. Same loss, same gradients, same logged entropy and token accuracy, for every SFT
technique, with and without gradient checkpointing and with the Trainer's `num_items_in_batch`."""

import pytest
import torch

from common.model import loss as sft_loss

ROWS = [("Question: Which planet is known as the red planet?\nAnswer:", " Mars"),
        ("Question: Who wrote Hamlet?\nAnswer:", " William Shakespeare"),
        ("Question: In which year did the Berlin Wall fall?\nAnswer:", " 1989"),
        ("Question: What is the capital city of Australia and its largest inland city?\nAnswer:", " Canberra")]
VIRTUAL = 4


def _peft_config(technique):
    from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    if technique in ("lora", "dora", "qlora"):
        return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM",
                          use_dora=technique == "dora")
    if technique == "prompt_tuning":
        return PromptTuningConfig(num_virtual_tokens=VIRTUAL, task_type="CAUSAL_LM")
    if technique == "p_tuning":
        return PromptEncoderConfig(num_virtual_tokens=VIRTUAL, encoder_hidden_size=32, encoder_dropout=0.0,
                                   task_type="CAUSAL_LM")
    return PrefixTuningConfig(num_virtual_tokens=VIRTUAL, task_type="CAUSAL_LM")


def _trainer(technique, model_dir, tmp_path, gradient_checkpointing=False):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from common.model.loading import ensure_pad_token

    torch.manual_seed(0)
    kwargs = {}
    if technique == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ensure_pad_token(tokenizer)
    model = get_peft_model(model, _peft_config(technique))
    # Random, not zero, adapter weights: with LoRA's B = 0 the adapter would not change the logits
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in ROWS])
    config = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", max_length=64,
                       gradient_checkpointing=gradient_checkpointing,
                       gradient_checkpointing_kwargs={"use_reentrant": False}, use_cpu=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    if gradient_checkpointing:
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    return trainer, batch


def _plain_loss(model, batch, num_items):
    """The oracle: full logits, the virtual tokens' positions dropped, labels shifted by hand."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1]:]  # prompt tuning / P-tuning prepend tokens
    labels = batch["labels"][:, 1:]
    log_p = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    mask = labels != -100
    picked = log_p[mask].gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
    count = mask.sum() if num_items is None else num_items
    with torch.no_grad():
        entropy = -(log_p[mask].exp() * log_p[mask]).sum(-1).mean()
        accuracy = (log_p[mask].argmax(-1) == labels[mask]).float().mean()
    return -picked.sum() / count, entropy.item(), accuracy.item()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


TECHNIQUES = ["lora", "dora", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning"]


# Every technique with and without gradient checkpointing, except prefix tuning with it: PEFT refuses
# that combination, and sft.run turns checkpointing off for prefix tuning.
CASES = [(t, ckpt) for t in TECHNIQUES for ckpt in (False, True) if not (t == "prefix_tuning" and ckpt)]


@pytest.mark.parametrize("technique,gradient_checkpointing", CASES,
                         ids=[f"{t}-{'ckpt' if c else 'no_ckpt'}" for t, c in CASES])
def test_selected_positions_loss_and_grads_equal_full_logits_oracle(technique, gradient_checkpointing,
                                                                    tiny_llama, tmp_path):
    trainer, batch = _trainer(technique, tiny_llama, tmp_path, gradient_checkpointing)
    assert sft_loss.install(trainer)
    model = trainer.model
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    for num_items in (None, torch.tensor(2 * labelled + 3)):  # gradient accumulation: counts of all micro-batches
        model.zero_grad()
        expected, entropy, accuracy = _plain_loss(model, batch, num_items)
        expected.backward()
        want = _grads(model)
        model.zero_grad()
        got = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
        got.backward()
        have = _grads(model)
        assert abs(got.item() - expected.item()) <= 1e-5 * abs(expected.item())
        assert want.keys() == have.keys() and want
        worst = max(_rel(have[n], want[n]) for n in want)
        assert worst <= 1e-5, worst
        assert trainer._metrics["train"]["entropy"][-1] == pytest.approx(entropy, rel=1e-5)
        assert trainer._metrics["train"]["mean_token_accuracy"][-1] == pytest.approx(accuracy, rel=1e-6)


class _VocabWideTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the rows of every new tensor an op produces whose last dimension is the vocabulary
    (views, such as the LM head weight transposed, are not new)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.rows.append(t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("chunk_rows", [None, 3], ids=["one_chunk", "chunks_of_3"])
def test_vocabulary_projection_only_at_labelled_positions(chunk_rows, tiny_llama, tmp_path, monkeypatch):
    trainer, batch = _trainer("lora", tiny_llama, tmp_path)
    vocab = trainer.model.get_output_embeddings().weight.shape[0]
    if chunk_rows:
        monkeypatch.setattr(sft_loss, "CHUNK_ELEMENTS", chunk_rows * vocab)
    sft_loss.install(trainer)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    positions = batch["input_ids"].numel()
    assert labelled < positions // 3  # completion-only: most positions carry no label
    spy = _VocabWideTensors(vocab)
    with spy:
        trainer.compute_loss(trainer.model, dict(batch)).backward()
    assert spy.rows, "no vocabulary-wide tensor was seen: the spy is broken"
    assert max(spy.rows) == (chunk_rows or labelled)


def test_chunked_log_probs_equal_one_chunk():
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    whole = sft_loss.selected_log_probs(hidden, weight, None, targets, chunk_elements=10**6)
    g_whole = torch.autograd.grad(whole[0].sum(), (hidden, weight))
    chunked = sft_loss.selected_log_probs(hidden, weight, None, targets, chunk_elements=3 * 50)
    g_chunked = torch.autograd.grad(chunked[0].sum(), (hidden, weight))
    reference = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    for a, b in zip(whole, chunked):
        assert torch.allclose(a.double(), b.double())
    assert torch.allclose(whole[0], reference)
    for a, b in zip(g_whole, g_chunked):
        assert torch.allclose(a, b)


def _preference_trainer(kind, model_dir, tmp_path):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from common.model.loading import ensure_pad_token

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), _peft_config("lora"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ensure_pad_token(tokenizer)
    common = dict(output_dir=str(tmp_path / "out"), report_to="none", max_length=64, use_cpu=True)
    if kind == "dpo":
        rows = [{"prompt": p, "chosen": c, "rejected": " Paris"} for p, c in ROWS]
        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    else:
        rows = [{"prompt": p, "completion": c, "label": i % 2 == 0} for i, (p, c) in enumerate(ROWS)]
        trainer = KTOTrainer(model=model, args=KTOConfig(**common, per_device_train_batch_size=4),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_preference_loss_grads_and_metrics_equal_trl_head(kind, tiny_llama, tmp_path):
    """DPO and KTO with the head at labelled positions only against TRL's own fused head, which
    scores every position on the CPU: same loss, gradients and logged metrics."""
    trainer, batch = _preference_trainer(kind, tiny_llama, tmp_path)
    model = trainer.model

    def run():
        model.zero_grad()
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(model, {k: v for k, v in batch.items()})
        loss.backward()
        return loss.item(), _grads(model), {k: v[-1] for k, v in trainer._metrics["train"].items()}

    want_loss, want_grads, want_metrics = run()
    assert sft_loss.install(trainer)
    vocab = model.get_output_embeddings().weight.shape[0]
    spy = _VocabWideTensors(vocab)
    with spy:
        got_loss, got_grads, got_metrics = run()
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert max(_rel(got_grads[n], want_grads[n]) for n in want_grads) <= 1e-5
    assert want_metrics.keys() == got_metrics.keys()
    for name, value in want_metrics.items():
        if name == "num_tokens":  # a running total
            continue
        assert got_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    positions = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
    assert max(spy.rows) < positions  # the prompts' positions were not projected


def test_trl_impl_keeps_trls_head_with_the_same_losses(tiny_llama, sample, tmp_path):
    """`--lm_head_impl trl`, the way back to the library's path: the vocabulary is projected at every
    position (TRL's head), and the losses equal those of our head (the reference for each other)."""
    from sft.run import train

    def losses(impl):
        run = train("lora", ["--model_id", tiny_llama, "--dataset_name", sample, "--max_train_samples", "8",
                             "--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1",
                             "--save_strategy", "no", "--report_to", "none", "--lora_r", "4", "--lora_dropout", "0",
                             "--output_dir", str(tmp_path / impl), "--lm_head_impl", impl])
        forward = run.trainer.model.get_base_model().forward
        installed = forward.__code__.co_filename == sft_loss.__file__
        return [e["loss"] for e in run.trainer.state.log_history if "loss" in e], installed

    (ours, ours_installed), (trl, trl_installed) = losses("ours"), losses("trl")
    assert ours_installed and not trl_installed
    assert ours == pytest.approx(trl, rel=1e-5)
