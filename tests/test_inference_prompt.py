"""The prompt a model answers at inference is, token for token, the prompt it was trained on.

The reference is SFTTrainer's own `input_ids` for a row, up to its first trained label: the ids
sft/run.py trains the model to continue. The ids generation feeds the model are recorded by a stub
model that ends every answer at once. A BERT tokenizer closes every text it encodes with [SEP] (the
end-of-answer token of these models); training never puts it between prompt and answer."""

import json

import pytest
import torch

from tests.helpers import prompt_ids_before_labels
from tests.test_pref_tokens import stop_before_training, tiny_llama_bos, _Built  # noqa: F401 (fixtures)

N = 4
ARGV = ["--dataset_name", "triviaqa-sample", "--max_train_samples", str(N), "--report_to", "none",
        "--save_strategy", "no"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A small BERT: WordPiece tokenizer ([CLS] ... [SEP], no EOS) on the bundled sample's words."""
    from common.model.tiny_model import build_tiny_bert

    return build_tiny_bert(str(tmp_path_factory.mktemp("models") / "tiny-bert"))


class _Recorder(torch.nn.Module):
    """Records the (unpadded) prompt ids of each first step; its answer is EOS at once."""

    def __init__(self, eos_id: int, vocab_size: int):
        super().__init__()
        self.eos_id, self.vocab_size, self.prompts = eos_id, vocab_size, []
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **_):
        from types import SimpleNamespace

        if past_key_values is None:
            for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
                self.prompts.append([t for t, m in zip(ids, mask) if m])
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab_size)
        logits[:, -1, self.eos_id] = 1.0
        return SimpleNamespace(logits=logits, past_key_values="cache")


MODELS = {"gpt2": "tiny_gpt2", "llama_bos": "tiny_llama_bos", "chat": "tiny_chat_llama", "bert": "tiny_bert"}


@pytest.mark.parametrize("arch", list(MODELS))
def test_generation_prompt_ids_equal_sft_trainer_prompt_ids(arch, request, tmp_path, stop_before_training):
    from common.data import prompts
    from common.data.sources import BUNDLED
    from common.evaluation.answers import generate_ids
    from common.evaluation.run import make_parser
    from common.model.loading import load_tokenizer
    from common.model.source import resolve_model
    from sft.run import train

    model_id = request.getfixturevalue(MODELS[arch])
    argv = ["--model_id", model_id, "--output_dir", tmp_path / "sft", *ARGV]
    if arch == "bert":
        argv += ["--target_modules", "query,value"]
    with pytest.raises(_Built) as built:
        train("lora", argv)
    trained = prompt_ids_before_labels(built.value.trainer.train_dataset)

    args = make_parser().parse(["--model_id", model_id, "--dataset_name", "triviaqa-sample"])
    tokenizer = load_tokenizer(resolve_model(model_id), args)
    fmt = prompts.prompt_format(args, tokenizer, "triviaqa")
    lines = (BUNDLED["triviaqa-sample"] / "train.jsonl").read_text(encoding="utf-8").splitlines()[:N]
    questions = [json.loads(line)["question"] for line in lines]
    recorder = _Recorder(tokenizer.eos_token_id, len(tokenizer))
    for batch_size in (1, N):
        recorder.prompts.clear()
        generate_ids(recorder, tokenizer, questions, fmt, batch_size=batch_size, max_new_tokens=2)
        assert sorted(recorder.prompts) == sorted(trained), [tokenizer.convert_ids_to_tokens(p[-3:])
                                                             for p in recorder.prompts]
