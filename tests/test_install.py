"""install.sh chooses torch as the README promises: an installed torch is kept, a GPU machine gets
PyPI's CUDA build, a CPU-only Linux machine the CPU build. Dry runs (DRY_RUN=1 prints the pip
commands); the torch probe and network attempts are faked, nothing is installed."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def dry_run(tmp_path: Path, torch_installed: bool, gpu: bool) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"  # `nvidia-smi -L` succeeds only when a GPU is there
    smi.write_text(f"#!/bin/sh\nexit {0 if gpu else 9}\n")
    smi.chmod(0o755)
    hide = tmp_path / "no-torch"
    hide.mkdir(exist_ok=True)
    (hide / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    python = bin_dir / "python"  # this interpreter, with torch hidden where asked, and no network
    paths = ([] if torch_installed else [str(hide)]) + [str(ROOT / "tests" / "network_spy")]
    python.write_text(f"#!/bin/sh\nPYTHONPATH={':'.join(paths)} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    env = dict(os.environ, PYTHON=str(python), DRY_RUN="1", PATH=f"{bin_dir}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "install.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def pip_lines(text: str) -> list[str]:
    return [line.split(" -m pip install ", 1)[1] for line in text.splitlines() if " -m pip install " in line]


def test_installed_torch_is_kept(tmp_path):
    import torch

    text = dry_run(tmp_path, torch_installed=True, gpu=True)
    assert f"keeping the installed torch {torch.__version__}" in text
    assert pip_lines(text) == ["-r requirements.txt"]


@pytest.mark.skipif(platform.system() != "Linux", reason="the CPU/CUDA choice is made on Linux")
def test_gpu_machine_gets_pypi_torch(tmp_path):
    assert pip_lines(dry_run(tmp_path, torch_installed=False, gpu=True)) == ["torch==2.13.0", "-r requirements.txt"]


@pytest.mark.skipif(platform.system() != "Linux", reason="the CPU/CUDA choice is made on Linux")
def test_cpu_only_machine_gets_the_cpu_build(tmp_path):
    lines = pip_lines(dry_run(tmp_path, torch_installed=False, gpu=False))
    assert lines[0].startswith("torch==2.13.0+cpu") and lines[1:] == ["-r requirements.txt"], lines
