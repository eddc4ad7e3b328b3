"""pytest.ini and conftest.py at the root: what every pytest run here gets."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tooling_helpers import REPO, clean_env, run


SAMPLE = """
import unittest

import torch


class Sample(unittest.TestCase):
    def test_passes(self):
        def method(self):
            return None

        torch.jit.script_method(method)  # torch warns: deprecated

    @unittest.skip("holds for series levels 0..0")
    def test_pin_a(self):
        pass

    @unittest.skip("holds for series levels 0..0")
    def test_pin_b(self):
        pass

    @unittest.skip("needs 2 GPUs")
    def test_gpu(self):
        pass

    def test_fails(self):
        self.fail("on purpose")
"""


def test_skip_reasons_grouped_totals_written_torch_noise_filtered(
    tmp_path: Path,
) -> None:
    for name in ("pytest.ini", "conftest.py"):
        shutil.copy2(REPO / name, tmp_path / name)
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    totals = tmp_path / "totals"
    totals.write_text("1 2 3\n")
    proc = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=clean_env(SYMM_STACK_PYTEST_TOTALS=str(totals)),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    grouped = lines.index(next(x for x in lines if "skipped, by reason" in x))
    assert lines[grouped + 1 : grouped + 3] == [
        "SKIPPED [2] holds for series levels 0..0",
        "SKIPPED [1] needs 2 GPUs",
    ]
    assert "script_method" not in proc.stdout
    assert lines[-1].startswith("1 failed, 1 passed, 3 skipped in "), lines[-1]
    assert totals.read_text() == "1 2 3\n1 1 3\n"
