"""A script's main(): logging set up, user mistakes as one line and exit code 2, Ctrl-C as 130."""

from __future__ import annotations

import logging
import sys
import warnings

from common.flags.errors import UsageError
from common.recipe.dist import is_main_process, leave_process_group
from common.recipe.lock import release_output_locks
from common.recipe.progress import say
from common.recipe.signals import Interrupted

log = logging.getLogger("finetune")


def setup_logging(script: str) -> None:
    level = logging.INFO if is_main_process() else logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{script}: %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    # On CPUs with AVX-512 BF16, importing bitsandbytes warns that an optional kernel could not be
    # fetched from the Hub; 4-bit layers work without it, so the warning is only noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # PEFT and TRL still read `model.is_gradient_checkpointing`, which transformers 5.24 deprecates
    # on every access; nothing for a user to change.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    from common.recipe.progress import quiet_libraries

    quiet_libraries()


def run_cli(script: str, train_fn, leave_group: bool = True, detach: bool = False) -> int:
    """A training script's main(): user mistakes are one line and exit 2; Ctrl-C exits 130.
    No network unless a hub id is given (common/hub/network.py). After a finished run the process
    group is left (`leave_group=False` for a caller that runs several jobs in one process and
    leaves it after the last). `detach`: a training script, whose stop button in a notebook must
    leave a checkpoint (common/recipe/notebook.py)."""
    from common.hub import network
    from common.hub import upload as hub
    from common.recipe import notebook

    if detach and notebook.should_detach(script):  # a training script in a notebook cell
        return notebook.run_detached(script)
    setup_logging(script)
    network.start_offline()
    try:
        train_fn()
        code = 0
    except UsageError as exc:
        say(f"{script}: error: {exc}")
        code = 2
    except hub.UploadFailed as exc:
        say(f"{script}: upload failed: {exc}")
        code = hub.UPLOAD_FAILED
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted):  # announce_stop already said how to resume
            return 128 + exc.signum
        say(f"{script}: interrupted.")
        return 130
    finally:
        network.end_run()
        release_output_locks()
    if code == 0 and leave_group:
        leave_process_group()
    return code
