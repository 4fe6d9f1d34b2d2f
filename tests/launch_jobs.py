"""Runs several training scripts one after another in the same launched processes, as each script's
own `main(argv)` runs them:

    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml tests/launch_jobs.py jobs.json

jobs.json is a list of [script, argv]. Starting the processes (imports, the process group, DeepSpeed's
communication op) costs more than a tiny run, so the multi-process tests start them once for every
script. Between two jobs the process group stays (a script leaves it when it is done, here only the
last one does) and accelerate's per-process state is cleared, as a fresh process would have it.
Each process writes `<jobs.json>.rank<N>` with every job's exit code; a job that stops with a
user error (exit code 2) does not stop the ones after it."""

import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from common.recipe import cli

    jobs = json.loads(Path(sys.argv[1]).read_text())
    leave = cli.leave_process_group
    cli.leave_process_group = lambda: None
    codes = []
    for script, argv in jobs:
        # the run's folder name, in tests/load_probe's records
        os.environ["LOAD_PROBE_JOB"] = Path(argv[argv.index("--output_dir") + 1]).name
        module = importlib.import_module(script.removesuffix(".py"))
        codes.append(module.main([str(a) for a in argv]))
        AcceleratorState._reset_state(reset_partial_state=True)
        unset_hf_deepspeed_config()  # the run's ZeRO-3 setting, which a fresh process would not have
    Path(f"{sys.argv[1]}.rank{os.environ.get('RANK', '0')}").write_text(json.dumps(codes))
    leave()
    return 0  # the caller compares the exit codes with those it expects


if __name__ == "__main__":
    sys.exit(main())
