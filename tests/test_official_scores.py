"""evaluate.py against the official TriviaQA evaluation (mandarjoshi90/triviaqa,
`evaluation/triviaqa_evaluation.py` with `utils/dataset_utils.py`), on release-format files written
by hand, with the official scores worked out by hand from what that script does:

- ground truth: `Answer.NormalizedAliases` plus the normalised `Answer.HumanAnswers`; `Value` and
  `Aliases` are not read;
- a file with `VerifiedEval` true keeps only questions with `QuestionPartOfVerifiedEval` and, in the
  Web domain, only their documents with `DocPartOfVerifiedEval`;
- Wikipedia keys are question ids; Web keys are `QuestionId--Filename` for every document in
  `EntityPages` + `SearchResults`, so a Web question counts once per document and a question
  without documents not at all;
- EM and F1 are `100.0 * sum / number of keys`: percentages.

Answers are not generated here: generation is replaced by a fixed prediction per question, so the
test checks the ground truth, the subset and the aggregation, which is what the official script
decides.

Also: splits without answers (the hub TriviaQA test split: value '<unk>', no aliases) are refused.
"""

import json

import pytest

from tests.helpers import run_script, write_jsonl


def _question(qid, question, value, normalized, aliases=None, human=None, **extra):
    answer = {"Value": value, "Aliases": aliases if aliases is not None else [value],
              "NormalizedAliases": normalized, "Type": "WikipediaEntity"}
    if human is not None:
        answer["HumanAnswers"] = human
    return {"QuestionId": qid, "Question": question, "Answer": answer, **extra}


def _page(filename, verified=None):
    page = {"Filename": filename, "Title": filename}
    if verified is not None:
        page["DocPartOfVerifiedEval"] = verified
    return page


def _write(tmp_path, data, domain="Wikipedia", verified=False):
    path = tmp_path / f"{domain.lower()}-dev.json"
    path.write_text(json.dumps({"Data": data, "Domain": domain, "VerifiedEval": verified, "Version": 1.0}))
    return path


def _evaluate(model, dataset, predictions, out, monkeypatch, argv=()):
    """evaluate.py on `dataset`, with each question answered by predictions[question]."""
    from common.evaluation import answers

    monkeypatch.setattr(answers, "generate_answers",
                        lambda model, tok, questions, *a, **k: [predictions[q] for q in questions])
    assert run_script("evaluate.py", ["--model_id", model, "--dataset_name", dataset, "--dataset_split", "train",
                                      "--output_dir", out, *argv]) == 0
    return json.loads((out / "eval_results.json").read_text())


# Four Wikipedia questions, each where the official ground truth and Value + Aliases disagree.
WIKI = [
    # "Nil." normalises to "nil", one of the normalised human answers: EM 1, F1 1.
    (_question("w1", "Which river flows through Cairo?", "Nile", ["nile", "river nile"],
               aliases=["Nile", "River Nile"], human=["Nil", "the Nile"]), "Nil."),
    # The value is not among the normalised aliases, so the official script never sees it:
    # "sunset boulevard musical" against "sunset boulevard" is EM 0, F1 2*(2/3*1)/(2/3+1) = 0.8.
    (_question("w2", "Which Lloyd Webber musical premiered in the US in 1993?", "Sunset Boulevard (musical)",
               ["sunset boulevard"]), "Sunset Boulevard (musical)"),
    # Partial overlap with a human answer: "sagarmatha" against "sagarmatha nepal": EM 0, F1 2/3.
    (_question("w3", "What is the highest mountain on Earth?", "Mount Everest", ["mount everest", "everest"],
               human=["Sagarmatha (Nepal)"]), "Sagarmatha"),
    # A human answer with punctuation: "London, England" normalises to "london england": EM 1, F1 1.
    (_question("w4", "In which city is the Tower of London?", "London", ["london"], human=["London, England"]),
     "London England"),
]


def test_official_scores_for_human_answers_and_normalized_aliases(tiny_llama, tmp_path, monkeypatch):
    path = _write(tmp_path, [q for q, _ in WIKI])
    results = _evaluate(tiny_llama, path, {q["Question"]: p for q, p in WIKI}, tmp_path / "e", monkeypatch)
    assert results["n"] == 4
    # Official: EM 100 * (1 + 0 + 0 + 1) / 4, F1 100 * (1 + 0.8 + 2/3 + 1) / 4.
    assert results["exact_match_percent"] == 50.0
    assert results["f1_percent"] == pytest.approx(100 * (1 + 0.8 + 2 / 3 + 1) / 4, abs=1e-9)
    assert results["exact_match"] == 0.5 and results["f1"] == pytest.approx((1 + 0.8 + 2 / 3 + 1) / 4, abs=1e-11)
    rows = [json.loads(line) for line in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["em"], r["f1"]) for r in rows] == [(1.0, 1.0), (0.0, pytest.approx(0.8)), (0.0, pytest.approx(2 / 3)),
                                                  (1.0, 1.0)]


def test_official_scores_on_the_verified_subset(tiny_llama, tmp_path, monkeypatch):
    # VerifiedEval: only w1 and w3 are kept (w2 is not part of the verified evaluation, though answered right).
    data = [_question("w1", "Which river flows through Cairo?", "Nile", ["nile"], QuestionPartOfVerifiedEval=True),
            _question("w2", "Who wrote Hamlet?", "Shakespeare", ["shakespeare"], QuestionPartOfVerifiedEval=False),
            _question("w3", "What is the capital of Peru?", "Lima", ["lima"], QuestionPartOfVerifiedEval=True)]
    predictions = {"Which river flows through Cairo?": "The Nile", "Who wrote Hamlet?": "Shakespeare",
                   "What is the capital of Peru?": "Cusco"}
    results = _evaluate(tiny_llama, _write(tmp_path, data, verified=True), predictions, tmp_path / "e", monkeypatch)
    # Official: 100 * 1 / 2 for both (w3 is wrong with no shared token).
    assert results["n"] == 2
    assert results["exact_match_percent"] == 50.0 and results["f1_percent"] == 50.0


def test_official_scores_count_web_questions_once_per_document(tiny_llama, tmp_path, monkeypatch):
    data = [
        # three documents: three keys, each EM 1
        _question("t1", "Which river flows through Cairo?", "Nile", ["nile"],
                  EntityPages=[_page("Nile.txt")], SearchResults=[_page("1/1_1.txt"), _page("1/1_2.txt")]),
        # one document: one key, "hokusai" against "katsushika hokusai": EM 0, F1 2*(1*0.5)/1.5 = 2/3
        _question("t2", "Who made The Great Wave off Kanagawa?", "Katsushika Hokusai", ["katsushika hokusai"],
                  EntityPages=[], SearchResults=[_page("2/2_1.txt")]),
        # no document: not in the official ground truth at all
        _question("t3", "What is the capital of Peru?", "Lima", ["lima"], EntityPages=[], SearchResults=[]),
    ]
    predictions = {"Which river flows through Cairo?": "Nile", "Who made The Great Wave off Kanagawa?": "Hokusai",
                   "What is the capital of Peru?": "Lima"}
    results = _evaluate(tiny_llama, _write(tmp_path, data, domain="Web"), predictions, tmp_path / "e", monkeypatch)
    # Official: 4 keys; EM 100 * 3 / 4, F1 100 * (3 + 2/3) / 4.
    assert results["n"] == 3 and results["denominator"] == 4
    assert results["exact_match_percent"] == 75.0
    assert results["f1_percent"] == pytest.approx(100 * (3 + 2 / 3) / 4, abs=1e-9)


def test_official_scores_on_the_verified_web_subset(tiny_llama, tmp_path, monkeypatch):
    data = [
        # verified, two of its three documents verified: two keys, EM 1
        _question("t1", "Which river flows through Cairo?", "Nile", ["nile"], QuestionPartOfVerifiedEval=True,
                  EntityPages=[_page("Nile.txt", True), _page("Egypt.txt", False)],
                  SearchResults=[_page("1/1_1.txt", True)]),
        # not verified: dropped
        _question("t2", "Who wrote Hamlet?", "Shakespeare", ["shakespeare"], QuestionPartOfVerifiedEval=False,
                  EntityPages=[_page("Hamlet.txt", True)], SearchResults=[]),
        # verified, one verified document: one key, EM 0, F1 0
        _question("t3", "What is the capital of Peru?", "Lima", ["lima"], QuestionPartOfVerifiedEval=True,
                  EntityPages=[], SearchResults=[_page("3/3_1.txt", True)]),
    ]
    predictions = {"Which river flows through Cairo?": "Nile", "Who wrote Hamlet?": "Shakespeare",
                   "What is the capital of Peru?": "Cusco"}
    results = _evaluate(tiny_llama, _write(tmp_path, data, domain="Web", verified=True), predictions,
                        tmp_path / "e", monkeypatch)
    # Official: 3 keys; EM and F1 100 * 2 / 3.
    assert results["n"] == 2 and results["denominator"] == 3
    assert results["exact_match_percent"] == pytest.approx(200 / 3, abs=1e-9)
    assert results["f1_percent"] == pytest.approx(200 / 3, abs=1e-9)


def test_hub_rows_are_scored_against_normalized_aliases_and_human_answers(tmp_path):
    """The hub schema carries the same fields in snake case: the official ground truth again."""
    from common.data import qa
    from common.evaluation.metrics import score

    rows = [{"question": "Which Lloyd Webber musical premiered in the US in 1993?",
             "answer": {"value": "Sunset Boulevard (musical)", "aliases": ["Sunset Boulevard (musical)"],
                        "normalized_aliases": ["sunset boulevard"], "normalized_value": "sunset boulevard musical"}},
            {"question": "Which river flows through Cairo?",
             "answer": {"value": "Nile", "aliases": ["Nile"], "normalized_aliases": ["nile"],
                        "normalized_value": "nile", "human_answers": ["Nil"]}}]
    loaded = qa.load_qa_data(_Args(dataset_name=write_jsonl(tmp_path / "hub.jsonl", rows)), need_eval=False)
    golds = list(loaded.train["aliases"])
    assert golds == [["sunset boulevard"], ["nile", "nil"]]
    # As the official script would score them: the value is not a ground truth, a human answer is.
    assert score("Sunset Boulevard (musical)", golds[0]) == {"em": 0.0, "f1": pytest.approx(0.8)}
    assert score("Nil.", golds[1]) == {"em": 1.0, "f1": 1.0}


class _Args:
    def __init__(self, **kw):
        from common.flags.groups import DataArguments

        self.__dict__.update(DataArguments().__dict__)
        self.__dict__.update(kw)


# Splits without answers --------------------------------------------------------------------------

def _errors(capsys) -> list[str]:
    """The error lines on stderr (`datasets` draws its progress bars there too)."""
    return [line for line in capsys.readouterr().err.splitlines() if ": error:" in line]


def _hub_row(question, value, aliases):
    return {"question": question, "question_id": question[:8],
            "answer": {"value": value, "aliases": aliases, "normalized_aliases": [a.lower() for a in aliases],
                       "normalized_value": value.lower(), "type": "", "matched_wiki_entity_name": value}}


def _hub_dir(tmp_path):
    """Like the hub's rc.nocontext: answers in train and validation, '<unk>' and no aliases in test."""
    root = tmp_path / "trivia"
    root.mkdir()
    write_jsonl(root / "train.jsonl", [_hub_row("Who wrote Hamlet?", "Shakespeare", ["Shakespeare"])])
    write_jsonl(root / "validation.jsonl", [_hub_row("What is the capital of Peru?", "Lima", ["Lima"])])
    write_jsonl(root / "test.jsonl", [_hub_row(f"Unanswered question {i}?", "<unk>", []) for i in range(3)])
    return root


def test_evaluate_refuses_a_split_without_answers(tiny_llama, tmp_path, capsys):
    code = run_script("evaluate.py", ["--model_id", tiny_llama, "--dataset_name", _hub_dir(tmp_path),
                                      "--dataset_split", "test", "--output_dir", tmp_path / "e"])
    err = _errors(capsys)
    assert code == 2 and len(err) == 1
    assert "no answers" in err[0] and "`--dataset_split validation`" in err[0]
    assert not (tmp_path / "e" / "eval_results.json").exists()


@pytest.mark.parametrize("rows", [
    [{"question": "Who wrote Hamlet?", "answer": "<unk>"}, {"question": "Capital of Peru?", "answer": "<unk>"}],
    [{"QuestionId": "q1", "Question": "Who wrote Hamlet?"}],  # an official test file: no `Answer` at all
], ids=["flat-placeholders", "official-without-answers"])
def test_evaluate_refuses_a_local_file_without_answers(rows, tiny_llama, tmp_path, capsys):
    if "QuestionId" in rows[0]:
        path = tmp_path / "wikipedia-test-without-answers.json"
        path.write_text(json.dumps({"Data": rows, "Domain": "Wikipedia", "VerifiedEval": False, "Version": 1.0}))
    else:
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    code = run_script("evaluate.py", ["--model_id", tiny_llama, "--dataset_name", path, "--dataset_split", "train",
                                      "--output_dir", tmp_path / "e"])
    err = _errors(capsys)
    assert code == 2 and len(err) == 1 and "no answers" in err[0]


def test_training_refuses_placeholder_answers(tiny_llama, tmp_path, capsys):
    rows = [_hub_row("Who wrote Hamlet?", "Shakespeare", ["Shakespeare"]), _hub_row("Unanswered?", "<unk>", [])]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    code = run_script("lora.py", ["--model_id", tiny_llama, "--dataset_name", path, "--output_dir", tmp_path / "o",
                                  "--max_steps", "1", "--report_to", "none", "--save_strategy", "no"])
    err = _errors(capsys)
    assert code == 2 and len(err) == 1
    assert "row 1" in err[0] and "'<unk>'" in err[0] and "no answer" in err[0]


@pytest.mark.parametrize("script", ["lora.py", "dpo.py"])
def test_training_refuses_a_split_without_answers(script, tiny_llama, tmp_path, capsys):
    code = run_script(script, ["--model_id", tiny_llama, "--dataset_name", _hub_dir(tmp_path),
                                  "--dataset_split", "test", "--output_dir", tmp_path / "o", "--max_steps", "1",
                                  "--report_to", "none", "--save_strategy", "no"])
    err = _errors(capsys)
    assert code == 2 and len(err) == 1
    assert "no answers" in err[0] and "`--dataset_split validation`" in err[0]
