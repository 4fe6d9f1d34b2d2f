"""The private members of transformers, TRL, PEFT and torch that the project patches or reads
(common/recipe/patches.py PRIVATE_API) are all there in the installed versions; a release that drops
one fails here, naming the member and the version, rather than in the middle of a run."""

import re

import transformers

from common.recipe.patches import PRIVATE_API, check_private_api
from tests.conftest import ROOT


def test_installed_libraries_have_every_private_member_the_project_relies_on():
    missing = check_private_api()
    assert missing == [], ("the installed libraries no longer have these members that the project relies on "
                           "(see PRIVATE_API in common/recipe/patches.py and the code named there): "
                           + "; ".join(missing))


def test_a_missing_member_class_or_module_is_named_with_the_installed_version():
    table = {"transformers.trainer:Trainer": ("_save_checkpoint", "_tr_loss", "_no_such_member"),
             "trl:NoSuchTrainer": ("train",), "argparse:ArgumentParser": ("_actions", "_no_such_list"),
             "no_such_library.module": ("x",)}
    assert check_private_api(table) == [
        f"transformers.trainer:Trainer._no_such_member (transformers {transformers.__version__})",
        f"trl:NoSuchTrainer (trl {__import__('trl').__version__})",
        f"argparse:ArgumentParser._no_such_list (Python {__import__('platform').python_version()})",
        "no_such_library.module (no_such_library not installed)"]


def test_every_private_trainer_member_the_code_reads_is_in_the_table():
    """`trainer._x` and `getattr(trainer, "_x"` anywhere in the packages: a new one joins the table."""
    listed = {m for owner, members in PRIVATE_API.items() if "Trainer" in owner for m in members}
    used = set()
    for package in ("common", "sft", "rlhf", "comparison"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            used |= set(re.findall(r"\btrainer\)?\.(_[a-z]\w*)", text))
            used |= set(re.findall(r"getattr\(trainer, \"(_[a-z]\w*)\"", text))
    assert used and used <= listed, sorted(used - listed)
