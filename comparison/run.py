"""compare.py: trains each technique with its own script (same model, data, budget and seed),
scores every run with evaluate.py's scorer, and writes one table, one JSON and the plots.

Flags that are not compare.py's own go to every technique whose script takes them (a LoRA flag
goes to the LoRA family, a prompt-learning flag to prompt learning, ...); `--TECHNIQUE.flag value`
sets a flag for one technique only. Unset flags keep each script's own defaults, such as its
learning rate.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from common.flags.parser import FlagParser, ParsedArgs
from common.flags.errors import UsageError, format_flags
from common.flags.groups import flag
from comparison import report
from comparison.techniques import ALL, PREFERENCE, SFT, Runner, runner

log = logging.getLogger("finetune")


@dataclass
class CompareArguments:
    techniques: Optional[str] = flag(
        None, "Comma-separated techniques to train and compare: lora, dora, qlora, prefix_tuning, p_tuning, "
              "prompt_tuning (SFT); dpo, orpo, simpo, kto (preference, from an SFT start: `--model_id outputs/sft`); "
              "ppo, grpo (with `--reward_function triviaqa_f1`).")
    runs: Optional[list[str]] = flag(None, "Finished run directories to compare without training (instead of "
                                           "`--techniques`).")
    output_dir: str = flag("outputs/compare", "Where comparison.md, comparison.json and plots/ go; with "
                                              "`--techniques`, each run gets its own directory in it.")
    eval_samples: int = flag(1000, "Held-out questions each run is scored on (the first N of `--eval_split`; 0: all "
                                   "of it). 1000 takes about a minute per run for a 1B model on one GPU.")
    train_eval_samples: int = flag(200, "Training questions each run is also scored on (the first N of "
                                        "`--dataset_split`): far above the held-out EM means memorised, not learnt "
                                        "(0: off).")
    eval_batch_size: int = flag(16, "Questions answered per batch when scoring.")


def make_parser() -> FlagParser:
    parser = FlagParser([CompareArguments], prog="compare.py",
                        description="Train several fine-tuning techniques on the same model, data, budget and seed, "
                                    "score each with evaluate.py's scorer, and compare them in one table "
                                    "(comparison.md, comparison.json) and plots. Every other flag of the training "
                                    "scripts (`--model_id`, `--dataset_name`, `--max_steps`, `--seed`, ...) is passed "
                                    "to each technique that takes it; `--TECHNIQUE.flag value` (e.g. "
                                    "`--prompt_tuning.learning_rate 1e-2`) sets it for one technique; `--config` "
                                    "goes to every run.")
    # compare.py does not read --config itself: the file goes to every technique's script.
    config = next(a for a in parser.parser._actions if "--config" in a.option_strings)
    config.help = ("YAML file of training flags (flag: value), given to every run: each technique's script reads "
                   "it, and the command line wins. compare.py's own flags (below) go on the command line.")
    return parser


# Command line -----------------------------------------------------------------------------------

def split_argv(argv: list[str]) -> list[tuple[str, list[str]]]:
    """--flag v1 v2 / --flag=v / bare --flag -> [(name, tokens)], in order."""
    items: list[tuple[str, list[str]]] = []
    for token in argv:
        if token.startswith("--"):
            items.append((token[2:].split("=", 1)[0], [token]))
        elif token in ("-h",):
            items.append(("help", [token]))
        elif items:
            items[-1][1].append(token)
        else:
            raise UsageError(f"unexpected value {token!r}: every value must follow a `--flag`.")
    return items


@dataclass
class Plan:
    own: ParsedArgs
    shared: list[tuple[str, list[str]]]  # flags for every technique that takes them
    only: dict[str, list[tuple[str, list[str]]]]  # `--TECHNIQUE.flag`: for that technique alone


def parse(argv: Optional[list[str]]) -> Plan:
    import sys

    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    own_names = make_parser().names
    own_tokens, shared, only = [], [], {}
    for name, tokens in split_argv(argv):
        if name == "help" or name in own_names:
            own_tokens += tokens
        elif "." in name and name.split(".", 1)[0] in ALL:
            technique, flag = name.split(".", 1)
            only.setdefault(technique, []).append((flag, ["--" + flag + tokens[0][2 + len(name):], *tokens[1:]]))
        else:
            shared.append((name, tokens))
    own = make_parser().parse(own_tokens)
    if bool(own.techniques) == bool(own.runs):
        raise UsageError("give either `--techniques lora,dora,...` (train and compare) or `--runs DIR DIR ...` "
                         "(compare finished runs), not " + ("both." if own.techniques else "neither."))
    for name in ("eval_samples", "train_eval_samples"):
        if getattr(own, name) < 0:
            raise UsageError(f"`--{name}` must be >= 0 (got {getattr(own, name)}).")
    if own.eval_batch_size <= 0:
        raise UsageError(f"`--eval_batch_size` must be > 0 (got {own.eval_batch_size}).")
    return Plan(own=own, shared=shared, only=only)


def techniques_of(plan: Plan) -> list[str]:
    names = [t.strip() for t in plan.own.techniques.split(",") if t.strip()]
    for name in names:
        if name not in ALL:
            match = difflib.get_close_matches(name, ALL, n=1, cutoff=0.5)
            hint = f"; did you mean {match[0]!r}?" if match else f"; choose from {', '.join(ALL)}"
            raise UsageError(f"`--techniques`: {name!r} is not a technique" + hint)
    if len(set(names)) != len(names):
        raise UsageError("`--techniques` names a technique twice; list each once.")
    for technique in plan.only:
        if technique not in names:
            raise UsageError(f"`--{technique}.*` flags were given but {technique} is not in `--techniques`.")
    return names


def technique_argv(run: Runner, plan: Plan, out: Path) -> list[str]:
    """The command line of one technique's script: the shared flags it takes, its own flags, its
    output directory, and resuming from the last checkpoint (a stopped comparison goes on)."""
    argv = []
    for name, tokens in plan.shared:
        if name == "config" or run.applies(name):
            argv += tokens
    own = plan.only.get(run.name, [])
    for name, tokens in own:
        if not run.knows(name):
            raise UsageError(f"`--{run.name}.{name}`: {run.script} has no flag `--{name}`.")
        argv += tokens
    argv += ["--output_dir", str(out / run.name)]
    given = {run.make_parser().names.get(n, n) for n, _ in [*plan.shared, *own]}
    if not given & {"overwrite_output_dir", "resume_from_checkpoint"}:
        argv += ["--resume_from_checkpoint", "auto"]
    return argv


def check_shared_flags(plan: Plan, runners: list[Runner]) -> None:
    for name, _ in plan.shared:
        if name == "config":
            continue
        if not any(r.knows(name) for r in runners):
            every = sorted({n for r in runners for n in r.make_parser().names} | set(make_parser().names))
            match = difflib.get_close_matches(name, every, n=1, cutoff=0.6)
            raise UsageError(f"unrecognized flag `--{name}`" + (f"; did you mean `--{match[0]}`?" if match else
                                                                 "; see `compare.py --help` and the scripts' --help"))
        if not any(r.applies(name) for r in runners):
            log.warning("`--%s` applies to none of %s: ignored.", name, ", ".join(r.name for r in runners))


# Reusing finished runs --------------------------------------------------------------------------

# Flags that do not change what a run learns: a finished run made with other values is still reused.
_NOT_RESULTS = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "report_to", "run_name", "push_to_hub",
                "hub_model_id", "hub_token", "dataset_num_proc", "dataloader_num_workers",
                "per_device_eval_batch_size", "save_strategy", "save_steps", "save_total_limit", "config"}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def changed_flags(args: ParsedArgs, run_dir: Path) -> list[str]:
    """Flags set (now, or when the finished run was made) whose values differ from that run's."""
    saved = report.read_json(run_dir / "run_config.json")
    before = saved.get("flags") or {}
    now = args.to_dict()
    names = (set(args.explicit) | set(saved.get("explicit_flags") or [])) - _NOT_RESULTS
    return sorted(n for n in names if n in now and _plain(now[n]) != _plain(before.get(n)))


# Running ----------------------------------------------------------------------------------------

def compare(argv: Optional[list[str]] = None) -> int:
    from comparison.launch import launch_prefix
    from common.recipe.dist import is_main_process

    plan = parse(argv)
    prefix = launch_prefix(os.environ)  # refuses multi-node launches before anything runs
    if not is_main_process():  # under torchrun / accelerate launch: the main process starts every run
        return 0
    out = Path(plan.own.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"`--output_dir` {out} is a file; choose a directory.")
    if plan.own.runs:
        rows = compare_runs(plan, prefix)
    else:
        rows = train_and_compare(plan, prefix, out)
    return write_outputs(rows, out)


def train_and_compare(plan: Plan, prefix: list[str], out: Path) -> list[dict]:
    from comparison.launch import ROOT, run_child
    from common.recipe.outputs import is_finished_run

    runners = [runner(t) for t in techniques_of(plan)]
    check_shared_flags(plan, runners)
    # Every technique's flags are checked before the first one trains: a typo costs seconds, not hours.
    jobs = []
    quiet = log.level
    for run in runners:
        argv = run_argv(run, plan, out)
        log.setLevel(logging.ERROR)  # the script says its own warnings when it runs
        try:
            args = run.parse(argv)
        except UsageError as exc:
            raise UsageError(f"{run.name}: {exc}") from None
        finally:
            log.setLevel(quiet)
        run_dir = out / run.name
        if is_finished_run(str(run_dir)) and not args.overwrite_output_dir:
            changed = changed_flags(args, run_dir)
            if changed:
                raise UsageError(f"`--output_dir` {run_dir} holds a finished {run.name} run made with other "
                                 f"{format_flags(changed)}; pass `--{run.name}.overwrite_output_dir True` to retrain "
                                 f"it (`--overwrite_output_dir True` for every technique), or choose another "
                                 f"`--output_dir`.")
        jobs.append((run, argv, args, run_dir))

    rows = []
    for i, (run, argv, args, run_dir) in enumerate(jobs, 1):
        if is_finished_run(str(run_dir)) and not args.overwrite_output_dir:
            log.info("[%d/%d] %s: finished run in %s, reused.", i, len(jobs), run.name, run_dir)
            rows.append(report.collect(run_dir, run.name, status="reused"))
        else:
            log.info("[%d/%d] %s: training in %s", i, len(jobs), run.name, run_dir)
            code, reason = run_child([*prefix, str(ROOT / run.script), *argv], run_dir / "compare.log")
            if code in (130, 143):  # stopped by Ctrl-C / SIGTERM after saving a checkpoint
                raise KeyboardInterrupt
            if code == 0 and is_finished_run(str(run_dir)):
                rows.append(report.collect(run_dir, run.name, status="trained"))
            else:
                reason = reason or "the script ended without writing a finished run"
                log.error("%s failed: %s; going on with the others.", run.name, reason)
                rows.append(report.collect(run_dir, run.name, status="failed", reason=reason))
                continue
        score(rows[-1], plan, prefix, args.to_dict())
    return rows


def run_argv(run: Runner, plan: Plan, out: Path) -> list[str]:
    """The command line compare.py runs a technique's script with."""
    return _with_heldout_loss(technique_argv(run, plan, out), run)


def _with_heldout_loss(argv: list[str], run: Runner) -> list[str]:
    """SFT and preference runs also report their loss on the held-out split (a preference run's on
    held-out pairs), unless told otherwise; PPO and GRPO have no held-out loss. Only where that split
    surely exists (given explicitly, or TriviaQA's validation): a comparison must not fail because a
    local dataset has no `validation`."""
    if run.name not in SFT + PREFERENCE:
        return argv
    flags = {run.make_parser().names.get(t[2:].split("=", 1)[0]) for t in argv if t.startswith("--")}
    if "eval_strategy" in flags or "config" in flags:
        return argv
    args = run.make_parser().parse(argv)
    if args.eval_split.lower() == "none":
        return argv
    if args.eval_split.lower() == "auto" and args.dataset_name not in ("triviaqa", "triviaqa-sample"):
        return argv
    return [*argv, "--eval_strategy", "epoch"]


def compare_runs(plan: Plan, prefix: list[str]) -> list[dict]:
    from common.evaluation.run import make_parser as eval_parser
    from common.recipe.outputs import is_finished_run

    scoring = eval_parser()
    allowed = set(scoring.names) - {"output_dir", "max_samples", "batch_size"}
    for name, _ in plan.shared:
        if name not in allowed:
            raise UsageError(f"`--{name}` is not taken with `--runs`, which compares finished runs without training; "
                             f"only scoring flags are (`--eval_split`, `--dataset_name`, `--max_new_tokens`, ...).")
    if plan.only:
        raise UsageError("`--TECHNIQUE.flag` flags apply to `--techniques`, not to `--runs`.")
    for path in plan.own.runs:
        if not is_finished_run(path):
            raise UsageError(f"`--runs` {path}: not a finished run (no run_config.json with an adapter or model); "
                             f"give directories written by the training scripts.")
    given = scoring.parse([t for _, tokens in plan.shared for t in tokens])
    rows, seen = [], {}
    for path in plan.own.runs:
        row = report.collect(path, status="finished")
        seen[row["technique"]] = seen.get(row["technique"], 0) + 1
        rows.append(row)
        flags = dict(report.read_json(Path(path) / "run_config.json").get("flags") or {})
        flags.update({name: getattr(given, name) for name in given.explicit})
        score(row, plan, prefix, flags, extra=sorted(given.explicit))
    for row in rows:  # two runs of one technique: named by their directories too
        if seen[row["technique"]] > 1:
            row["technique"] = f"{row['technique']} ({Path(row['output_dir']).name})"
    return rows


# Scoring ----------------------------------------------------------------------------------------

def score(row: dict, plan: Plan, prefix: list[str], flags: dict, extra: list[str] = ()) -> None:
    """Held-out and training-sample EM/F1 with evaluate.py's scorer, in one child process; a score
    made with the same flags after the run finished is reused. The prompt format comes from the
    run itself (evaluate.py takes it from run_config.json)."""
    from comparison.launch import run_child
    from comparison.scoring import REQUEST

    run_dir = Path(row["output_dir"])
    heldout = flags.get("eval_split") or "auto"
    if str(heldout).lower() == "auto":
        heldout = "validation"
    wanted = []
    if str(heldout).lower() != "none":
        wanted.append((report.HELDOUT, heldout, plan.own.eval_samples))
    if plan.own.train_eval_samples:
        wanted.append((report.TRAIN_SAMPLE, flags.get("dataset_split") or "train", plan.own.train_eval_samples))
    passed = ["dataset_name", "dataset_config", "trust_remote_code", "use_bfloat16", "fp16",
              *[n for n in extra if n not in ("eval_split", "dataset_split")]]
    finished_at = (run_dir / "run_config.json").stat().st_mtime
    todo = []
    for folder, split, samples in wanted:
        job = ["--model_id", str(run_dir), "--dataset_split", str(split), "--batch_size", str(plan.own.eval_batch_size),
               "--output_dir", str(run_dir / folder)]
        if samples:
            job += ["--max_samples", str(samples)]
        for name in dict.fromkeys(passed):
            if flags.get(name) not in (None, False, ""):
                job += [f"--{name}", str(flags[name])]
        results = run_dir / folder / "eval_results.json"
        request = report.read_json(run_dir / folder / REQUEST)
        if results.is_file() and results.stat().st_mtime >= finished_at and request.get("argv") == job:
            continue
        todo.append(job)
    if todo:
        cmd = ["-m", "comparison.scoring"]
        for job in todo:
            cmd += [*job, "+"]
        log.info("%s: scoring with evaluate.py's scorer", row["technique"])
        code, reason = run_child([*prefix, *cmd[:-1]], run_dir / "compare.log")
        if code in (130, 143):
            raise KeyboardInterrupt
        if code != 0:
            row["eval_error"] = reason
            log.error("%s: scoring failed: %s", row["technique"], reason)
    fresh = report.collect(run_dir, row["technique"], row["status"], row["reason"])
    for key in ("exact_match", "f1", "exact_match_percent", "f1_percent", "eval_split", "eval_n", "train_exact_match",
                "train_f1", "train_exact_match_percent", "train_f1_percent", "train_eval_n"):
        row[key] = fresh[key]


# Outputs ----------------------------------------------------------------------------------------

def write_outputs(rows: list[dict], out: Path) -> int:
    from common.recipe.outputs import write_json

    out.mkdir(parents=True, exist_ok=True)
    machine_line = report.machine()
    table = report.markdown(rows, machine_line)
    (out / "comparison.md").write_text(table, encoding="utf-8")
    write_json(out / "comparison.json", report.to_json(rows, machine_line))
    plots = []
    try:
        plots = report.plot(rows, out / "plots")
    except Exception as exc:  # matplotlib missing or a backend problem: the table stands without pictures
        log.warning("could not draw the plots (%s).", exc)
    failed = [r for r in rows if r["status"] == "failed"]
    print("\n" + table + "\nwritten to " + str(out.resolve()) + ": comparison.md, comparison.json"
          + (", plots/ (" + ", ".join(p.name for p in plots) + ")" if plots else "")
          + "\neach run's own files: " + ", ".join(f"{r['technique']} {r['output_dir']}" for r in rows), flush=True)
    unscored = [r for r in rows if r.get("eval_error")]
    if failed:
        log.error("%d of %d techniques failed: %s.", len(failed), len(rows), ", ".join(r["technique"] for r in failed))
    if unscored:  # the table lacks their scores: not a finished comparison
        log.error("scoring failed for %s (the reason is in the table and in each run's compare.log).",
                  ", ".join(r["technique"] for r in unscored))
    return 1 if failed or unscored else 0


def main(argv: Optional[list[str]] = None) -> int:
    from common.recipe.cli import run_cli

    result: dict[str, int] = {}

    def go():
        result["code"] = compare(argv)

    started = time.perf_counter()
    code = run_cli("compare.py", go)
    if code == 0 and result.get("code") is not None:
        log.info("compare.py took %.0f s.", time.perf_counter() - started)
    return code or result.get("code", 0)
