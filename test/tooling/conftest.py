"""Shared fixtures for the toolchain tests: a base repo and a synthetic series.

The synthetic series has two patches made against the wheel-derived base
(``stack.py base``), both touching torch/_inductor/comm_lowering.py:

  1. appends ``SYMM_STACK_TOOLING_MARK = 1``;
  2. adds a comment to ``_one_shot_all_reduce`` (hunk 1/2) and changes the mark
     to 2 (hunk 2/2).

Nothing here depends on the content of the real series in patches/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tooling_helpers import (
    COMMENT,
    FUNCTION_LINE,
    TARGET,
    commit,
    edit_series,
    git,
    message,
    stack,
)


@pytest.fixture(scope="session")
def stack_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base repo made by `stack.py base`, shared by the session."""
    base = tmp_path_factory.mktemp("stack") / "base"
    proc = stack("base", "--out", base)
    assert proc.returncode == 0, proc.stderr
    return base


@pytest.fixture(scope="session")
def stack_series(stack_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic 2-patch series, exported from a branch of the base."""
    git(stack_base, "checkout", "-q", "-b", "synthetic", "pin-base")
    path = stack_base / TARGET
    text = path.read_text()
    path.write_text(text + "\nSYMM_STACK_TOOLING_MARK = 1\n")
    commit(stack_base, message("add the tooling mark"))
    text = path.read_text()
    assert FUNCTION_LINE in text
    text = text.replace(FUNCTION_LINE, FUNCTION_LINE + COMMENT)
    text = text.replace("TOOLING_MARK = 1\n", "TOOLING_MARK = 2\n")
    path.write_text(text)
    commit(stack_base, message("comment the one-shot lowering, bump the mark"))
    git(stack_base, "checkout", "-q", "base")
    series = tmp_path_factory.mktemp("series") / "patches"
    proc = stack(
        "export", "--base-dir", stack_base, "--branch", "synthetic", "--out", series
    )
    assert proc.returncode == 0, proc.stderr
    return series


@pytest.fixture
def bad_series(stack_series: Path, tmp_path: Path) -> Path:
    """The synthetic series with hunk 2/2 of patch 2 no longer applying."""

    def corrupt(name: str, text: str) -> str:
        if name.startswith("0002-"):
            assert "-SYMM_STACK_TOOLING_MARK = 1\n" in text
            return text.replace(
                "-SYMM_STACK_TOOLING_MARK = 1\n", "-SYMM_STACK_TOOLING_MARK = 7\n"
            )
        return text

    return edit_series(stack_series, tmp_path / "bad", corrupt)
