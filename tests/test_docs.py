"""Every command that README.md and docs/ show runs: each command of a root script (also under
`accelerate launch`, `torchrun` or a notebook's `!`) parses with that script's own parser, the
README's table has one command per script, and the cheap commands run."""

import importlib
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = sorted(p.name for p in ROOT.glob("*.py"))
SHELL_ENDS = {"|", "||", "&&", ";", ">", "2>", ">>", "&"}


def _shell_lines(text: str) -> list[str]:
    """Commands in fenced code blocks (continuation lines joined) and in inline code."""
    commands = []
    for block in re.findall(r"^ *```[a-z]*\n(.*?)^ *```", text, re.MULTILINE | re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines()]
    commands += re.findall(r"`([^`\n]*python3? [^`\n]*\.py\b[^`\n]*)`", text)
    return commands


def script_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, its flags) for every command that runs a root script."""
    found = []
    for line in _shell_lines(text):
        line = re.sub(r"\s+#.*$", "", line.lstrip("!"))  # a comment after the command
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        at = next((i for i, t in enumerate(tokens) if t in SCRIPTS), None)
        if at is None or not any(t in ("python", "python3", "torchrun", "accelerate") for t in tokens[:at]):
            continue
        argv = []
        for token in tokens[at + 1:]:
            if token in SHELL_ENDS:
                break
            if token != "...":
                argv.append(token)
            elif argv and argv[-1].startswith("--") and "=" not in argv[-1]:  # `--model_id ...`: a value to fill in
                argv.append("PLACEHOLDER")
        found.append((tokens[at], argv))
    return found


COMMANDS = [(page.name, script, argv) for page in PAGES for script, argv in script_commands(page.read_text())]


def test_the_docs_show_commands_of_every_script():
    assert {script for _, script, _ in COMMANDS} == set(SCRIPTS)
    assert len(COMMANDS) >= 45


@pytest.mark.parametrize("page,script,argv", COMMANDS, ids=[f"{p}:{s}:{i}" for i, (p, s, _) in enumerate(COMMANDS)])
def test_each_command_in_the_docs_parses_with_its_scripts_parser(page, script, argv):
    if argv in (["--help"], ["-h"]):
        return
    if script == "compare.py":  # its own flags; the others go to each technique's script, checked there
        from comparison.run import parse

        plan = parse(argv)
        for name, _ in plan.shared:
            assert any(name in importlib.import_module(s.removesuffix(".py")).make_parser().names
                       for s in SCRIPTS if s not in ("compare.py", "evaluate.py", "merge.py")), name
        return
    parser = importlib.import_module(script.removesuffix(".py")).make_parser()
    parser.parse(argv)  # a misspelled flag or a bad value raises UsageError naming it


def test_the_readme_lists_one_runnable_command_per_script():
    table = [line for line in (ROOT / "README.md").read_text().splitlines() if re.match(r"\| `\w+\.py` \|", line)]
    assert sorted(re.match(r"\| `(\w+\.py)`", line).group(1) for line in table) == SCRIPTS
    for line in table:
        script = re.match(r"\| `(\w+\.py)`", line).group(1)
        assert f"`python {script} " in line, line


def test_the_readme_is_short_and_keeps_the_ci_test_command():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 250
    ci = subprocess.run(["awk", "/<!-- test-command -->/{f=1;next} f&&/^```/{if(s)exit;s=1;next} f&&s",
                         str(ROOT / "README.md")], capture_output=True, text=True, check=True).stdout.strip()
    assert ci.endswith("python -m pytest -q"), ci


def test_every_docs_page_is_linked_from_the_readme_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name}" in readme, page.name
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+\.(?:md|png|ipynb))(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)


def test_the_tiny_model_command_the_docs_show_runs(tmp_path):
    """The cheap command every offline example starts from."""
    result = subprocess.run([sys.executable, "-m", "common.model.tiny_model", "--output_dir", str(tmp_path / "m"),
                             "--hidden_size", "128"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
    shown = "python -m common.model.tiny_model --output_dir models/tiny-llama --hidden_size 128"
    assert shown in (ROOT / "docs" / "choosing-a-technique.md").read_text()
