"""The flag parser: the dataclasses of a script as one argparse parser with YAML configs."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

from common.flags.errors import UsageError

# Parsing -------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "y", "t", "on"}

_FALSE = {"false", "0", "no", "n", "f", "off"}



def str_to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/1/0, got {value!r}")



def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False



def _none_or(convert):
    def parse(value: str):
        if str(value).strip().lower() in ("none", "null", ""):
            return None
        return convert(value)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse



# --help: group titles, and defaults that are not field values (None means "computed at run time").
GROUP_TITLES = {
    "ModelArguments": "model & tokenizer", "QuantizationArguments": "quantization (bitsandbytes)",
    "DataArguments": "data & prompt format", "LoraArguments": "LoRA / DoRA",
    "PromptLearningArguments": "prompt learning", "TrainingArguments": "training", "EvalArguments": "evaluation",
    "MergeArguments": "merge", "PreferenceArguments": "preference optimisation", "PPOArguments": "PPO",
    "GRPOArguments": "GRPO",
}

_OUTPUT_DEFAULTS = {"evaluate.py": "outputs/eval", "merge.py": None}

_METAVARS = {int: "N", float: "X", str: "TEXT"}



class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's default once: appended unless its help already says it or there is none to show."""

    SAYS_DEFAULT = ("(default", "default:", "defaults to", "by default")

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)  # `liger-kernel` stays whole

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default == argparse.SUPPRESS or any(
                words in text.lower() for words in self.SAYS_DEFAULT):
            return text
        shown = str(action.default).replace("\n", "\\n").replace("%", "%%")
        return f"{text} (default: {shown})"



class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(message)



@dataclass
class ParsedArgs:
    """All dataclass instances of one script, plus which flags the user actually set."""

    groups: dict[type, Any]
    explicit: set[str]
    script: str

    def __getattr__(self, name: str) -> Any:
        for obj in self.__dict__["groups"].values():
            if name in {f.name for f in dataclasses.fields(obj)}:
                return getattr(obj, name)
        raise AttributeError(name)

    def set(self, name: str, value: Any) -> None:
        for obj in self.groups.values():
            if name in {f.name for f in dataclasses.fields(obj)}:
                setattr(obj, name, value)
                return
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for obj in self.groups.values():
            out.update(dataclasses.asdict(obj))
        return out

    def secret_fields(self) -> set[str]:
        return {f.name for obj in self.groups.values() for f in dataclasses.fields(obj) if f.metadata.get("secret")}



class FlagParser:
    """Builds one argparse parser from several dataclasses.

    Adds what plain argparse lacks for this use: `--config run.yaml` (command line wins),
    "did you mean" on misspelled flags, flag aliases, booleans as `True/False/1/0` (or bare
    `--flag`), and a record of which flags were given explicitly.
    """

    def __init__(self, dataclass_types: list[type], prog: str, description: str = "",
                 defaults: Optional[dict[str, Any]] = None, hidden: tuple = ()):
        """`defaults` override field defaults for this script; `hidden` flags are accepted (scripts warn
        that they are ignored) but left out of `--help`, which lists the script's own flags only."""
        self.types = dataclass_types
        self.prog = prog
        self.overrides = dict(defaults or {})
        self.hidden = set(hidden)
        self.parser = _Parser(prog=prog, description=description, allow_abbrev=False,
                              usage=f"python {prog} [--flag VALUE ...] [--config run.yaml]",
                              formatter_class=lambda prog: _HelpFormatter(prog, max_help_position=32, width=100))
        self.parser.add_argument("--config", default=None, metavar="FILE",
                                 help="YAML file of flag: value pairs; command-line flags override it.")
        self.names: dict[str, str] = {}  # every accepted spelling -> field name
        for dc in dataclass_types:
            group = self.parser.add_argument_group(GROUP_TITLES.get(dc.__name__, dc.__name__))
            hints = typing.get_type_hints(dc)
            for f in dataclasses.fields(dc):
                self._add(group, f, hints[f.name])

    def _add(self, group, f: dataclasses.Field, tp: Any) -> None:
        base, optional = _unwrap_optional(tp)
        default = self.overrides.get(f.name, f.default)
        kwargs: dict[str, Any] = {"dest": f.name, "default": default,
                                  "help": f.metadata.get("help", "").replace("%", "%%")}
        if f.name == "output_dir" and default is None:  # computed by the script; shown as it will be
            shown = _OUTPUT_DEFAULTS.get(self.prog, f"outputs/{os.path.splitext(os.path.basename(self.prog))[0]}")
            if shown:
                kwargs["help"] += f" (default: {shown})"
        if f.name in self.hidden:
            kwargs["help"] = argparse.SUPPRESS
        if base is bool:
            kwargs.update(type=_none_or(str_to_bool) if optional else str_to_bool, nargs="?", const=True,
                          metavar="{True,False}")
        elif typing.get_origin(base) is Literal:
            choices = typing.get_args(base)
            lookup = {str(c).lower(): c for c in choices}

            def convert(value: str, lookup=lookup, choices=choices):
                key = str(value).strip().lower()
                if key not in lookup:
                    raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from {', '.join(choices)})")
                return lookup[key]

            convert.__name__ = "choice"
            kwargs.update(type=convert, metavar="{" + ",".join(choices) + "}")
        elif typing.get_origin(base) is list:  # `--runs a b c`
            kwargs.update(type=typing.get_args(base)[0], nargs="+")
        else:
            kwargs.update(type=_none_or(base) if optional else base, metavar=_METAVARS.get(base))
        spellings = [f.name, *f.metadata.get("aliases", ())]
        for s in spellings:
            self.names[s] = f.name
        group.add_argument(*[f"--{s}" for s in spellings], **kwargs)

    # --
    def _suggest(self, flag: str) -> str:
        name = flag.lstrip("-").split("=", 1)[0]
        match = difflib.get_close_matches(name, list(self.names) + ["config"], n=1, cutoff=0.6)
        return f"; did you mean `--{match[0]}`?" if match else f"; see `{self.prog} --help`"

    def _load_config(self, path: str) -> dict[str, Any]:
        if not os.path.isfile(path):
            raise UsageError(f"`--config`: file {path!r} not found.")
        import yaml

        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise UsageError(f"`--config` {path}: not valid YAML{where}; write one `flag: value` per line.") from None
        if not isinstance(data, dict):
            raise UsageError(f"`--config` {path}: expected a mapping of `flag: value` pairs.")
        out: dict[str, Any] = {}
        for key, value in data.items():
            key = str(key).lstrip("-")
            if key not in self.names:
                raise UsageError(f"`--config` {path}: unknown flag `{key}`" + self._suggest(key))
            out[key] = value
        return out

    def parse(self, argv: Optional[list[str]] = None) -> ParsedArgs:
        argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
        pre, _ = self.parser.parse_known_args(argv) if "--help" not in argv and "-h" not in argv else (None, None)
        config: dict[str, Any] = {}
        if pre is not None and pre.config:
            config = self._load_config(pre.config)
            # YAML values go through the same converters as command-line strings.
            for key, value in config.items():
                text = value if isinstance(value, str) else (
                    ",".join(map(str, value)) if isinstance(value, list) else str(value))
                action = next(a for a in self.parser._actions if f"--{key}" in a.option_strings)
                try:
                    if action.nargs == "+":
                        converted = [action.type(str(v)) for v in (value if isinstance(value, list) else [value])]
                    else:
                        converted = action.type(text) if action.type else text
                except (argparse.ArgumentTypeError, ValueError) as exc:
                    raise UsageError(f"`--config` {pre.config}: `{key}`: {exc}") from None
                self.parser.set_defaults(**{self.names[key]: converted})
        ns, unknown = self.parser.parse_known_args(argv)
        if unknown:
            flag = next((u for u in unknown if u.startswith("-")), unknown[0])
            if flag.startswith("-"):
                raise UsageError(f"unrecognized flag `{flag}`" + self._suggest(flag))
            raise UsageError(f"unexpected value {flag!r}: every value must follow a `--flag`.")
        explicit = {self.names[k] for k in config}
        for token in argv:
            if token.startswith("--"):
                name = token[2:].split("=", 1)[0]
                if name in self.names:
                    explicit.add(self.names[name])
        groups = {}
        for dc in self.types:
            groups[dc] = dc(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(dc)})
        return ParsedArgs(groups=groups, explicit=explicit, script=self.prog)

