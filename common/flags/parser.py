"""The flag parser is TRL's `TrlParser` (an HfArgumentParser); it lacks, and we add: one-line errors with "did you
mean", lenient values (yes/no/1/0, none/null, any-case choices), per-script defaults, hidden flags, help with each
default once, a checked `--config` YAML, and the record of which flags the user set."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

from common.flags.errors import UsageError

# Values --------------------------------------------------------------------------------------

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
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
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


def _choice(choices: tuple):
    lookup = {str(c).lower(): c for c in choices}

    def choice(value: str):
        key = str(value).strip().lower()
        if key not in lookup:
            raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from {', '.join(choices)})")
        return lookup[key]

    return choice


def _value_kwargs(hint: Any) -> dict[str, Any]:
    """The library's converters are stricter than ours: bools take no on/off (and an Optional bool no bare
    `--flag` or `none`), an Optional str takes no `none`, and choices are case-sensitive."""
    base, optional = _unwrap_optional(hint)
    if base is bool:
        return {"type": _none_or(str_to_bool) if optional else str_to_bool, "nargs": "?", "const": True,
                "metavar": "{True,False}"}
    if typing.get_origin(base) is Literal:
        return {"type": _choice(typing.get_args(base))}  # the library's `choices` give the metavar
    if typing.get_origin(base) is list:
        return {}  # the library's `nargs="+"` of the item type: `--runs a b c`
    return {"type": _none_or(base) if optional else base, "metavar": _METAVARS.get(base)}


# --help ------------------------------------------------------------------------------------------

GROUP_TITLES = {
    "ModelArguments": "model & tokenizer", "QuantizationArguments": "quantization (bitsandbytes)",
    "DataArguments": "data & prompt format", "LoraArguments": "LoRA / DoRA",
    "PromptLearningArguments": "prompt learning", "TrainingArguments": "training", "EvalArguments": "evaluation",
    "MergeArguments": "merge", "PreferenceArguments": "preference optimisation", "PPOArguments": "PPO",
    "GRPOArguments": "GRPO",
}

# Defaults that are not field values (None means "computed at run time").
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


# The library parser ------------------------------------------------------------------------------

@functools.cache
def _library_parser():
    # Imported when a parser is built, not by the modules that only read ParsedArgs. TrlParser, not
    # transformers' HfArgumentParser: TRL ships a copy of it because `import transformers` takes seconds.
    from trl import TrlParser

    class Parser(TrlParser):
        """TrlParser whose every dataclass flag goes through `add_argument` below, and whose errors raise."""

        def __init__(self, flags: FlagParser, **kwargs):
            self.flags = flags  # read by add_argument while the library adds the fields
            super().__init__(flags.types, **kwargs)

        def add_argument(self, *option_strings, **kwargs):
            name = kwargs.get("dest") or option_strings[0][2:]
            if name not in self.flags.fields:  # -h, --config
                return super().add_argument(*option_strings, **kwargs)
            if kwargs.get("action") == "store_false":
                return None  # the library's `--no_flag` for a flag that defaults to True: `--flag False` says it
            return self.flags.add_field(self, name, kwargs)

        def error(self, message: str):  # noqa: D401 - argparse API: one line, no usage and exit
            raise UsageError(message)

    return Parser


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
    """The dataclasses of one script as one TrlParser, with our additions (see the module's first lines)."""

    def __init__(self, dataclass_types: list[type], prog: str, description: str = "",
                 defaults: Optional[dict[str, Any]] = None, hidden: tuple = ()):
        """`defaults` override field defaults for this script; `hidden` flags are accepted (scripts warn
        that they are ignored) but left out of `--help`, which lists the script's own flags only."""
        self.types = list(dataclass_types)
        self.prog = prog
        self.overrides = dict(defaults or {})
        self.hidden = set(hidden)
        self.fields: dict[str, tuple[type, dataclasses.Field, Any]] = {}  # name -> (dataclass, field, type hint)
        self.names: dict[str, str] = {}  # every accepted spelling -> field name
        self.groups: dict[type, Any] = {}  # dataclass -> its --help group
        self.actions: dict[str, argparse.Action] = {}  # field name -> its argparse action
        for dc in self.types:
            hints = typing.get_type_hints(dc)
            for f in dataclasses.fields(dc):
                self.fields[f.name] = (dc, f, hints[f.name])
                for spelling in (f.name, *f.metadata.get("aliases", ())):
                    self.names[spelling.lstrip("-")] = f.name
        self.parser = _library_parser()(
            self, prog=prog, description=description, allow_abbrev=False,
            usage=f"python {prog} [--flag VALUE ...] [--config run.yaml]",
            formatter_class=lambda prog: _HelpFormatter(prog, max_help_position=32, width=100))
        if set(self.actions) != set(self.fields):
            raise RuntimeError("TrlParser no longer adds each dataclass field through `add_argument`; "
                               "common/flags/parser.py must follow the installed trl.")
        self.parser.add_argument("--config", default=None, metavar="FILE",
                                 help="YAML file of flag: value pairs; command-line flags override it.")

    def add_field(self, parser, name: str, kwargs: dict[str, Any]) -> argparse.Action:
        """One field as the library would add it, with our spellings, converters, default, help and group
        (GROUP_TITLES: a dataclass's `_argument_group_name` would make the library add past `add_argument`)."""
        owner, f, hint = self.fields[name]
        if owner not in self.groups:
            self.groups[owner] = parser.add_argument_group(GROUP_TITLES.get(owner.__name__, owner.__name__))
        kwargs.pop("secret", None)  # ours (ParsedArgs.secret_fields), not an argparse keyword
        kwargs.update(_value_kwargs(hint))
        if f.name in self.overrides:
            kwargs["default"] = self.overrides[f.name]
        kwargs["help"] = kwargs.get("help", "").replace("%", "%%")
        if f.name == "output_dir" and kwargs.get("default") is None:  # computed by the script; shown as it will be
            shown = _OUTPUT_DEFAULTS.get(self.prog, f"outputs/{os.path.splitext(os.path.basename(self.prog))[0]}")
            if shown:
                kwargs["help"] += f" (default: {shown})"
        if f.name in self.hidden:
            kwargs["help"] = argparse.SUPPRESS
        # Only the declared spellings: the library would also take `--model-id` for `--model_id`.
        spellings = [f"--{s.lstrip('-')}" for s in (f.name, *f.metadata.get("aliases", ()))]
        self.actions[f.name] = self.groups[owner].add_argument(*spellings, dest=f.name, **kwargs)
        return self.actions[f.name]

    # --
    def _suggest(self, flag: str) -> str:
        name = flag.lstrip("-").split("=", 1)[0]
        match = difflib.get_close_matches(name, list(self.names) + ["config"], n=1, cutoff=0.6)
        return f"; did you mean `--{match[0]}`?" if match else f"; see `{self.prog} --help`"

    def _load_config(self, path: str) -> dict[str, Any]:
        """TrlParser's own `--config` takes a YAML without checking keys or values; ours names the line,
        the unknown flag and the bad value."""
        if not os.path.isfile(path):
            raise UsageError(f"`--config`: file {path!r} not found.")
        import yaml

        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except UnicodeDecodeError as exc:
            raise UsageError(f"`--config` {path}: not a text file (byte {exc.start} is not UTF-8); give a YAML file "
                             f"of `flag: value` lines.") from None
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

    def _apply_config(self, path: str) -> dict[str, Any]:
        """YAML values go through the same converters as command-line strings, then become defaults."""
        config = self._load_config(path)
        for key, value in config.items():
            text = value if isinstance(value, str) else (
                ",".join(map(str, value)) if isinstance(value, list) else str(value))
            action = self.actions[self.names[key]]
            try:
                if action.nargs == "+":
                    converted = [action.type(str(v)) for v in (value if isinstance(value, list) else [value])]
                else:
                    converted = action.type(text) if action.type else text
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise UsageError(f"`--config` {path}: `{key}`: {exc}") from None
            self.parser.set_defaults_with_config(**{self.names[key]: converted})
        return config

    def parse(self, argv: Optional[list[str]] = None) -> ParsedArgs:
        argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
        pre, _ = self.parser.parse_known_args(argv) if "--help" not in argv and "-h" not in argv else (None, None)
        config = self._apply_config(pre.config) if pre is not None and pre.config else {}
        *parsed, unknown = self.parser.parse_args_into_dataclasses(argv, return_remaining_strings=True,
                                                                   look_for_args_file=False)
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
        groups = dict(zip(self.types, parsed))  # the library's dataclass instances, then a namespace (--config)
        return ParsedArgs(groups=groups, explicit=explicit, script=self.prog)
