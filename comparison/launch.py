"""Running each technique as a child process, with the launch compare.py itself was started with.

Why child processes and not in-process calls: a technique that fails (out of memory, a NaN loss,
a crash inside a library) must not take the other techniques down, and a CUDA error or a broken
process group cannot be undone inside one process. A child also starts with a clean GPU, so each
technique's peak memory is its own. Under `torchrun` / `accelerate launch` with N processes, the
main process starts each child with `torchrun --standalone --nproc_per_node=N`, so every run gets
the same launch; the ACCELERATE_* settings of an `accelerate launch` (mixed precision, CPU, ...)
are inherited by the children, where Accelerate reads them.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional

from common.flags.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent

# Set by the outer launch for its own processes; the children get their own from their launcher.
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def launch_prefix(env: Mapping[str, str]) -> list[str]:
    """The command that starts one run the way compare.py was started: plain Python, or torchrun
    with this launch's processes per node."""
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return [sys.executable]
    local = int(env.get("LOCAL_WORLD_SIZE", world) or world)
    if world > local:
        raise UsageError(f"compare.py was launched on {world // local} nodes; it starts each run itself and can "
                         f"only do that on one node. Run it on one node, or train each technique with your "
                         f"multi-node launch and compare the results with `compare.py --runs DIR ...`.")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={local}"]


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    out = {k: v for k, v in env.items() if k not in _LAUNCH_VARS and not k.startswith("TORCHELASTIC_")}
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    out["PYTHONUNBUFFERED"] = "1"  # the child's lines reach the terminal and the log as they are written
    from common.recipe.progress import TERMINAL_VAR, interactive

    if interactive(sys.stdout):  # run_child relays the child's output to our stdout: a terminal there?
        out[TERMINAL_VAR] = "1"
    return out


def redacted(cmd: list[str], secret_flags=("hub_token",)) -> str:
    shown, hide = [], False
    for token in cmd:
        name = token[2:].split("=", 1)[0].rsplit(".", 1)[-1] if token.startswith("--") else ""
        if hide:
            shown.append("***")
        elif name in secret_flags and "=" in token:
            shown.append(token.split("=", 1)[0] + "=***")
        else:
            shown.append(token)
        hide = name in secret_flags and "=" not in token
    return shlex.join(shown)


def run_child(cmd: list[str], log_path: Path, echo=None) -> tuple[int, Optional[str]]:
    """Runs `cmd`, copying its output to our stdout and to `log_path` as it comes.
    -> (exit code, one-line reason when it failed)."""
    echo = echo or sys.stdout.buffer
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail = b""
    with open(log_path, "ab") as log:
        log.write(f"$ {redacted(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(os.environ))
        try:
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                echo.write(chunk)
                echo.flush()
                log.write(chunk)
                tail = (tail + chunk)[-65536:]
            code = proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the child too: let it save its checkpoint (it exits by itself), then stop.
            try:
                proc.wait()
            finally:
                raise
    if code == 0:
        return 0, None
    return code, failure_reason(tail.decode("utf-8", "replace"), code)


_SCRIPT_ERROR = re.compile(r"^[\w./-]+\.py: error: .+")
_EXCEPTION = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception|Interrupt|Loss)\b.*)")


def failure_reason(output: str, code: int) -> str:
    """One line saying why a run failed: the script's own `x.py: error: ...` line, else the
    exception a traceback ended with, else the last line it wrote; with the exit code."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", output) if line.strip()]
    found = next((line for line in reversed(lines) if _SCRIPT_ERROR.match(line)), None)
    if found is None:
        found = next((m.group(1) for line in reversed(lines) if (m := _EXCEPTION.match(line))), None)
    if found is None and lines:
        found = lines[-1]
    if code < 0:
        import signal

        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        what = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    else:
        what = f"exit code {code}"
    text = f"{found} ({what})" if found else what
    return text if len(text) <= 300 else text[:297] + "..."
