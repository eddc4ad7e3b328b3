"""scripts/stack.py upstream-tests: the GPU-tier tests of stack commit N as
they go upstream, without the level machinery (stack_level.py)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from tooling_helpers import REPO, STACK_PY, run


SOURCE = textwrap.dedent(
    '''\
    """A GPU-tier test file."""

    from __future__ import annotations

    import re

    from gpu_tier import SymmMemTestCase
    from stack_level import holds, levels  # noqa: E402


    class LoweringTest(SymmMemTestCase):
        @levels(0)
        def test_stock_behaviour_kept(self) -> None:
            pass

        @levels(0, 1)
        def test_pin_bug(self) -> None:
            pass

        @levels(2)
        def test_from_two(self) -> None:
            if holds(2, 2):
                # at commit 2
                x = 2
            else:
                # later
                x = re.sub("a", "b", "3")
            del x


    @levels(3)
    class LaterTest(SymmMemTestCase):
        def test_later(self) -> None:
            pass
    '''
)

HELPER = "class SymmMemTestCase:\n    pass\n"


def upstream_tests(level: int, out: Path, tests: Path | None = None) -> list[str]:
    "`stack.py upstream-tests --level LEVEL --out OUT [--tests TESTS]`: the names"
    args = [sys.executable, str(STACK_PY), "upstream-tests", "--level", str(level)]
    args += ["--out", str(out)] + (["--tests", str(tests)] if tests else [])
    proc = run(args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def render(tmp_path: Path, level: int) -> dict[str, str]:
    tests = tmp_path / "tests"
    tests.mkdir(exist_ok=True)
    (tests / "test_x.py").write_text(SOURCE)
    (tests / "test_x_cpu.py").write_text(SOURCE)
    (tests / "gpu_tier.py").write_text(HELPER)
    (tests / "stack_level.py").write_text("LEVEL = 0\n")
    out = tmp_path / f"out-{level}"
    return {
        name: (out / name).read_text() for name in upstream_tests(level, out, tests)
    }


def test_commit_1_keeps_tests_of_stock_behaviour_only(tmp_path: Path) -> None:
    files = render(tmp_path, 1)
    assert sorted(files) == ["gpu_tier.py", "test_x.py"]  # no CPU tier, no levels
    text = files["test_x.py"]
    assert "def test_stock_behaviour_kept" in text
    for gone in ("test_pin_bug", "test_from_two", "LaterTest", "levels", "holds"):
        assert gone not in text
    compile(text, "test_x.py", "exec")


def test_holds_branch_taken_at_the_commit(tmp_path: Path) -> None:
    two = render(tmp_path, 2)["test_x.py"]
    assert (
        "    def test_from_two(self) -> None:\n        # at commit 2\n        x = 2\n"
        in two
    )
    assert "later" not in two
    three = render(tmp_path, 3)["test_x.py"]
    assert "        # later\n        x = re.sub(" in three
    assert "class LaterTest(SymmMemTestCase):" in three
    assert "@levels" not in three and "stack_level" not in three


def test_nothing_left_writes_nothing(tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_y.py").write_text(
        "from stack_level import levels\n\n\nclass T:\n    @levels(0, 2)\n"
        "    def test_a(self) -> None:\n        pass\n"
    )
    assert upstream_tests(1, tmp_path / "out", tests) == []


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_the_repository_tests_render(tmp_path: Path, level: int) -> None:
    out = tmp_path / "out"
    names = upstream_tests(level, out)
    assert "test_symm_mem_lowering.py" in names
    for name in names:
        text = (out / name).read_text()
        compile(text, name, "exec")
        assert "stack_level" not in text, name
    src = REPO / "test" / "distributed"
    assert ("test_symm_mem_allocator.py" in names) == (level >= 5)
    assert all((src / n).is_file() for n in names)
