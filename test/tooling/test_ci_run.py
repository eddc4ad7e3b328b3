""".ci/run's checks of the test command's log, on stand-ins for scripts/test.sh."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tooling_helpers import REPO, run


GOOD = [
    "[test] ==> toolchain tests (test/tooling)",
    "78 passed in 121.93s (0:02:01)",
    "[test] ==> CPU tier, series level 5",
    "54 passed, 15 skipped, 31 subtests passed in 70.18s (0:01:10)",
    "steps: 2 passed, 0 failed, 0 skipped",
    "132 passed, 0 failed, 15 skipped",
]


def ci_run(tmp_path: Path, lines: list[str], rc: int = 0) -> tuple[int, list[str]]:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    (repo / "scripts").mkdir()
    shutil.copy2(REPO / ".ci" / "run", repo / ".ci" / "run")
    (repo / "scripts" / "out.txt").write_text("".join(f"{x}\n" for x in lines))
    test_sh = repo / "scripts" / "test.sh"
    test_sh.write_text(f'#!/bin/bash\ncat "$(dirname "$0")/out.txt"\nexit {rc}\n')
    test_sh.chmod(0o755)
    proc = run(["bash", repo / ".ci" / "run"], cwd=tmp_path)
    assert (repo / "build" / "ci.log").read_text() == "".join(f"{x}\n" for x in lines)
    return proc.returncode, (proc.stdout + proc.stderr).splitlines()


def test_a_clean_log_passes_and_keeps_its_last_line(tmp_path: Path) -> None:
    assert ci_run(tmp_path / "ok", GOOD) == (0, GOOD)
    rc, out = ci_run(tmp_path / "failed", GOOD, rc=1)
    assert rc == 1 and out == GOOD


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("steps-counted", "not 'N passed, M failed, K skipped'"),
        (
            "wrong-sum",
            "pytest's own totals add up to '132 passed, 0 failed, 15 skipped'",
        ),
        ("no-step-line", "does not count the steps"),
        ("colour", "colour codes (ESC [) in the log, first at line 1"),
        ("commit-id", "a bare commit id in the log, first at line 2"),
    ],
)
def test_a_noisy_or_miscounted_log_fails(
    tmp_path: Path, case: str, problem: str
) -> None:
    lines = list(GOOD)
    if case == "steps-counted":
        lines[-1] = "2 passed, 0 failed"
    if case == "wrong-sum":
        lines[-1] = "2 passed, 0 failed, 0 skipped"
    if case == "no-step-line":
        del lines[-2]
    if case == "colour":
        lines[0] = "\x1b[32m INFO\x1b[0m zizmor"
    if case == "commit-id":
        lines.insert(1, "49c7e3be37191a67961d8278785f32ee7e11c3b4")
    rc, out = ci_run(tmp_path, lines)
    assert rc == 1
    assert out[-1] == lines[-1]
    assert any(x.startswith("[ci] log check failed: ") and problem in x for x in out)
