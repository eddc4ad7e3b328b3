"""One series per base: --base, the default base, refusals, per-base summaries.

A made-up second base, 9.9.0, lives beside the real one in a temporary
patches root (SYMM_STACK_PATCHES_ROOT): its PIN names the installed torch's
commit (so `base` and `overlay` work on it) but its own version and tag, and
its series is the synthetic two-patch series of conftest.py.  Nothing here is
written under the repository's patches/, build/ or .venv/.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from tooling_helpers import (
    APPLY,
    BASE,
    BASE_DIR,
    PIN,
    REPO,
    STACK_PY,
    TARGET,
    clean_env,
    git,
    run,
)


FAKE = "9.9.0"
UNKNOWN = "7.0.0"


@pytest.fixture
def root(stack_series: Path, tmp_path: Path) -> Path:
    """patches/ with the real base (a link) and the made-up base FAKE."""
    root = tmp_path / "patches"
    root.mkdir()
    (root / BASE).symlink_to(BASE_DIR)
    fake = root / FAKE
    shutil.copytree(stack_series, fake)
    pin = dict(PIN)
    pin.update(
        TORCH_VERSION=FAKE,
        TORCH_GIT_TAG=f"v{FAKE}",
        TORCH_WHEEL=f"torch=={FAKE}",
        SERIES_LENGTH="2",
    )
    (fake / "PIN").write_text("".join(f"{k}={v}\n" for k, v in pin.items()))
    return root


def env_for(root: Path, **extra: str) -> dict[str, str]:
    return clean_env(SYMM_STACK_PATCHES_ROOT=str(root), **extra)


def stack(root: Path, *args: str | Path, **extra: str):  # noqa: ANN201
    return run([sys.executable, STACK_PY, *args], env=env_for(root, **extra))


def made_nothing(*versions: str) -> None:
    for version in versions:
        assert not (REPO / ".venv" / version).exists(), version
        assert not (REPO / "build" / version).exists(), version


def test_the_bases_and_the_newest(root: Path) -> None:
    assert stack(root, "bases").stdout.split() == [BASE, FAKE]
    assert stack(root, "bases", "--newest").stdout.split() == [FAKE]
    assert stack(root, "bases", "--installed").stdout.split() == [BASE]
    # a base whose series is not there yet is no supported base
    (root / "9.10.0").mkdir()
    (root / "9.10.0" / "PIN").write_text((root / FAKE / "PIN").read_text())
    assert stack(root, "bases", "--newest").stdout.split() == [FAKE]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_unknown_base_is_refused_in_one_line_and_nothing_is_made(
    root: Path, how: str
) -> None:
    args = ["--base", UNKNOWN] if how == "flag" else []
    extra = {"SYMM_STACK_BASE": UNKNOWN} if how == "env" else {}
    proc = run(["bash", APPLY, *args], env=env_for(root, **extra))
    assert proc.returncode == 2, proc.stderr
    what = "--base" if how == "flag" else "SYMM_STACK_BASE"
    assert proc.stderr == (
        f"[apply] error: {what} {UNKNOWN} is not a supported base; "
        f"supported: {BASE}, {FAKE}\n"
    )
    assert proc.stdout == ""
    made_nothing(UNKNOWN, FAKE)
    for script in ("test.sh", "gpu_tier.sh", "ghstack_stack.sh"):
        proc = run(
            ["bash", REPO / "scripts" / script, *args], env=env_for(root, **extra)
        )
        assert proc.returncode == 2, (script, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1, (script, proc.stderr)
        assert f"supported: {BASE}, {FAKE}" in proc.stderr, (script, proc.stderr)
    made_nothing(UNKNOWN, FAKE)


def fake_torch(tmp_path: Path, version: str) -> Path:
    pkg = tmp_path / "faketorch" / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('fake torch imported')\n")
    (pkg / "version.py").write_text(
        f"__version__ = '{version}'\ngit_version = '{'1' * 40}'\n"
    )
    return pkg.parent


@pytest.mark.parametrize("mode", [["--installed"], []], ids=["installed", "wheel"])
def test_a_foreign_installed_torch_is_refused(
    root: Path, tmp_path: Path, mode: list[str]
) -> None:
    site = fake_torch(tmp_path, "2.12.0a0+gitabcdef0")
    proc = run(
        ["bash", APPLY, *mode, "--python", sys.executable, "--no-venv"],
        env=env_for(root, PYTHONPATH=str(site)),
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"[apply] error: torch 2.12.0a0+gitabcdef0 (installed for {sys.executable}) "
        f"is not a supported base; supported: {BASE}, {FAKE}\n"
    )
    made_nothing(FAKE)


def test_the_default_base_is_the_newest_or_the_installed_torchs(root: Path) -> None:
    # --upto beyond the series is refused after the base is chosen and before
    # anything is made: the message names the series of the base chosen.
    proc = run(["bash", APPLY, "--upto", "9"], env=env_for(root))
    assert proc.returncode == 2, proc.stderr
    assert f"the series in {root / FAKE} has 2 patch(es)" in proc.stderr
    # --no-venv: the base of the interpreter's torch, not the newest
    proc = run(
        ["bash", APPLY, "--upto", "9", "--python", sys.executable, "--no-venv"],
        env=env_for(root),
    )
    assert proc.returncode == 2, proc.stderr
    assert f"the series in {root / BASE} has" in proc.stderr
    # --base picks another
    proc = run(["bash", APPLY, "--base", BASE, "--upto", "9"], env=env_for(root))
    assert f"the series in {root / BASE} has" in proc.stderr
    made_nothing(FAKE)


def test_every_subcommand_honours_base(
    root: Path, stack_base: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    proc = stack(root, "base", "--base", FAKE, "--out", base)
    assert proc.returncode == 0, proc.stderr
    subject = git(base, "log", "-1", "--format=%s", "pin-base")
    assert subject.startswith(f"PyTorch v{FAKE} ("), subject

    proc = stack(root, "check-torch", "--base", FAKE)
    assert proc.returncode == 0, proc.stderr
    assert stack(root, "check-torch").returncode == 0  # the installed torch's base

    # import: FAKE's series (2 patches) by default
    proc = stack(root, "import", "--base", FAKE, "--base-dir", base)
    assert proc.returncode == 0, proc.stderr
    assert git(base, "rev-list", "--count", "pin-base..stack").strip() == "2"
    # ... and its default base repo is build/FAKE/base
    proc = stack(root, "import", "--base", FAKE)
    assert proc.returncode == 2
    assert str(REPO / "build" / FAKE / "base") in proc.stderr

    # export: into patches/FAKE by default, keeping its PIN
    pin = (root / FAKE / "PIN").read_text()
    proc = stack(root, "export", "--base", FAKE, "--base-dir", base)
    assert proc.returncode == 0, proc.stderr
    assert (root / FAKE / "PIN").read_text() == pin
    assert f"against PyTorch v{FAKE} " in (root / FAKE / "series").read_text()

    proc = stack(root, "check-series", "--base", FAKE, "--base-dir", base)
    assert proc.returncode == 0, proc.stderr
    assert f"series in {root / FAKE}: 2 patch(es), OK" in proc.stderr

    out = tmp_path / "overlay"
    proc = stack(root, "overlay", "--base", FAKE, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out / "2")
    assert "SYMM_STACK_TOOLING_MARK = 2" in (out / "2" / TARGET).read_text()

    # the synthetic mark lacks a blank line before it: FAKE's file was linted
    proc = stack(root, "lint-patched", "--base", FAKE, "--out", out)
    assert proc.returncode == 1, proc.stderr
    assert f"FAIL {TARGET}: `ruff format` would change 1 hunk(s)" in proc.stderr

    proc = stack(
        root, "apply-source", "--base", FAKE, "--check", "--source", stack_base
    )
    assert proc.returncode == 2
    assert f"needs v{FAKE} ({PIN['TORCH_GIT_COMMIT']})" in proc.stderr

    tests = tmp_path / "tests"
    proc = stack(root, "upstream-tests", "--base", FAKE, "--level", "3", "--out", tests)
    assert proc.returncode == 2
    assert f"1..2 (the patches of base {FAKE})" in proc.stderr

    for sub in ("check-torch", "base", "import", "export", "overlay", "check-series",
                "lint-patched"):  # fmt: skip
        proc = stack(root, sub, "--base", UNKNOWN)
        assert proc.returncode == 2, (sub, proc.stderr)
        assert proc.stderr == (
            f"stack.py {sub}: error: --base {UNKNOWN} is not a supported base; "
            f"supported: {BASE}, {FAKE}\n"
        )
    made_nothing(FAKE, UNKNOWN)


STAND_IN = """#!/bin/bash
case "$*" in
    *stack.py\\ overlay*) echo "$OVERLAY_DIR"; exit 0 ;;
    *stack.py*) exit 0 ;;
    "-m pytest "*)
        if [[ "$SYMM_STACK_LEVEL" == 0 ]]; then
            echo "3 passed, 1 skipped in 0.01s"
            echo "3 0 1" >> "$SYMM_STACK_PYTEST_TOTALS"
        else
            echo "2 passed in 0.01s"
            echo "2 0 0" >> "$SYMM_STACK_PYTEST_TOTALS"
        fi
        exit 0 ;;
esac
exec REAL "$@"
"""


def test_the_test_command_sums_per_base(tmp_path: Path) -> None:
    """scripts/test.sh and .ci/run in a copy of the repository whose two bases
    have 1 and 2 patches, with stand-ins for stack.py's work, pytest and the
    C++ check: one line per base, then the two closing lines over both."""
    repo = tmp_path / "repo"
    for rel in ("scripts/test.sh", "scripts/lib.sh", ".ci/run"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, repo / rel)
    (repo / "scripts" / "stack.py").write_text("")
    cxx = repo / "scripts" / "cxx_check.sh"
    cxx.write_text("echo 'cxx_check: CANNOT RUN HERE: stand-in' >&2\nexit 3\n")
    (repo / "test" / "distributed").mkdir(parents=True)
    (repo / "test" / "distributed" / "test_symm_mem_x_cpu.py").write_text("")
    for version, n in (("9.8.0", 1), ("9.9.0", 2)):
        d = repo / "patches" / version
        d.mkdir(parents=True)
        (d / "PIN").write_text(
            (BASE_DIR / "PIN").read_text().replace(PIN["TORCH_VERSION"], version)
        )
        (d / "series").write_text("".join(f"000{i}-x.patch\n" for i in range(1, n + 1)))
    python = tmp_path / "bin" / "python3"
    python.parent.mkdir()
    python.write_text(STAND_IN.replace("REAL", sys.executable))
    python.chmod(0o755)
    proc = run(
        ["bash", repo / ".ci" / "run", "--no-venv", "--python", python]
        + ["--base", "9.8.0", "--base", "9.9.0"],
        cwd=repo,
        env=clean_env(OVERLAY_DIR=str(tmp_path / "ov"), PATH="/usr/bin:/bin"),
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS  9.8.0: CPU tier, series level 1" in lines
    assert "PASS  9.9.0: CPU tier, series level 2" in lines
    assert any(x.startswith("SKIP  9.9.0: C++ compile check: ") for x in lines)
    # lint-patched, series integrity, levels 0..N pass; the C++ check skips
    assert lines[-5:] == [
        "all bases (lint, test/tooling): steps: 0 passed, 0 failed, 6 skipped; "
        "tests: 0 passed, 0 failed, 0 skipped",
        "base 9.8.0: steps: 4 passed, 0 failed, 1 skipped; "
        "tests: 5 passed, 0 failed, 1 skipped",
        "base 9.9.0: steps: 5 passed, 0 failed, 1 skipped; "
        "tests: 7 passed, 0 failed, 1 skipped",
        "steps: 9 passed, 0 failed, 8 skipped",
        "12 passed, 0 failed, 2 skipped",
    ]
