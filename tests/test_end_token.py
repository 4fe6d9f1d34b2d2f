"""The end-of-answer token: BERT-style tokenizers have no EOS, so their SEP token ends answers;
a tokenizer with neither stops the run with one line saying how to fix it."""

import shlex
import shutil

import pytest

from tests.helpers import run_script


@pytest.fixture(scope="module")
def bert_base_shaped(tmp_path_factory):
    """bert-base-uncased's shape (768 wide, 12 layers, 12 heads) with a small MLP and a WordPiece
    vocabulary of the bundled sample: a BERT tokenizer ([CLS] ... [SEP], no EOS), offline."""
    from common.model.tiny_model import build_tiny_bert

    return build_tiny_bert(str(tmp_path_factory.mktemp("models") / "bert-shaped"), hidden_size=768,
                           num_hidden_layers=12, num_attention_heads=12, intermediate_size=128)


# The seed document's P-Tuning command, as written, on a local BERT-shaped model and the bundled data.
SEED_BERT = """--dataset_name "triviaqa" --dataset_split "train" --model_id "bert-base-uncased"
    --output_dir "./trained_prefix_tuning_model" --load_in_4bit True --bnb_4bit_use_double_quant True
    --bnb_4bit_quant_type "nf4" --use_bfloat16 True --use_cache False --num_train_epochs 3 --per_device_train_batch_size 2
    --gradient_accumulation_steps 4 --gradient_checkpointing True --optimizer "adamw_torch_fused" --logging_steps 50
    --save_strategy "epoch" --learning_rate 3e-4 --max_grad_norm 0.3 --warmup_ratio 0.1 --lr_scheduler_type "linear"
    --push_to_hub False --report_to "wandb" --peft_type "PREFIX_TUNING" --task_type "CAUSAL_LM" --num_virtual_tokens 30
    --token_dim 768 --num_transformer_submodules 1 --num_attention_heads 12 --num_layers 12 --encoder_hidden_size 768"""


@pytest.mark.slow
def test_seed_bert_command_ends_answers_with_sep(bert_base_shaped, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    argv = shlex.split(SEED_BERT)
    argv[argv.index("--model_id") + 1] = bert_base_shaped
    argv[argv.index("--dataset_name") + 1] = "triviaqa-sample"
    argv[argv.index("--report_to") + 1] = "none"
    monkeypatch.chdir(tmp_path)
    assert run_script("prefix_tuning.py", argv + ["--max_steps", "1"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if "no EOS token" in line]
    assert len(said) == 1 and "[SEP]" in said[0], said
    out = tmp_path / "trained_prefix_tuning_model"
    assert (out / "adapter_model.safetensors").is_file()
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.eos_token == saved.sep_token == "[SEP]"  # evaluation stops where training ended answers


def test_sep_token_ends_the_sft_answers(bert_base_shaped, tmp_path, monkeypatch):
    """The ids SFTTrainer trains on end with SEP, the token generation stops at."""
    from common.recipe import training
    from sft.run import train

    seen = {}

    def stop(trainer, *_):
        seen["ids"] = trainer.train_dataset["input_ids"]
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_guarded", stop)
    with pytest.raises(KeyboardInterrupt):
        train("lora", ["--model_id", bert_base_shaped, "--dataset_name", "triviaqa-sample", "--max_train_samples", "4",
                       "--output_dir", tmp_path / "o", "--report_to", "none", "--target_modules", "query,value"])
    sep = 3  # [SEP] in the fixture's vocabulary
    assert len(seen["ids"]) == 4 and all(ids[-1] == sep for ids in seen["ids"])


def test_tokenizer_without_eos_or_sep_exits_2(tiny_llama, tmp_path, capsys):
    import json

    model = tmp_path / "no-eos"
    shutil.copytree(tiny_llama, model)
    config = model / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["eos_token"] = None
    config.write_text(json.dumps(data))
    code = run_script("lora.py", ["--model_id", model, "--dataset_name", "triviaqa-sample", "--max_steps", "1",
                                  "--output_dir", tmp_path / "o", "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "eos_token" in lines[0] and str(model) in lines[0] and "Traceback" not in err
    assert not (tmp_path / "o" / "adapter_config.json").exists()


def test_bert_logits_equal_prefix_only_logits(bert_base_shaped, caplog):
    """A causal LM must not see the future: the logits at each position of a BERT-shaped model loaded
    by the scripts equal those computed from that position's prefix alone (the reference). Loaded
    as saved (is_decoder false, as bert-base-uncased ships), BERT attends both ways."""
    import logging

    import torch

    from common.evaluation.run import make_parser
    from common.model.loading import load_for_inference
    from common.model.precision import select_precision

    args = make_parser().parse(["--model_id", bert_base_shaped, "--dataset_name", "triviaqa-sample"])
    with caplog.at_level(logging.WARNING, logger="finetune"):
        model, tokenizer, _ = load_for_inference(args, select_precision(args))
    ids = tokenizer("question : who wrote hamlet ? answer : shakespeare", return_tensors="pt").input_ids
    with torch.no_grad():
        full = model(input_ids=ids).logits[0]
        for t in range(1, ids.shape[1] + 1):
            prefix = model(input_ids=ids[:, :t]).logits[0, -1]
            torch.testing.assert_close(full[t - 1], prefix, rtol=1e-4, atol=1e-4)
    said = [r.getMessage() for r in caplog.records if "is_decoder" in r.getMessage()]
    assert len(said) == 1 and "encoder model" in said[0]
