"""The prompt format of a run, written for the runtimes that read a GGUF: an Ollama `Modelfile`
(a Go template, SYSTEM and stop strings) and, for runs on the plain question template, a Jinja chat
template that renders that template. Neither runtime reads run_config.json; a Jinja chat template
has no general Go equivalent, so the Go template is read off renderings of sentinel messages and
checked against the run's own prompt before it is written."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from common.data.prompts import PromptFormat, generation_prompt, prompt_format

QUESTION, SYSTEM, ANSWER = "QUESTION_7c1e", "SYSTEM_2f9a", "ANSWER_5d3b"


def run_format(trained: dict, tokenizer) -> PromptFormat:
    """The prompt format evaluate.py would use for this run: its prompt flags over the flags' defaults."""
    from common.flags.groups import DataArguments

    defaults = {f.name: f.default for f in dataclasses.fields(DataArguments)}
    flags = trained.get("flags", {})
    args = SimpleNamespace(**{name: flags.get(name, defaults[name]) for name in
                              ("prompt_template", "use_chat_template", "system_prompt", "system_message")})
    return prompt_format(args, tokenizer, trained.get("data", {}).get("schema", "triviaqa"))


def stop_strings(tokenizer, fmt: PromptFormat) -> list[str]:
    """What ends an answer in evaluate.py: EOS, the end-of-turn tokens it knows, and a newline (the
    answer is the text before the first one)."""
    from common.evaluation.answers import stop_token_ids

    stops = [tokenizer.decode([i]) for i in stop_token_ids(tokenizer)]
    if fmt.use_chat:
        from common.data.masking import end_of_turn

        stops.append(end_of_turn(tokenizer))
    return [s for s in dict.fromkeys([*stops, "\n"]) if s]


def qa_chat_template(fmt: PromptFormat, bos: bool = False) -> str:
    """A Jinja chat template that renders a question as the run's plain prompt template did (no
    system message: the plain template has none), for GGUF readers' chat modes. `bos`: the tokenizer
    puts BOS first, so the template writes it, as published chat templates (Llama 3, Mistral) do:
    a reader's chat mode may tokenize the rendered text without adding one."""
    def literal(text: str) -> str:
        return "{% raw %}" + text.replace("{% endraw %}", "") + "{% endraw %}" if text else ""

    # The answer follows as SFT trained it: after a space, or verbatim for prompt-completion data.
    before, _, after = ("{question}" if fmt.raw else fmt.template).partition("{question}")
    space = "" if fmt.raw else " "
    return (("{{ bos_token }}" if bos else "") + "{% for m in messages %}{% if m['role'] == 'user' %}" + literal(before) + "{{ m['content'] }}"
            + literal(after) + "{% elif m['role'] == 'assistant' %}" + space + "{{ m['content'] }}{{ eos_token }}"
            + literal("\n") + "{% endif %}{% endfor %}")


def go_literal(text: str) -> str:
    return '{{ "{{" }}'.join(text.split("{{"))


def strip_bos(text: str, tokenizer, adds_bos: bool) -> str:
    """A chat template that writes BOS itself: a GGUF reader adds BOS where the file says so."""
    bos = tokenizer.bos_token
    return text[len(bos):] if adds_bos and bos and text.startswith(bos) else text


def chat_go_template(tokenizer, fmt: PromptFormat, adds_bos: bool) -> tuple[str, list[str]]:
    """-> (Go template, notes). One question, with and without a system message, as the run's chat
    template renders it: the text around the sentinels becomes the template's literal text."""
    from common.data.templates import render
    from common.flags.errors import UsageError

    notes = []
    plain = strip_bos(generation_prompt(QUESTION, dataclasses.replace(fmt, system_prompt=None), tokenizer),
                      tokenizer, adds_bos)
    if plain.count(QUESTION) != 1:
        raise ValueError("the chat template does not show the question once")
    head, tail = (go_literal(p) for p in plain.split(QUESTION))
    branch = f"{head}{{{{ .Prompt }}}}{tail}"
    try:
        with_system = generation_prompt(QUESTION, dataclasses.replace(fmt, system_prompt=SYSTEM), tokenizer)
    except UsageError:  # the template refuses a system message
        with_system = plain
    with_system = strip_bos(with_system, tokenizer, adds_bos)
    if SYSTEM in with_system and with_system.index(SYSTEM) < with_system.index(QUESTION) \
            and with_system.count(SYSTEM) == 1:
        a, rest = with_system.split(SYSTEM)
        b, c = rest.split(QUESTION)
        system_branch = f"{go_literal(a)}{{{{ .System }}}}{go_literal(b)}{{{{ .Prompt }}}}{go_literal(c)}"
        prompt = f"{{{{ if .System }}}}{system_branch}{{{{ else }}}}{branch}{{{{ end }}}}"
    else:
        prompt = branch
        if fmt.system_prompt and fmt.system_mode != "drop":
            notes.append("the chat template places the system message where a Modelfile cannot; SYSTEM is not used")
    answer = render(tokenizer, [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}])
    end = answer.split(ANSWER, 1)[1] if answer.count(ANSWER) == 1 else ""
    return f"{prompt}{{{{ .Response }}}}{go_literal(end)}", notes


def render_go(template: str, system: str, prompt: str) -> str:
    """The Modelfile template as Ollama renders one question (the part before `.Response`), for the
    only constructs written above: `{{ if .System }}...{{ else }}...{{ end }}`, the three fields and
    `{{ "{{" }}`. Used to check the template against the run's own prompt before writing it."""
    text = template.split("{{ .Response }}")[0].replace('{{ "{{" }}', "\0")
    if text.startswith("{{ if .System }}"):
        with_system, _, rest = text[len("{{ if .System }}"):].partition("{{ else }}")
        without, _, after = rest.partition("{{ end }}")
        text = (with_system if system else without) + after
    return text.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt).replace("\0", "{{")


def modelfile(gguf_name: str, tokenizer, fmt: PromptFormat, adds_bos: bool) -> tuple[str, list[str]]:
    """-> (the Modelfile's text, notes for the user). Checked: for a sample question and the run's
    system prompt, the template renders exactly the prompt evaluate.py gives the model."""
    from common.flags.errors import UsageError

    notes = []
    system = fmt.system_prompt if fmt.use_chat and fmt.system_mode != "drop" else None
    question = "Which planet is known as the Red Planet?"
    try:
        rendered = generation_prompt(question, fmt, tokenizer)
        if fmt.use_chat:
            template, notes = chat_go_template(tokenizer, fmt, adds_bos)
        else:
            before, _, after = ("{question}" if fmt.raw else fmt.template).partition("{question}")
            template = f"{go_literal(before)}{{{{ .Prompt }}}}{go_literal(after)}{{{{ .Response }}}}"
    except (ValueError, UsageError) as exc:
        rendered, template, notes = "", None, [f"no Modelfile TEMPLATE written: {exc}"]
    if fmt.use_chat and adds_bos and tokenizer.bos_token and not rendered.startswith(tokenizer.bos_token):
        notes.append("the tokenizer adds BOS to text but the chat template does not write it: GGUF runtimes put a "
                     "BOS before the chat prompt, which training did not have")
    if template is not None:
        expected = strip_bos(rendered, tokenizer, adds_bos)
        if render_go(template, system or "", question) != expected or '"""' in template:
            template = None
            notes.append("the chat template could not be written as a Modelfile TEMPLATE; Ollama will use the "
                         "GGUF's own chat template handling")
    lines = ["# Written by merge.py --export gguf: the run's prompt format, as evaluate.py prompts the model.",
             f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    if system and '"""' not in system:
        lines.append(f'SYSTEM """{system}"""')
    lines.append("# Greedy decoding and the stops at the end of an answer, as evaluate.py answers.")
    lines.append("PARAMETER temperature 0")
    lines += [f'PARAMETER stop """{s}"""' for s in stop_strings(tokenizer, fmt) if '"""' not in s]
    return "\n".join(lines) + "\n", notes
