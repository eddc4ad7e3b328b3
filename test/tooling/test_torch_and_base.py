"""stack.py check-torch and base: the pin check and the reproducible base repo."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from tooling_helpers import (
    BASE,
    BASE_DIR,
    NEWEST,
    PATCHES,
    PIN,
    PIN_FILE,
    REPO,
    STACK_PY,
    clean_env,
    git,
    installed_torch_dir,
    read_pin,
    run,
    spy_python,
    stack,
)


PIN_COMMIT = PIN["TORCH_GIT_COMMIT"]


def fake_torch(root: Path, git_version: str) -> Path:
    pkg = root / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('fake torch imported')\n")
    (pkg / "version.py").write_text(
        f"__version__ = '9.9.9'\ngit_version = '{git_version}'\n"
    )
    return root


def test_check_torch_reports_the_installed_torch() -> None:
    spec = importlib.util.find_spec("torch")
    assert spec is not None and spec.origin is not None
    assert installed_torch_dir() == Path(spec.origin).parent


def test_check_torch_refuses_another_torch(tmp_path: Path) -> None:
    fake = fake_torch(tmp_path / "site", "deadbeef" * 5)
    proc = stack("check-torch", "--base", BASE, env=clean_env(PYTHONPATH=str(fake)))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "deadbeef" * 5 in lines[0]
    assert "9.9.9" in lines[0]
    assert str(fake / "torch") in lines[0]
    assert PIN_COMMIT in lines[0]
    # without --base, a torch no series supports is checked against the newest
    proc = stack("check-torch", env=clean_env(PYTHONPATH=str(fake)))
    assert proc.returncode == 2, proc.stderr
    newest = read_pin(PATCHES / NEWEST / "PIN")["TORCH_GIT_COMMIT"]
    assert f"built from v{NEWEST} ({newest})" in proc.stderr


def test_check_torch_looks_past_an_overlay(tmp_path: Path) -> None:
    overlay = fake_torch(tmp_path / "overlay", "deadbeef" * 5)
    (overlay / "OVERLAY.json").write_text("{}")
    proc = stack("check-torch", env=clean_env(PYTHONPATH=str(overlay)))
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == installed_torch_dir()


def test_check_torch_refuses_when_the_pin_differs(tmp_path: Path) -> None:
    pin = tmp_path / "PIN"
    text = PIN_FILE.read_text().replace(PIN_COMMIT, "0" * 40)
    pin.write_text(text)
    proc = stack("check-torch", env=clean_env(SYMM_STACK_PIN_FILE=str(pin)))
    assert proc.returncode == 2
    assert "0" * 40 in proc.stderr and PIN_COMMIT in proc.stderr


def test_base_layout(stack_base: Path) -> None:
    assert (stack_base / "torch/_inductor/comm_lowering.py").is_file()
    assert (stack_base / "torch/csrc/distributed/c10d/symm_mem").is_dir()
    assert not (stack_base / "torch/include").exists()
    vendor = REPO / "vendor" / BASE / "pytorch"
    for rel in vendor.rglob("*"):
        name = rel.relative_to(vendor).as_posix()
        if rel.is_file() and not name.startswith("README"):
            assert (stack_base / name).read_bytes() == rel.read_bytes()
    subject = git(stack_base, "log", "-1", "--format=%s", "pin-base").strip()
    assert subject == (
        f"PyTorch {PIN['TORCH_GIT_TAG']} ({PIN_COMMIT}) base, "
        f"from the {PIN['TORCH_WHEEL']} wheel"
    )
    assert (
        git(stack_base, "status", "--porcelain", "--ignored") == "!! .stack-base.json\n"
    )
    meta = json.loads((stack_base / ".stack-base.json").read_text())
    assert meta["commit"] == git(stack_base, "rev-parse", "pin-base").strip()


def test_base_is_reproducible_and_idempotent(stack_base: Path, tmp_path: Path) -> None:
    again = tmp_path / "base"
    first = stack("base", "--out", again)
    assert first.returncode == 0, first.stderr
    sha = git(stack_base, "rev-parse", "pin-base").strip()
    assert first.stdout.strip() == sha
    head = (again / ".git" / "index").stat().st_mtime_ns
    second = stack("base", "--out", again)
    assert second.returncode == 0 and second.stdout.strip() == sha
    assert "up to date" in second.stderr
    assert (again / ".git" / "index").stat().st_mtime_ns == head


def test_base_refuses_a_foreign_directory(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    proc = stack("base", "--out", foreign)
    assert proc.returncode == 2
    assert "not a base made by" in proc.stderr
    assert (foreign / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_bad_pin_file_is_refused_by_the_scripts(tmp_path: Path) -> None:
    pin = tmp_path / "PIN"
    pin.write_text("TORCH_VERSION=2.11.0\nthis is not a pin\n")
    env = clean_env(SYMM_STACK_PIN_FILE=str(pin))
    proc = run(["bash", REPO / "scripts/apply_and_build.sh", "--no-tests"], env=env)
    assert proc.returncode == 2
    assert "this is not a pin" in proc.stderr
    proc = stack("check-torch", env=env)
    assert proc.returncode == 2
    assert "this is not a pin" in proc.stderr


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_stack_py_run_as_a_command_uses_the_repository_venv(tmp_path: Path) -> None:
    """`scripts/stack.py` from a fresh shell, whose python3 lacks torch."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(STACK_PY, repo / "scripts" / "stack.py")
    shutil.copy2(STACK_PY.parent / "venv_python.sh", repo / "scripts")
    shutil.copytree(BASE_DIR, repo / "patches" / BASE)
    executable(
        tmp_path / "bin" / "python3", "#!/bin/sh\necho 'PATH python3' >&2\nexit 9\n"
    )
    env = clean_env(PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin")
    command = [repo / "scripts" / "stack.py", "check-torch"]
    proc = run(command, env=env)
    assert (proc.returncode, proc.stderr) == (9, "PATH python3\n")  # no .venv yet
    # the newest venv by version, not by name: 2.9.0 sorts after 2.11.0 as text
    for old in ("2.9.0", "1.0.0"):
        executable(repo / ".venv" / old / "bin" / "python3", "#!/bin/sh\nexit 8\n")
    executable(
        repo / ".venv" / BASE / "bin" / "python3",
        f'#!/bin/sh\nexec {sys.executable} "$@"\n',
    )
    proc = run(command, env=env)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == installed_torch_dir()


def test_a_missing_module_names_the_interpreter_and_the_venv(
    stack_base: Path, stack_series: Path
) -> None:
    proc = run(
        [sys.executable, "-S", STACK_PY, "check-series"]
        + ["--base-dir", stack_base, "--series-dir", stack_series]
    )
    assert proc.returncode == 3, proc.stderr
    assert (
        f"unidiff is missing for {os.path.abspath(sys.executable)}, the interpreter "
        "running stack.py" in proc.stderr
    )
    assert "run by .venv/<VERSION>/bin/python" in proc.stderr


def ensure_venv_with_free(tmp_path: Path, free_kib: int) -> tuple[int, str, str]:
    """Run lib.sh's ensure_venv for a torch venv whose file system has free_kib free.

    The venv's python is a spy (`spy_python`: it logs each call and refuses
    pip); a `df` ahead on PATH reports free_kib available.  Returns (status,
    stderr, calls).
    """
    venv = tmp_path / "venv"
    calls = tmp_path / "calls.log"
    spy_python(venv / "bin" / "python", calls)
    tools = tmp_path / "tools"
    tools.mkdir()
    df = tools / "df"
    df.write_text(
        "#!/bin/bash\n"
        'echo "Filesystem 1024-blocks Used Available Capacity Mounted on"\n'
        f'echo "/dev/x 999999999 1 {free_kib} 1% /"\n'
    )
    df.chmod(0o755)
    script = (
        "set -euo pipefail\n"
        f"source {REPO / 'scripts' / 'lib.sh'}\n"
        "TORCH_WHEEL=torch==0.0.0\n"
        f"ensure_venv {venv} 1 {sys.executable}\n"
    )
    env = clean_env(PATH=f"{tools}{os.pathsep}{os.environ['PATH']}")
    proc = run(["bash", "-c", script], env=env)
    made = calls.read_text() if calls.exists() else ""
    return proc.returncode, proc.stderr, made


def test_a_torch_venv_on_a_full_disk_is_refused_before_pip(tmp_path: Path) -> None:
    # 512 MiB free: pip would fail part-way through a multi-GiB torch wheel
    rc, err, made = ensure_venv_with_free(tmp_path, 512 * 1024)
    assert rc == 2, err
    assert err.splitlines() == [
        f"[stack] error: {tmp_path / 'venv'}: 512 MiB free on its file system; "
        "installing into it needs about 6 GiB. Free some space (old clones and "
        "their .venv/ folders), or use --no-venv with a Python that has what it "
        "needs"
    ]
    assert "-m pip" not in made, made
    assert not (tmp_path / "venv" / ".stack-stamp").exists()


def test_a_torch_venv_with_room_goes_on_to_pip(tmp_path: Path) -> None:
    # the negative of the test above: with room, the check lets pip run
    rc, err, made = ensure_venv_with_free(tmp_path, 64 * 1024 * 1024)
    assert rc != 0  # the stand-in refuses pip
    assert "-m pip install --disable-pip-version-check torch==0.0.0" in made, err
    assert "MiB free on its file system" not in err
