"""scripts/gpu_tier.sh: arguments, the refusal without a GPU, and its runs.

The runs go to a stand-in interpreter: the real one for everything (stack.py,
check-torch, the overlays), except that it reports FAKE_GPUS CUDA GPUs
(default 1), answers `-m pytest ... test_symm_mem_*.py` (a level) with a pytest
summary line and the exit status FAKE_RC_L<level>, and `-m pytest
... test_peer_alloc_info.py` (the one-GPU C++ check) likewise with FAKE_RC_CXX;
it records the level, PYTHONPATH and arguments it saw.  FAKE_POISON_L<level>=N
makes a level's output that of a MultiProcContinuousTest class whose test
failed and whose N later tests pytest then reported as skipped
("Previous test failed, skipping ...").  With FAKE_PYTEST_FILE=FILE a
level runs the real pytest on FILE instead (a stand-in MultiProcContinuousTest
module on CPU and gloo), so the script reads pytest's own output.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from tooling_helpers import BASE, BASE_DIR, REPO, clean_env, run


GPU_TIER = REPO / "scripts" / "gpu_tier.sh"

FAKE = """#!/usr/bin/env bash
if [[ "${1:-}" == -c && "$2" == *device_count* ]]; then
    echo "${FAKE_GPUS:-1}"
    exit 0
fi
if [[ "${1:-}" == -m && "$2" == pytest && "$*" == *test_peer_alloc_info.py* ]]; then
    echo "cxx path=${PYTHONPATH%%:*} args=$*" >> "$FAKE_RECORD"
    echo "==== 4 passed, 2 xfailed in 1.00s ===="
    exit "${FAKE_RC_CXX:-0}"
fi
if [[ "${1:-}" == -m && "$2" == pytest ]]; then
    echo "level=$SYMM_STACK_LEVEL path=${PYTHONPATH%%:*} args=$*" >> "$FAKE_RECORD"
    if [[ -n "${FAKE_PYTEST_FILE:-}" ]]; then
        exec REAL -m pytest -v -rfEs -p no:cacheprovider "$FAKE_PYTEST_FILE"
    fi
    poison_var="FAKE_POISON_L$SYMM_STACK_LEVEL"
    rc_var="FAKE_RC_L$SYMM_STACK_LEVEL"
    poison="${!poison_var:-0}"
    if ((poison > 0)); then
        echo "FAILED t.py::Case::test_a - RuntimeError: Exception in worker process:"
        for ((i = 0; i < poison; i++)); do
            echo "SKIPPED [1] t.py:$i: Previous test failed, skipping t.Case.test_$i"
        done
        echo "SKIPPED [1] t.py:99: holds for series levels 9..; torch is at level 1"
        echo "==== 1 failed, 3 passed, $((poison + 1)) skipped in 1.00s ===="
    else
        echo "==== 3 passed, 1 skipped in 1.00s ===="
    fi
    exit "${!rc_var:-0}"
fi
exec REAL "$@"
"""

# A MultiProcContinuousTest class on CPU and gloo, world size 1: a test
# passes, one fails, two are then skipped by the class's poison pill, one skips
# for its level.
POISONED_MODULE = """
from __future__ import annotations

import unittest

from torch.testing._internal.common_distributed import MultiProcContinuousTest


class Case(MultiProcContinuousTest):
    world_size = 1

    @classmethod
    def backend_str(cls) -> str:
        return "gloo"

    @classmethod
    def device_type(cls) -> str:
        return "cpu"

    def test_a_passes(self) -> None:
        pass

    @unittest.skip("holds for series levels 9..; torch is at level 0")
    def test_b_level(self) -> None:
        pass

    def test_c_fails(self) -> None:
        self.assertEqual(1, 2)

    def test_d_after(self) -> None:
        pass

    def test_e_after(self) -> None:
        pass
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    fake = tmp_path / "python"
    fake.write_text(FAKE.replace("REAL", sys.executable))
    fake.chmod(0o755)
    return fake


def gpu_tier(*args: str | Path, **env: str) -> tuple[int, str]:
    """Exit status, and stderr then stdout (whose last line is the count).
    The base is named (SYMM_STACK_BASE): python3 here may have no torch."""
    proc = run(["bash", GPU_TIER, *args], env=clean_env(SYMM_STACK_BASE=BASE, **env))
    return proc.returncode, proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--levels", "99"], "level '99' is not in 0.."),
        (["--levels", "x"], "level 'x' is not in 0.."),
        (["--timeout", "0"], "--timeout is '0'; needs seconds"),
        (["--python"], "--python needs a value"),
        (["--bogus"], "unknown argument '--bogus'"),
        (["--installed", "--levels", "1 2"], "--installed tests one build"),
    ],
)
def test_bad_arguments_are_refused(args: list[str], message: str) -> None:
    rc, out = gpu_tier(*args)
    assert rc == 2, out
    assert message in out


def test_refuses_without_a_gpu() -> None:
    import torch

    if torch.cuda.device_count() >= 1:
        pytest.skip("this machine has a CUDA GPU")
    rc, out = gpu_tier("--python", sys.executable, "--levels", "0")
    assert rc == 3, out
    assert "the GPU tier needs a CUDA GPU" in out


@pytest.mark.parametrize("gpus", ["1", "2"])
def test_levels_run_on_their_overlays(
    fake_python: Path, tmp_path: Path, gpus: str
) -> None:
    record = tmp_path / "record"
    logs = tmp_path / "logs"
    rc, out = gpu_tier(
        "--python", fake_python, "--levels", "0 2", "--logs", logs, "--", "-x",
        FAKE_RECORD=str(record), FAKE_GPUS=gpus,
    )  # fmt: skip
    assert rc == 0, out
    assert out.rstrip().endswith("3 passed, 0 failed"), out
    assert f"L0 (world size {gpus}): 3 passed, 1 skipped in 1.00s" in out
    assert f"L2 (world size {gpus}): 3 passed, 1 skipped in 1.00s" in out
    assert "cxx: 4 passed, 2 xfailed in 1.00s" in out
    *lines, cxx = record.read_text().splitlines()
    assert "test/distributed/cxx/test_peer_alloc_info.py" in cxx
    assert "OVERLAY" not in cxx and "/2 " not in cxx
    assert [line.split()[0] for line in lines] == ["level=0", "level=2"]
    assert "OVERLAY" not in lines[0] and "/2 " not in lines[0]
    overlay = Path(lines[1].split()[1].removeprefix("path="))
    assert overlay.name == "2" and (overlay / "OVERLAY.json").is_file()
    for line in lines:
        # plain pytest: no torchrun, the test classes spawn their own workers
        assert " args=-m pytest -v -rfEs " in line
        assert "torch.distributed.run" not in line and "nproc" not in line
        assert "test_symm_mem_allocator.py -x" in line
    assert (logs / "L0.log").is_file() and (logs / "L2.log").is_file()
    assert (logs / "cxx.log").is_file()


def test_installed_runs_its_one_level_without_overlay(
    fake_python: Path, tmp_path: Path
) -> None:
    record = tmp_path / "record"
    rc, out = gpu_tier(
        "--python", fake_python, "--installed", "--logs", tmp_path / "logs",
        FAKE_RECORD=str(record),
    )  # fmt: skip
    assert rc == 0, out
    assert "installed torch" in out
    level, cxx = record.read_text().splitlines()
    series = (BASE_DIR / "series").read_text().splitlines()
    last = sum(1 for line in series if line.strip() and not line.startswith("#"))
    assert level.startswith(f"level={last} "), level  # every patch in the series
    assert "build/overlay" not in level and "OVERLAY" not in level


@pytest.mark.parametrize(
    ("levels", "fail", "name", "tally"),
    [
        ("0 1", {"FAKE_RC_L1": "1"}, "L1", "2 passed, 1 failed"),
        ("0", {"FAKE_RC_CXX": "1"}, "cxx", "1 passed, 1 failed"),
    ],
    ids=["level", "cxx"],
)
def test_a_failing_run_fails_the_whole(
    fake_python: Path, tmp_path: Path, levels: str, fail: dict[str, str], name: str,
    tally: str,
) -> None:  # fmt: skip
    rc, out = gpu_tier(
        "--python", fake_python, "--levels", levels, "--logs", tmp_path / "logs",
        FAKE_RECORD=str(tmp_path / "record"), **fail,
    )  # fmt: skip
    assert rc == 1, out
    assert f"{name} failed (exit 1)" in out
    assert out.rstrip().endswith(tally), out


@pytest.mark.parametrize("rc", ["0", "1"])
def test_poison_pill_skips_count_as_failures(
    fake_python: Path, tmp_path: Path, rc: str
) -> None:
    rc_, out = gpu_tier(
        "--python", fake_python, "--levels", "0 1", "--logs", tmp_path / "logs",
        FAKE_RECORD=str(tmp_path / "record"), FAKE_POISON_L1="2", FAKE_RC_L1=rc,
    )  # fmt: skip
    assert rc_ == 1, out  # even where pytest's own exit status was 0
    # 1 failed + 2 skipped by the poison pill; the level skip stays a skip
    assert "L1 (world size 1): 3 failed, 3 passed, 1 skipped in 1.00s" in out
    assert "L1: 2 test(s) skipped after an earlier failure in their class" in out
    assert "L1 failed (exit 1)" in out
    assert "L0 (world size 1): 3 passed, 1 skipped in 1.00s" in out
    assert out.rstrip().endswith("2 passed, 1 failed"), out


def test_poison_pill_of_a_real_pytest_run(fake_python: Path, tmp_path: Path) -> None:
    module = tmp_path / "test_poisoned_stand_in.py"
    module.write_text(POISONED_MODULE)
    rc, out = gpu_tier(
        "--python", fake_python, "--levels", "0", "--logs", tmp_path / "logs",
        FAKE_RECORD=str(tmp_path / "record"), FAKE_PYTEST_FILE=str(module),
    )  # fmt: skip
    log = (tmp_path / "logs" / "L0.log").read_text()
    assert "Previous test failed, skipping" in log, log  # pytest's own words
    assert rc == 1, out
    # test_c_fails and the 2 tests after it failed; the level skip is a skip
    assert "L0 (world size 1): 3 failed, 1 passed, 1 skipped in " in out
    assert "L0: 2 test(s) skipped after an earlier failure in their class" in out
    assert out.rstrip().endswith("1 passed, 1 failed"), out


def test_a_level_without_overlay_fails_and_the_rest_run(
    fake_python: Path, tmp_path: Path
) -> None:
    series = tmp_path / "series"
    shutil.copytree(BASE_DIR, series)
    (first,) = series.glob("0001-*.patch")
    first.write_text("not a patch\n")
    record = tmp_path / "record"
    rc, out = gpu_tier(
        "--python", fake_python, "--levels", "1 0", "--series-dir", series,
        "--logs", tmp_path / "logs", FAKE_RECORD=str(record),
    )  # fmt: skip
    assert rc == 1, out
    assert "L1 failed (exit 1)" in out
    assert out.rstrip().endswith("2 passed, 1 failed"), out
    # level 1 never reached torchrun; level 0 and the C++ check still ran
    level0, cxx = record.read_text().splitlines()
    assert level0.startswith("level=0 ") and cxx.startswith("cxx ")
    assert (tmp_path / "logs" / "L1.log").read_text().strip()  # overlay's error
