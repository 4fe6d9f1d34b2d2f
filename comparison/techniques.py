"""Which script trains each technique, its parser, and which shared flags mean something to it.

Each technique keeps its own script's defaults (learning rate, batch size, ...): compare.py runs
the very script a user would run, so what it compares is what those scripts do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

SFT = ("lora", "dora", "qlora", "prefix_tuning", "p_tuning", "prompt_tuning")
PREFERENCE = ("dpo", "orpo", "simpo", "kto")
RL = ("ppo", "grpo")
ALL = SFT + PREFERENCE + RL


@dataclass(frozen=True)
class Runner:
    name: str
    script: str  # root script, run as a child process
    make_parser: Callable  # -> FlagParser (for the names it knows)
    parse: Callable  # argv -> ParsedArgs, with the script's own checks (no model is loaded)
    unused: frozenset  # flags of the shared set this technique ignores: not passed to it

    def knows(self, name: str) -> bool:
        return name in self.make_parser().names

    def applies(self, name: str) -> bool:
        return self.knows(name) and self.make_parser().names[name] not in self.unused


def runner(name: str) -> Runner:
    if name in SFT:
        from sft import run as sft

        specific = set(sft.TECHNIQUE_FLAGS) - set(sft.TECHNIQUES[name].flags)
        return Runner(name, sft.TECHNIQUES[name].script, _cached(lambda: sft.make_parser(name)),
                      lambda argv: sft.parse(name, argv)[1], frozenset(specific))
    if name in PREFERENCE:
        from rlhf import run as pref

        return Runner(name, pref.KINDS[name][0], _cached(lambda: pref.make_parser(name)),
                      lambda argv: pref.parse(name, argv), frozenset(pref.UNUSED_FLAGS[name]))
    if name == "ppo":
        from rlhf import ppo

        return Runner(name, "ppo.py", _cached(ppo.make_parser), ppo.parse, frozenset(ppo.UNUSED_FLAGS))
    if name == "grpo":
        from rlhf import grpo

        return Runner(name, "grpo.py", _cached(grpo.make_parser), grpo.parse, frozenset(grpo.UNUSED_FLAGS))
    raise KeyError(name)


def _cached(build: Callable) -> Callable:
    made = []

    def get():
        if not made:
            made.append(build())
        return made[0]

    return get
