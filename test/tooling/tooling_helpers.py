"""Helpers for the toolchain tests: running the scripts, git, series edits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
STACK_PY = REPO / "scripts" / "stack.py"
APPLY = REPO / "scripts" / "apply_and_build.sh"
PATCHES = REPO / "patches"


def read_pin(path: Path) -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )


def _base_of_this_torch() -> str:
    "The base of the interpreter running the tests (`stack.py bases --installed`)"
    proc = subprocess.run(
        [sys.executable, str(STACK_PY), "bases", "--installed"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("SYMM_STACK_")},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


# The base these tests run against: the one of this interpreter's torch.
BASE = _base_of_this_torch()
BASE_DIR = PATCHES / BASE
PIN_FILE = BASE_DIR / "PIN"
PIN = read_pin(PIN_FILE)
# The supported bases (a PIN and a series), oldest first; the newest last.
BASES = sorted(
    (
        d.name
        for d in PATCHES.iterdir()
        if (d / "PIN").is_file() and (d / "series").is_file()
    ),
    key=lambda v: tuple(int(n) for n in v.split(".") if n.isdigit()),
)
NEWEST = BASES[-1]
TARGET = "torch/_inductor/comm_lowering.py"
FUNCTION_LINE = "def _one_shot_all_reduce(inp: ir.TensorBox, reduce_op, group_name):\n"
COMMENT = "    # symm-stack tooling test: patch 2\n"
IDENTITY = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "Tooling Test",
    "GIT_AUTHOR_EMAIL": "tooling-test@example.invalid",
    "GIT_COMMITTER_NAME": "Tooling Test",
    "GIT_COMMITTER_EMAIL": "tooling-test@example.invalid",
}


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that points the tools elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SYMM_STACK_", "GIT_")) and k != "PYTORCH_SRC"
    }
    kept = [
        p
        for p in env.get("PYTHONPATH", "").split(os.pathsep)
        if p and not (Path(p) / "OVERLAY.json").is_file()
    ]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def run(
    args: list[str | Path],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd or REPO,
        env=env if env is not None else clean_env(),
        text=True,
        capture_output=True,
        timeout=300,
    )


def stack(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, STACK_PY, *args], env=env)


def git(repo: Path, *args: str) -> str:
    proc = run(["git", *args], cwd=repo, env=clean_env(**IDENTITY))
    assert proc.returncode == 0, f"git {args}: {proc.stderr}"
    return proc.stdout


def commit(repo: Path, message: str) -> None:
    git(repo, "commit", "-q", "-a", "-m", message)


def message(subject: str) -> str:
    return f"[inductor] {subject}\n\nSummary: {subject}.\n\nTest Plan: tooling tests"


def installed_torch_dir() -> Path:
    out = run([sys.executable, STACK_PY, "check-torch"])
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


def spy_python(python: Path, calls: Path) -> Path:
    """Write at `python` an interpreter that logs each call's arguments to
    `calls` and refuses to make a venv or run pip; anything else it passes to
    this Python."""
    python.parent.mkdir(parents=True, exist_ok=True)
    python.write_text(
        "#!/bin/bash\n"
        f'echo "$*" >>{calls}\n'
        'if [[ "$1 $2" == "-m venv" || "$1 $2" == "-m pip" ]]; then exit 1; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    return python


def edit_series(src: Path, dst: Path, edit: Callable[[str, str], str]) -> Path:
    """Copy series dir `src` to `dst`, passing each file's text through edit."""
    shutil.copytree(src, dst)
    for path in dst.iterdir():
        path.write_text(edit(path.name, path.read_text()))
    return dst
