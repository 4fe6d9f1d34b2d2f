"""PPO: the arithmetic pinned by hand, then reward_model.py and ppo.py end to end on tiny models."""

import json
import math
import os
import shlex
import shutil
import signal
from pathlib import Path

import pytest
import torch

from rlhf import ppo_core as core
from tests.helpers import run_script, write_jsonl

T = torch.tensor


def test_gae_by_hand():
    rewards, values, mask = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.5, 0.5]]), T([[1.0, 1.0, 1.0]])
    adv, ret = core.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, T([[0.5, 0.5, 0.5]]))
    torch.testing.assert_close(ret, T([[1.0, 1.0, 1.0]]))
    adv, _ = core.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # delta = [-0.05, -0.05, 0.5]; A2 = 0.5, A1 = -0.05 + 0.45 * 0.5, A0 = -0.05 + 0.45 * A1
    torch.testing.assert_close(adv, T([[-0.05 + 0.45 * 0.175, 0.175, 0.5]]))


def test_gae_ignores_padding_after_eos():
    adv, ret = core.gae(T([[0.0, 1.0, 7.0]]), T([[0.5, 0.5, 9.0]]), T([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, T([[0.25, 0.5, 0.0]]))  # the episode ends at the last real token
    torch.testing.assert_close(ret, T([[0.75, 1.0, 0.0]]))


def test_whitening_by_hand():
    x, mask = T([1.0, 2.0, 3.0, 100.0]), T([1.0, 1.0, 1.0, 0.0])
    std = math.sqrt(1.0)  # unbiased variance of 1, 2, 3
    torch.testing.assert_close(core.masked_whiten(x, mask), T([-1.0 / std, 0.0, 1.0 / std, 0.0]), atol=1e-4,
                               rtol=0)
    unshifted = core.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(unshifted[:3], T([1.0, 2.0, 3.0]), atol=1e-4, rtol=0)


def test_kl_penalty_and_score_on_the_last_token():
    rewards, kl = core.per_token_rewards(T([2.0]), T([[-1.0, -2.0, -3.0]]), T([[-1.5, -1.0, -3.0]]),
                                         T([[1.0, 1.0, 0.0]]), kl_coef=0.1)
    torch.testing.assert_close(kl, T([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(rewards, T([[-0.05, 0.1 + 2.0, 0.0]]))


def test_clipped_policy_loss_by_hand():
    mask = T([[1.0, 1.0]])
    old = T([[0.0, 0.0]])
    loss, stats = core.policy_loss(old, old, T([[1.0, -1.0]]), mask, cliprange=0.2)
    assert loss.item() == pytest.approx(0.0) and stats["clipfrac"] == 0.0
    # ratio 1.5 with A=+1: min(1.5, 1.2) -> -1.2;  ratio 0.5 with A=-1: max(0.5, 0.8) -> 0.8
    new = T([[math.log(1.5), math.log(0.5)]])
    loss, stats = core.policy_loss(new, old, T([[1.0, -1.0]]), mask, cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats["clipfrac"] == 1.0
    assert stats["approx_kl"] == pytest.approx((0.5 * math.log(1.5) ** 2 + 0.5 * math.log(0.5) ** 2) / 2)


def test_clipped_value_loss_by_hand():
    loss, stats = core.value_loss(T([[1.0]]), T([[0.0]]), T([[1.0]]), T([[1.0]]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.2 - 1.0) ** 2) and stats["value_clipfrac"] == 1.0
    loss, _ = core.value_loss(T([[0.1]]), T([[0.0]]), T([[1.0]]), T([[1.0]]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.9 ** 2)


def test_adaptive_kl_controller():
    fixed = core.AdaptiveKLController(0.1, target=None)
    fixed.update(10.0, 100)
    assert fixed.value == 0.1
    ctl = core.AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(5.0, 10)  # error clipped to +0.2 -> * (1 + 0.2 * 10 / 100)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(0.0, 10)
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)


SFT = ["--dataset_name", "triviaqa-sample", "--per_device_train_batch_size", "16", "--save_strategy", "no",
       "--report_to", "none", "--learning_rate", "1e-2"]


@pytest.fixture(scope="module")
def sft_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "lora"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", out, "--num_train_epochs", "3",
                                  *SFT]) == 0
    return out


PPO = ["--dataset_name", "triviaqa-sample", "--per_device_train_batch_size", "16", "--save_strategy", "no",
       "--report_to", "none"]


def test_ppo_learns_a_learnable_reward(sft_run, tiny_llama, tmp_path, monkeypatch):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhf import rewards
    from rlhf.ppo import train

    # Reward: the answer contains a digit. The SFT model gives numeric answers now and then; PPO
    # has to make that its habit. The tiny SFT model is close to uniform over its vocabulary, and at
    # temperature 1 sixteen rollouts a step carry too little signal: whether it learns then depends on
    # the CPU's rounding. At temperature 0.7 it learns from ~0.05 to ~0.95 within 30 steps for every
    # seed and kernel tried (seeds 1, 2, 3, 42; 1 and 2 threads; ATEN_CPU_CAPABILITY=default), so the
    # test asks for a rise of 0.4 between the means of the first and the last five steps.
    monkeypatch.setitem(rewards.REWARD_FUNCTIONS, "has_digit",
                        lambda responses, aliases: [float(any(c.isdigit() for c in r)) for r in responses])
    out = tmp_path / "ppo"
    result = train(["--model_id", sft_run, "--output_dir", out, "--reward_function", "has_digit", "--max_steps",
                    "30", "--learning_rate", "3e-3", "--kl_coef", "0.01", "--response_length", "4",
                    "--temperature", "0.7", "--gradient_checkpointing", "False", *PPO])
    scores = [e["score"] for e in result.history]
    assert sum(scores[-5:]) / 5 > sum(scores[:5]) / 5 + 0.4, scores
    for entry in result.history:
        for key in ("score", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "policy_loss",
                    "response_length", "learning_rate"):
            assert math.isfinite(entry[key]), (key, entry)
    logged = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert len(logged) == 30 and all("kl" in e for e in logged)
    assert (out / "plots" / "kl.png").is_file() and (out / "plots" / "rewards.png").is_file()

    # The saved policy adapter reloads with the trained logits; the value head is saved beside it.
    assert not (out / "ref").exists()
    head = load_file(out / "value_head.safetensors")
    assert head["weight"].shape == (1, 64)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]])}
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, result.policy.eval()(**batch).logits, atol=1e-4,
                                   rtol=1e-4)


def test_ppo_reference_is_the_sft_model(sft_run, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf.ppo import train

    result = train(["--model_id", sft_run, "--output_dir", tmp_path / "p", "--reward_function", "triviaqa_em",
                    "--max_steps", "2", *PPO])
    policy = result.policy
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]])}
    policy.set_adapter("ref", inference_mode=True)
    with torch.no_grad():
        reference = policy(**batch).logits
    policy.set_adapter("default")
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), sft_run).eval()
    with torch.no_grad():
        torch.testing.assert_close(reference, sft(**batch).logits, atol=1e-5, rtol=1e-5)


def test_triviaqa_reward_path_after_sft_and_evaluate_takes_the_policy(sft_run, tmp_path):
    out = tmp_path / "ppo-tqa"
    assert run_script("ppo.py", ["--model_id", sft_run, "--output_dir", out, "--reward_function", "triviaqa_f1",
                                 "--max_steps", "3", "--missing_eos_penalty", "1.0", "--target_kl", "0.5",
                                 *PPO]) == 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["reward"] == "triviaqa_f1" and config["summary"]["rollouts"] == 48
    assert run_script("evaluate.py", ["--model_id", out, "--dataset_name", "triviaqa-sample", "--max_samples", "4",
                                      "--output_dir", tmp_path / "eval"]) == 0


@pytest.fixture(scope="module")
def learnable_pairs(tmp_path_factory):
    import random

    rng = random.Random(0)
    rows = [{"prompt": f"Question: is item {i} any good?\nAnswer:",
             "chosen": rng.choice([" yes, it is good", " good", " very good indeed"]),
             "rejected": rng.choice([" bad", " no, it is bad", " very bad"])} for i in range(240)]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


def test_reward_model_learns_pairs_and_ppo_uses_it(learnable_pairs, tiny_llama, tmp_path):
    rm = tmp_path / "rm"
    assert run_script("reward_model.py", ["--model_id", tiny_llama, "--dataset_name", learnable_pairs,
                                          "--output_dir", rm, "--max_steps", "30", "--learning_rate", "5e-3",
                                          "--per_device_train_batch_size", "16", "--save_strategy", "no",
                                          "--report_to", "none"]) == 0
    config = json.loads((rm / "run_config.json").read_text())
    assert config["summary"]["heldout_accuracy"] >= 0.8
    assert config["data"]["heldout_pairs"] == 24
    assert json.loads((rm / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    out = tmp_path / "ppo-rm"
    assert run_script("ppo.py", ["--model_id", tiny_llama, "--output_dir", out, "--reward_model", rm,
                                 "--max_steps", "2", *PPO]) == 0
    assert json.loads((out / "run_config.json").read_text())["reward"].startswith("reward model")


def test_reward_model_of_another_vocabulary_exits_2(tiny_llama, learnable_pairs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from common.model.tiny_model import build_model_config, build_tokenizer

    tok = build_tokenizer(vocab_size=600)
    AutoModelForCausalLM.from_config(build_model_config("llama", len(tok))).save_pretrained(tmp_path / "small")
    tok.save_pretrained(tmp_path / "small")
    rm = tmp_path / "rm-small"
    assert run_script("reward_model.py", ["--model_id", tmp_path / "small", "--dataset_name", learnable_pairs,
                                          "--output_dir", rm, "--max_steps", "1", "--report_to", "none"]) == 0
    capsys.readouterr()
    assert run_script("ppo.py", ["--model_id", tiny_llama, "--output_dir", tmp_path / "p", "--reward_model", rm,
                                 "--max_steps", "1", *PPO]) == 2
    assert "another vocabulary" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--reward_function", "triviaqa_exact"], "`--reward_function triviaqa_exact` does not exist"),
    ([], "exactly one of"),
    (["--reward_function", "triviaqa_em", "--reward_model", "x"], "exactly one of"),
    (["--reward_function", "triviaqa_em", "--lam", "1.5"], "--lam"),
    (["--reward_function", "triviaqa_em", "--max_prompt_length", "5"], "longer than `--max_prompt_length 5`"),
])
def test_ppo_bad_input_exits_2(argv, match, tiny_llama, tmp_path, capsys):
    assert run_script("ppo.py", ["--model_id", tiny_llama, "--output_dir", tmp_path / "p", *PPO, *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "p" / "adapter_config.json").exists()


# Checkpoints, resuming and Ctrl-C -------------------------------------------------------------

def _ppo_history(folder) -> list[dict]:
    return json.loads((Path(folder) / "trainer_state.json").read_text())["log_history"]


def _interrupt_during_update(monkeypatch, call: int, signum=signal.SIGINT) -> None:
    """Sends this process `signum` during the given PPO update (1-based)."""
    from rlhf import ppo_loop

    original, seen = ppo_loop.ppo_epochs, []

    def epochs(*args, **kwargs):
        seen.append(1)
        if len(seen) == call:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(ppo_loop, "ppo_epochs", epochs)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ppo_stopped_and_resumed_matches_an_uninterrupted_run(signum, tiny_llama, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from common.recipe.outputs import is_finished_run, last_complete_checkpoint

    # A checkpoint every 2 steps (only the newest kept), so the stop at step 3 adds its own.
    argv = ["--model_id", tiny_llama, "--reward_function", "triviaqa_f1", "--max_steps", "5", "--response_length",
            "4", "--per_device_train_batch_size", "4", "--num_mini_batches", "2", "--dataset_name",
            "triviaqa-sample", "--max_train_samples", "10", "--report_to", "none", "--save_strategy", "steps",
            "--save_steps", "2", "--save_total_limit", "1", "--learning_rate", "3e-3"]
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    assert run_script("ppo.py", argv + ["--output_dir", reference]) == 0
    # 8 rollouts a step from 10 prompts: the order is reshuffled on the way, at step 2 and 3.

    handler = signal.getsignal(signum)
    _interrupt_during_update(monkeypatch, 3, signum)
    assert run_script("ppo.py", argv + ["--output_dir", out]) == 128 + signum
    assert signal.getsignal(signum) is handler
    err = capsys.readouterr().err
    assert "Traceback" not in err and not is_finished_run(out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]  # the step-2 one rotated away
    # What a kill while saving the next checkpoint leaves: its staging folder, never a checkpoint-N.
    (out / ".checkpoint-4.tmp").mkdir()
    (out / ".checkpoint-4.tmp" / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    assert last_complete_checkpoint(out) == str(out / "checkpoint-3")
    hint = next(line for line in err.splitlines() if "Resume with: " in line)
    assert hint.startswith("ppo.py: stopped at step 3;")
    command = shlex.split(hint.split("Resume with: ", 1)[1])
    assert command[:2] == ["python", "ppo.py"] and command[-2:] == ["--resume_from_checkpoint", "auto"]

    monkeypatch.undo()
    assert run_script("ppo.py", command[2:]) == 0
    assert "PPO resumes after step 3" in capsys.readouterr().err
    assert is_finished_run(out) and not (out / ".checkpoint-4.tmp").exists()
    resumed, uninterrupted = _ppo_history(out), _ppo_history(reference)
    assert [e["step"] for e in resumed] == [1, 2, 3, 4, 5]
    for key in ("score", "kl", "policy_loss", "value_loss", "kl_coef", "learning_rate"):
        assert [e[key] for e in resumed] == pytest.approx([e[key] for e in uninterrupted], rel=1e-4, abs=1e-6), key
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(out / name), load_file(reference / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_ppo_save_total_limit_counts_only_complete_checkpoints(tiny_llama, tmp_path):
    # The same rule as the Trainer-based scripts (common.outputs.rotate_checkpoints): an incomplete
    # checkpoint, here one of a higher step left by an earlier killed run, never pushes the newest
    # complete one out, and goes itself once a complete one is newer.
    from common.recipe.outputs import is_complete_checkpoint

    out = tmp_path / "run"
    leftover = out / "checkpoint-100"
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    os.utime(leftover, (1, 1))
    argv = ["--model_id", tiny_llama, "--reward_function", "triviaqa_f1", "--max_steps", "5", "--response_length",
            "4", "--per_device_train_batch_size", "4", "--num_mini_batches", "2", "--dataset_name",
            "triviaqa-sample", "--max_train_samples", "10", "--report_to", "none", "--save_strategy", "steps",
            "--save_steps", "2", "--save_total_limit", "1", "--output_dir", out]  # checkpoints at steps 2 and 4
    assert run_script("ppo.py", argv) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert is_complete_checkpoint(out / "checkpoint-4")


def test_ppo_resume_refuses_a_checkpoint_it_did_not_write(tiny_llama, tmp_path, capsys):
    sft = tmp_path / "sft"
    assert run_script("lora.py", ["--model_id", tiny_llama, "--output_dir", sft, "--max_steps", "2", *SFT,
                                  "--save_strategy", "steps", "--save_steps", "1"]) == 0
    assert run_script("ppo.py", ["--model_id", tiny_llama, "--output_dir", sft, "--reward_function",
                                 "triviaqa_em", "--resume_from_checkpoint", sft / "checkpoint-1", *PPO]) == 2
    err = capsys.readouterr().err
    assert "not a ppo.py checkpoint" in err and "Traceback" not in err


def test_ppo_gradient_checkpointing_recomputes_layers_without_dropout(tiny_llama, tmp_path, monkeypatch):
    from transformers.modeling_layers import GradientCheckpointingLayer

    from rlhf import ppo, ppo_loop

    seen = []
    updates = ppo_loop.ppo_updates

    def spy(wrapper, *args, **kwargs):
        layers = [m for m in wrapper.modules() if isinstance(m, GradientCheckpointingLayer)]
        dropout_training = any(m.training for m in wrapper.modules() if isinstance(m, torch.nn.Dropout))
        seen.append((bool(layers) and all(m.training and m.gradient_checkpointing for m in layers), dropout_training))
        return updates(wrapper, *args, **kwargs)

    monkeypatch.setattr(ppo_loop, "ppo_updates", spy)
    argv = ["--model_id", tiny_llama, "--reward_function", "triviaqa_f1", "--max_steps", "3", "--response_length", "4",
            "--per_device_train_batch_size", "4", "--max_train_samples", "16", "--learning_rate", "3e-3", *PPO]
    on = ppo.train(argv + ["--output_dir", tmp_path / "on"])
    assert seen == [(True, False)] * 3  # decoder layers recompute; dropout stays off, as in the rollouts
    seen.clear()
    off = ppo.train(argv + ["--output_dir", tmp_path / "off", "--gradient_checkpointing", "False"])
    assert seen == [(False, False)] * 3
    # Recomputing changes memory, not results.
    for key in ("score", "policy_loss", "value_loss", "approx_kl"):
        assert [e[key] for e in on.history] == pytest.approx([e[key] for e in off.history], rel=1e-4, abs=1e-6)


# The policy ratio before the first update, on every architecture ------------------------------

# Each with dropout 0.1 where its config has it: Llama in attention, GPT-2 in nn.Dropout modules,
# GPT-NeoX in nn.Dropout modules, OPT in F.dropout calls of its decoder layers.
ARCHITECTURES = {"llama": {"attention_dropout": 0.1}, "gpt2": {}, "gpt_neox": {}, "opt": {}}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from common.model.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("archs")
    return {arch: build_tiny_model(str(root / arch), arch, **overrides) for arch, overrides in ARCHITECTURES.items()}


START = ["--reward_function", "triviaqa_f1", "--max_steps", "2", "--ppo_epochs", "1", "--response_length", "4",
         "--per_device_train_batch_size", "4", "--max_train_samples", "8", "--learning_rate", "3e-3",
         "--dataset_name", "triviaqa-sample", "--save_strategy", "no", "--report_to", "none"]


@pytest.mark.parametrize("checkpointing", ["True", "False"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_ppo_ratio_is_one_before_the_first_update(arch, checkpointing, tiny_models, tmp_path):
    """Before any optimizer step on a batch of rollouts the policy is the one that sampled them: the
    ratio is 1 and approx-KL 0, with gradient checkpointing (layers in training mode) or not."""
    from rlhf.ppo import train

    result = train(["--model_id", tiny_models[arch], "--output_dir", tmp_path / "p", "--gradient_checkpointing",
                    checkpointing, *START])
    for entry in result.history:  # the first micro-batch of every step
        assert entry["start_ratio_max_dev"] < 1e-5, (arch, entry)
        assert entry["start_approx_kl"] < 1e-10, (arch, entry)


@pytest.mark.slow
def test_ppo_two_processes_log_the_learning_rate_and_ratio_of_one_process(tiny_models, tmp_path):
    """accelerate's prepared scheduler steps once per process; the schedule must not depend on the
    number of processes. OPT with dropout 0.1 and gradient checkpointing on (the default): the
    architecture where dropout could leak into the updates. (The other architectures are covered
    with one process above; a two-process launch costs ~20 s, so one is run here.)"""
    from rlhf.ppo import train
    from tests.test_distributed import _launch, torchrun

    argv = ["--model_id", tiny_models["opt"], "--reward_function", "triviaqa_f1", "--max_steps", "4", "--ppo_epochs",
            "1", "--per_device_train_batch_size", "4", "--lr_scheduler_type", "linear", "--response_length", "4",
            "--dataset_name", "triviaqa-sample", "--save_strategy", "no", "--report_to", "none"]
    one = train([*argv, "--output_dir", tmp_path / "one"]).history
    _launch(torchrun(), "ppo.py", [*argv, "--output_dir", tmp_path / "two"], tmp_path)
    two = _ppo_history(tmp_path / "two")
    expected = [1e-4 * (1 - k / 4) for k in range(1, 5)]  # linear decay over 4 optimizer steps
    assert [e["learning_rate"] for e in one] == pytest.approx(expected)
    assert [e["learning_rate"] for e in two] == pytest.approx(expected)
    for history in (one, two):
        assert history[0]["start_ratio_max_dev"] < 1e-5 and history[0]["start_approx_kl"] < 1e-10, history[0]


# Rollouts follow the policy only -----------------------------------------------------------

def _spy_on_sampling(monkeypatch) -> list:
    """Records, for every generate() call, the largest difference between the sampler's log-prob of
    each sampled token (after every logits processor generate() applied) and the policy's own
    log-softmax(logits / temperature), up to the first EOS."""
    from transformers import GenerationMixin

    original, deviations = GenerationMixin.generate, []

    def generate(self, *args, **kwargs):
        kwargs.update(output_scores=True, output_logits=True, return_dict_in_generate=True)
        out = original(self, *args, **kwargs)
        config = kwargs.get("generation_config")
        temperature = kwargs.get("temperature") or (config.temperature if config is not None else 1.0)
        eos = self.generation_config.eos_token_id if config is None else config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or [])
        new = out.sequences[:, -len(out.scores):]
        worst = 0.0
        for row in range(new.size(0)):
            for t in range(new.size(1)):
                token = new[row, t].item()
                sampler = torch.log_softmax(out.scores[t][row].float(), -1)[token]
                policy = torch.log_softmax(out.logits[t][row].float() / temperature, -1)[token]
                worst = max(worst, abs((sampler - policy).item()))
                if token in eos:
                    break
        deviations.append(worst)
        return out.sequences

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    return deviations


@pytest.fixture(scope="module")
def model_with_decoding_preferences(tiny_llama, tmp_path_factory):
    """tiny_llama with a generation_config.json as released chat models ship them."""
    from transformers import GenerationConfig

    folder = tmp_path_factory.mktemp("prefs") / "model"
    shutil.copytree(tiny_llama, folder)
    config = GenerationConfig.from_pretrained(folder)
    config.update(do_sample=True, temperature=0.6, repetition_penalty=1.3, top_k=5, top_p=0.5, min_p=0.2,
                  no_repeat_ngram_size=1, typical_p=0.9)
    config.save_pretrained(folder)
    return str(folder)


def test_ppo_rollouts_equal_the_policy_distribution_despite_generation_config(model_with_decoding_preferences,
                                                                             tmp_path, monkeypatch):
    from rlhf.ppo import train

    deviations = _spy_on_sampling(monkeypatch)
    train(["--model_id", model_with_decoding_preferences, "--output_dir", tmp_path / "p", *START])
    assert len(deviations) == 2 and max(deviations) < 1e-4, deviations


def test_grpo_samples_from_the_policy_distribution_despite_generation_config(model_with_decoding_preferences,
                                                                            tmp_path, monkeypatch):
    from rlhf.grpo import train

    deviations = _spy_on_sampling(monkeypatch)
    train(["--model_id", model_with_decoding_preferences, "--output_dir", tmp_path / "g", "--reward_function",
           "triviaqa_f1", "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "4",
           "--max_completion_length", "4", "--dataset_name", "triviaqa-sample", "--max_train_samples", "8",
           "--save_strategy", "no", "--report_to", "none"])
    assert deviations and max(deviations) < 1e-4, deviations


# The reward model sees the format it was trained on ------------------------------------------

def test_ppo_reward_model_scores_equal_the_reward_model_on_its_training_format(sft_run, learnable_pairs,
                                                                              tiny_llama, tmp_path, monkeypatch):
    """TRL's RewardTrainer trains on prompt + answer + EOS. Reference: the reward model run by hand,
    one text at a time, on that format: EOS after a finished answer, none after a truncated one."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf import ppo, ppo_loop
    from rlhf.rewards import RewardModelScorer

    rm = tmp_path / "rm"
    assert run_script("reward_model.py", ["--model_id", tiny_llama, "--dataset_name", learnable_pairs,
                                          "--output_dir", rm, "--max_steps", "3", "--per_device_train_batch_size",
                                          "16", "--save_strategy", "no", "--report_to", "none"]) == 0
    rollouts, scored = [], []
    rollout, call = ppo_loop.sample_rollouts, RewardModelScorer.score_ids

    def spy_rollout(*args, **kwargs):
        rollouts.append(rollout(*args, **kwargs))
        return rollouts[-1]

    def spy_call(self, ids):
        scored.extend(call(self, ids))
        return scored[-len(ids):]

    monkeypatch.setattr(ppo_loop, "sample_rollouts", spy_rollout)
    monkeypatch.setattr(RewardModelScorer, "score_ids", spy_call)
    # At temperature 0.7 the SFT model ends some of its 2-token answers with EOS, not all.
    ppo.train(["--model_id", sft_run, "--output_dir", tmp_path / "p", "--reward_model", rm, "--max_steps", "2",
               "--response_length", "2", "--temperature", "0.7", "--ppo_epochs", "1", *PPO])

    tokenizer = AutoTokenizer.from_pretrained(rm)
    tokenizer.pad_token = tokenizer.unk_token
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, rm).eval()
    expected, finished = [], []
    for roll in rollouts:
        width = roll["full"].size(1) - roll["responses"].size(1)
        for row in range(roll["full"].size(0)):
            prompt_ids = roll["full"][row, :width][roll["attention"][row, :width].bool()]
            answer_ids = roll["responses"][row][roll["mask"][row].bool()]
            done = tokenizer.eos_token_id in answer_ids.tolist()
            text = (tokenizer.decode(prompt_ids, skip_special_tokens=True)
                    + tokenizer.decode(answer_ids, skip_special_tokens=True) + (tokenizer.eos_token if done else ""))
            with torch.no_grad():
                expected.append(model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item())
            finished.append(done)
    assert 0 < sum(finished) < len(finished), sum(finished)  # both kinds of answers were scored
    assert scored == pytest.approx(expected, abs=1e-4)
