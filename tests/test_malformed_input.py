"""Issue #27's malformed inputs, generated for every script they apply to (tests/malformed.py):
each ends in one line on stderr naming the flag or file, exit code 2, no traceback and no output
directory that looks finished; the checks that need no model stop before any model loads. Flag
values and data bytes are also generated (hypothesis) against the checks that run first."""

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.flags.errors import UsageError
from common.recipe.outputs import is_finished_run
from tests.helpers import run_script
from tests.malformed import CASES, argv_for, build_models

# Cases whose error can only be known once the model is there (the model's modules, the adapter's
# shapes against the base's): every other case must stop before any model loads.
AFTER_LOADING = {"adapter: other width", "adapter: other architecture"}

# Not fixed yet: each later commit removes what it fixes (strict: a fixed case fails here until removed).
KNOWN: set = set()

PARAMS = [pytest.param(case, script, id=f"{case.name}-{script}",
                       marks=[pytest.mark.xfail(strict=True, reason="issue #27")] if case.name in KNOWN else [])
          for case in CASES for script in case.scripts]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("malformed-models"))


@pytest.fixture
def model_loads(monkeypatch):
    """Counts the causal LMs loaded from disk."""
    import transformers

    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counted))
    return calls


@pytest.mark.parametrize("case,script", PARAMS)
def test_malformed_input_is_one_line_exit_2_before_loading(case, script, models, model_loads, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)  # `--output_dir ""` must not reach the checkout's outputs/
    argv, words, out = argv_for(case, script, tmp_path, models)
    code = run_script(script, argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"{script}: error:")]
    assert code == 2 and len(errors) == 1, err[-3000:]
    for word in words:
        assert word.lower() in errors[0].lower(), (word, errors[0])
    for misleading in ("not in the local Hugging Face cache", "An error occurred while generating the dataset"):
        assert misleading not in errors[0]
    if case.name not in AFTER_LOADING:
        assert model_loads == [], f"the error came after loading {model_loads}"
    out = tmp_path / out if not out.is_absolute() else out
    assert not is_finished_run(out) and not (out / "eval_results.json").exists()
    assert not (tmp_path / "outputs").exists() or not any(is_finished_run(p) for p in (tmp_path / "outputs").iterdir())


@pytest.mark.parametrize("name,script", [("non-utf8 data", "lora.py"), ("adapter: corrupt config", "merge.py")])
def test_as_a_user_runs_it_stderr_has_one_line_and_no_traceback(name, script, models, tmp_path):
    """Two representative cases in a subprocess, stderr as a user sees it."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    case = next(c for c in CASES if c.name == name)
    argv, words, out = argv_for(case, script, tmp_path, models)
    proc = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{script}: error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    assert all(w.lower() in errors[0].lower() for w in words) and not out.exists()


def test_long_rows_are_counted_dropped_and_truncated_in_one_line_each(models, tmp_path, capsys):
    """A question that fills --max_seq_length leaves nothing to train on and an answer past it is cut:
    TRL did both without a word."""
    long = " ".join(["word"] * 20_000)
    rows = [{"question": f"Question number {i}?", "answer": f"answer {i}"} for i in range(6)]
    rows += [{"question": long, "answer": "short"}, {"question": "Short?", "answer": long}]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert run_script("lora.py", ["--model_id", models["llama"], "--dataset_name", path, "--output_dir", out,
                                  "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none",
                                  "--save_strategy", "no", "--lora_r", "2", "--max_seq_length", "64"]) == 0
    err = capsys.readouterr().err
    dropped = [line for line in err.splitlines() if "dropped" in line and "--max_seq_length 64" in line]
    truncated = [line for line in err.splitlines() if "truncated" in line and "--max_seq_length 64" in line]
    assert len(dropped) == 1 and "1 of 8 rows dropped" in dropped[0], err
    assert len(truncated) == 1 and "1 of 7 rows truncated" in truncated[0], err
    assert json.loads((out / "run_config.json").read_text())["data"]["train_rows"] == 8


# Generated flag values and data bytes, against the checks that run before anything heavy ---------

def _sft_args(*flags: str):
    from sft.run import parse

    return parse("lora", ["--model_id", "m", *flags])


@settings(max_examples=40, deadline=None)
@given(flag=st.sampled_from(["learning_rate", "num_train_epochs", "weight_decay", "warmup_ratio", "max_grad_norm",
                             "neftune_noise_alpha", "lora_dropout"]),
       value=st.sampled_from(["nan", "inf", "-inf", "NaN", "-Infinity"]))
def test_non_finite_float_flags_are_refused_naming_the_flag(flag, value):
    with pytest.raises(UsageError, match=f"`--{flag}`"):
        _sft_args(f"--{flag}={value}")


@settings(max_examples=40, deadline=None)
@given(seed=st.one_of(st.integers(max_value=-1), st.integers(min_value=2 ** 32)))
def test_seeds_outside_what_torch_and_numpy_take_are_refused(seed):
    with pytest.raises(UsageError, match="`--seed`"):
        _sft_args(f"--seed={seed}")


@settings(max_examples=40, deadline=None)
@given(field=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True).filter(lambda f: f != "question"))
def test_template_fields_other_than_question_are_refused(field):
    with pytest.raises(UsageError, match="`--prompt_template`"):
        _sft_args("--prompt_template", f"Q: {{question}} {{{field}}}")


@pytest.mark.usefixtures("datasets_cache")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(good=st.integers(0, 4), junk=st.binary(min_size=1, max_size=8).filter(lambda b: not _is_utf8(b) and b"\n" not in b),
       suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_non_utf8_bytes_name_the_file_and_line(good, junk, suffix):
    from common.data.sources import load_splits

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"rows{suffix}"
        if suffix == ".csv":
            lines = [b"question,answer"] + [b"q%d?,a%d" % (i, i) for i in range(good)] + [b"q?," + junk]
        else:
            lines = [json.dumps({"question": f"q{i}?", "answer": "a"}).encode() for i in range(good)]
            lines.append(b'{"question": "q?", "answer": "' + junk.replace(b'"', b"'").replace(b"\\", b"/") + b'"}')
        path.write_bytes(b"\n".join(lines) + b"\n")
        with pytest.raises(UsageError) as info:
            load_splits(str(path))
    line = len(lines)
    assert str(path) in str(info.value) and f"line {line}" in str(info.value) and "UTF-8" in str(info.value)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@settings(max_examples=20, deadline=None)
@given(value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_json_numbers_are_not_answers(value):
    from common.data.qa import normalise_row

    with pytest.raises(UsageError, match="`answer`"):
        normalise_row({"question": "q?", "answer": value}, "qa", "rows.jsonl: row 0")


@pytest.mark.parametrize("value", ["1e39", "-4e38"])
def test_float_flags_beyond_float32_are_refused_naming_the_flag(value):
    with pytest.raises(UsageError, match="`--learning_rate` is .* more than float32 holds"):
        _sft_args(f"--learning_rate={value}")


@pytest.mark.parametrize("data", ["conversation", "question-answer"])
def test_long_chat_rows_are_counted_dropped_and_truncated_in_one_line_each(data, tiny_chat_llama, tmp_path, capsys):
    """The same count for rows the chat template renders (tokenised and masked before TRL sees them)."""
    long = " ".join(["word"] * 2_000)
    if data == "conversation":
        def row(q, a):
            return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    else:
        def row(q, a):
            return {"question": q, "answer": a}
    rows = [row(f"Question number {i}?", f"answer {i}") for i in range(6)] + [row(long, "short"), row("Short?", long)]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_script("lora.py", ["--model_id", tiny_chat_llama, "--dataset_name", path, "--output_dir",
                                  tmp_path / "out", "--max_steps", "1", "--per_device_train_batch_size", "2",
                                  "--report_to", "none", "--save_strategy", "no", "--lora_r", "2",
                                  "--max_seq_length", "64"]) == 0
    err = capsys.readouterr().err
    dropped = [line for line in err.splitlines() if "dropped" in line and "--max_seq_length 64" in line]
    truncated = [line for line in err.splitlines() if "truncated" in line and "--max_seq_length 64" in line]
    assert len(dropped) == 1 and "1 of 8 rows dropped" in dropped[0], err
    assert len(truncated) == 1 and "1 of 7 rows truncated" in truncated[0], err
