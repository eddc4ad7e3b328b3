"""apply_and_build.sh source mode (--no-build --no-tests) on a fake checkout.

No PyTorch checkout can exist on the development machines, so the "checkout"
is a clone of the wheel-derived base repo and a pin file (SYMM_STACK_PIN_FILE)
names its HEAD as the pinned commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tooling_helpers import (
    APPLY,
    IDENTITY,
    PIN,
    PIN_FILE,
    REPO,
    STACK_PY,
    TARGET,
    clean_env,
    git,
    run,
    spy_python,
)


BRANCH = "symm-mem-stack-2"


@pytest.fixture
def checkout(stack_base: Path, tmp_path: Path) -> Path:
    src = tmp_path / "pytorch"
    git(tmp_path, "clone", "-q", "--branch", "base", str(stack_base), str(src))
    return src


def pin_for(tmp_path: Path, commit: str) -> Path:
    pin = tmp_path / "PIN"
    text = PIN_FILE.read_text().replace(PIN["TORCH_GIT_COMMIT"], commit)
    pin.write_text(text)
    return pin


def apply(
    checkout: Path, series: Path, *extra: str, pin_commit: str | None = None
) -> tuple[int, str]:
    commit = pin_commit or git(checkout, "rev-parse", "pin-base").strip()
    pin = pin_for(checkout.parent, commit)
    proc = run(
        [
            "bash",
            APPLY,
            "--source",
            checkout,
            "--upto",
            "2",
            "--series-dir",
            series,
            "--python",
            sys.executable,
            "--no-venv",
            "--no-build",
            "--no-tests",
            *extra,
        ],
        env=clean_env(SYMM_STACK_PIN_FILE=str(pin)),
    )
    return proc.returncode, proc.stdout + proc.stderr


def heads(repo: Path) -> str:
    return git(repo, "for-each-ref", "--format=%(refname:short) %(objectname)")


def test_applies_the_series_on_a_new_branch(checkout: Path, stack_series: Path) -> None:
    rc, out = apply(checkout, stack_series)
    assert rc == 0, out
    assert git(checkout, "symbolic-ref", "--short", "HEAD").strip() == BRANCH
    subjects = git(checkout, "log", "--format=%s", f"pin-base..{BRANCH}").splitlines()
    assert subjects == [
        "[inductor] comment the one-shot lowering, bump the mark",
        "[inductor] add the tooling mark",
    ]
    assert "SYMM_STACK_TOOLING_MARK = 2" in (checkout / TARGET).read_text()
    assert git(checkout, "status", "--porcelain") == ""


def test_refuses_a_foreign_checkout(checkout: Path, stack_series: Path) -> None:
    head = git(checkout, "rev-parse", "HEAD").strip()
    before = heads(checkout)
    rc, out = apply(checkout, stack_series, pin_commit="1" * 40)
    assert rc == 2, out
    assert "foreign checkout" in out and head in out and "1" * 40 in out
    assert heads(checkout) == before


def test_refuses_a_dirty_checkout(checkout: Path, stack_series: Path) -> None:
    path = checkout / TARGET
    path.write_text(path.read_text() + "# local edit\n")
    before = heads(checkout)
    rc, out = apply(checkout, stack_series)
    assert rc == 2, out
    assert "uncommitted changes" in out and TARGET in out
    assert path.read_text().endswith("# local edit\n")
    assert heads(checkout) == before


def test_refuses_a_half_applied_series(
    checkout: Path, stack_series: Path, bad_series: Path
) -> None:
    patches = sorted(str(p) for p in bad_series.glob("*.patch"))
    proc = run(["git", "am", *patches], cwd=checkout, env=clean_env(**IDENTITY))
    assert proc.returncode != 0
    rc, out = apply(checkout, stack_series)
    assert rc == 2, out
    assert "half-applied" in out and "rebase-apply" in out
    assert BRANCH not in heads(checkout)


def test_refuses_an_existing_branch_unless_forced(
    checkout: Path, stack_series: Path
) -> None:
    git(checkout, "branch", BRANCH)
    before = heads(checkout)
    rc, out = apply(checkout, stack_series)
    assert rc == 2, out
    assert f"branch {BRANCH} already exists" in out
    assert heads(checkout) == before
    rc, out = apply(checkout, stack_series, "--force")
    assert rc == 0, out
    assert git(checkout, "rev-list", "--count", f"pin-base..{BRANCH}").strip() == "2"


def test_failure_restores_the_original_branch(checkout: Path, bad_series: Path) -> None:
    before = heads(checkout)
    rc, out = apply(checkout, bad_series)
    assert rc == 2, out
    assert "patch 2 does not apply" in out
    assert f"{TARGET} hunk 2/2" in out
    assert git(checkout, "symbolic-ref", "--short", "HEAD").strip() == "base"
    assert heads(checkout) == before
    assert git(checkout, "status", "--porcelain") == ""
    assert not (checkout / ".git" / "rebase-apply").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--upto", "two"], "needs a number"),
        (["--wheel"], "belong to source mode"),
        (["--installed", "--source", "x"], "does not go with"),
        (["--bogus"], "unknown argument"),
        (["--source"], "--source needs a value"),
    ],
)
def test_bad_arguments_are_refused(args: list[str], needle: str) -> None:
    proc = run(["bash", APPLY, *args], env=clean_env())
    assert proc.returncode == 2
    assert needle in proc.stderr


@pytest.fixture
def spy(tmp_path: Path) -> tuple[Path, Path]:
    """A --python that logs each call and refuses to make a venv or run pip."""
    calls = tmp_path / "calls.log"
    return spy_python(tmp_path / "spy" / "python3", calls), calls


def refusal(args: list[str | Path], env: dict[str, str] | None = None) -> str:
    """Run apply_and_build.sh; it must exit 2 with one line on stderr, no stdout."""
    proc = run(["bash", APPLY, *args], env=env or clean_env())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("[apply] error: "), lines[0]
    return lines[0]


def test_upto_beyond_the_series_is_refused_before_anything_runs(
    stack_series: Path, spy: tuple[Path, Path]
) -> None:
    python, calls = spy
    line = refusal(
        ["--upto", "9", "--series-dir", stack_series, "--python", python, "--no-venv"]
    )
    assert line.endswith(
        f"--upto 9: the series in {stack_series} has 2 patch(es); needs a number 0..2"
    )
    # nothing ran but the lookup of the base of PY's torch (`stack.py bases`)
    ran = calls.read_text().splitlines() if calls.exists() else []
    assert all("stack.py bases " in x for x in ran if "stack.py" in x), ran
    proc = run(
        [python, STACK_PY, "overlay", "--upto", "9", "--series-dir", stack_series]
    )
    assert proc.returncode == 2
    assert "has 2 patch(es); needs a number 0..2" in proc.stderr


@pytest.mark.parametrize("no_venv", [[], ["--no-venv"]])
def test_a_python_that_does_not_exist_is_one_line(no_venv: list[str]) -> None:
    line = refusal(["--python", "/nonexistent/python3", *no_venv])
    assert "interpreter /nonexistent/python3 not found; needs --python PY" in line
    proc = run(["bash", REPO / "scripts/test.sh", "--python", "/nonexistent/python3"])
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "[test] error: interpreter /nonexistent/python3 not found; "
        "needs --python PY naming a Python 3.11"
    ]


@pytest.mark.parametrize("kind", ["not-git", "empty-repo", "foreign"])
def test_a_bad_source_is_refused_before_a_venv_is_made(
    kind: str,
    checkout: Path,
    stack_series: Path,
    spy: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    python, calls = spy
    source = tmp_path / kind
    source.mkdir()
    env = clean_env()
    if kind == "empty-repo":
        git(source, "init", "-q")
    if kind == "foreign":
        source = checkout  # a clone of the base; the pin names another commit
        env = clean_env(SYMM_STACK_PIN_FILE=str(pin_for(tmp_path, "1" * 40)))
    line = refusal(
        ["--source", source, "--series-dir", stack_series, "--python", python], env
    )
    needed = {
        "not-git": f"{source} is not the top of a git checkout; needs a PyTorch clone",
        "empty-repo": f"{source} has no commit checked out (an empty repository?); "
        "needs a PyTorch clone at",
        "foreign": f"foreign checkout: {source} HEAD is",
    }[kind]
    assert needed in line
    made = calls.read_text().splitlines()
    assert not [c for c in made if c.startswith(("-m venv", "-m pip"))], made
    assert not (REPO / "build" / "venv-source").exists()
