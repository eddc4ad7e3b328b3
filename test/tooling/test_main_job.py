"""apply_and_build.sh's own output: one stream, one prefix, one closing summary.

The interpreter is a stand-in that answers the GPU count with 0 and stands in
for pytest and the timed import; everything else goes to the real one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tooling_helpers import APPLY, PIN, PIN_FILE, clean_env, run


CPU_ONLY = "on the CPU tier only (GPU tier not run: no CUDA GPU visible, 1 needed)"


@pytest.fixture
def python(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "python3"
    path.parent.mkdir()
    path.write_text(
        "#!/bin/bash\n"
        'case "$*" in\n'
        "    *torch.cuda.device_count*) echo 0; exit 0 ;;\n"
        "    *'import torch._inductor.lowering'*) exit 0 ;;\n"
        '    "-m pytest "*) echo "pytest stand-in: $*"; exit "$PYTEST_RC" ;;\n'
        "esac\n"
        f'exec {sys.executable} "$@"\n'
    )
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("case", "rc", "summary"),
    [
        ("pass", 0, f"LoweringTest passed at level 0 {CPU_ONLY}"),
        ("fail", 1, f"LoweringTest FAILED (exit 1) at level 0 {CPU_ONLY}"),
        (
            "no-tests",
            0,
            "overlay and import ready, LoweringTest not run (--no-tests) at level 0",
        ),
        ("wrong-torch", 2, "FAILED (exit 2) before LoweringTest ran at level 0"),
    ],
)
def test_the_main_job_ends_with_one_summary(
    python: Path, tmp_path: Path, case: str, rc: int, summary: str
) -> None:
    env = clean_env(PYTEST_RC=str(rc))
    extra = ["--no-tests"] if case == "no-tests" else []
    if case == "wrong-torch":
        pin = tmp_path / "PIN"
        text = PIN_FILE.read_text()
        pin.write_text(text.replace(PIN["TORCH_GIT_COMMIT"], "0" * 40))
        env["SYMM_STACK_PIN_FILE"] = str(pin)
    proc = run(
        ["bash", APPLY, "--upto", "0", "--python", python, "--no-venv", *extra],
        env=env,
    )
    assert proc.returncode == rc, proc.stderr
    stack_py = ("[stack] ", "stack.py ")  # stack.py's lines, with their own prefix
    own = [line for line in proc.stderr.splitlines() if not line.startswith(stack_py)]
    assert own and all(line.startswith("[apply] ") for line in own), proc.stderr
    assert own[-1] == f"[apply] summary: {summary}"
    assert proc.stderr.splitlines()[-1] == own[-1]
    assert sum("summary:" in line for line in own) == 1
    if case in ("pass", "fail"):
        assert "[apply] GPU tier skipped: no CUDA GPU visible, 1 needed" in own
        cpu_tier = "test/distributed/test_symm_mem_lowering_cpu.py"
        assert proc.stdout == f"pytest stand-in: -m pytest -v {cpu_tier}\n"
    else:
        assert proc.stdout == ""
