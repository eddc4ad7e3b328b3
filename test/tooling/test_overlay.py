"""stack.py overlay: patched torch Python over the installed wheel."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from tooling_helpers import (
    REPO,
    TARGET,
    clean_env,
    edit_series,
    installed_torch_dir,
    run,
    stack,
)


PROBE = """
import inspect, json, sys
sys.path.append(sys.argv[1])
import stack_level
import torch
import torch._inductor.comm_lowering as c
print(json.dumps({
    "torch": torch.__file__,
    "module": c.__file__,
    "mark": getattr(c, "SYMM_STACK_TOOLING_MARK", None),
    "commented": "tooling test: patch 2" in inspect.getsource(c._one_shot_all_reduce),
    "level": stack_level.LEVEL,
}))
"""


def probe(pythonpath: Path | None) -> dict[str, object]:
    env = clean_env()
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(pythonpath), *filter(None, [env.get("PYTHONPATH")])]
        )
    proc = run(
        [sys.executable, "-c", PROBE, REPO / "test" / "distributed"],
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def overlay(series: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    proc = stack("overlay", "--series-dir", series, "--out", out, *extra)
    return proc.returncode, proc.stdout, proc.stderr


def digest_tree(paths: list[Path]) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.exists()
    }


def test_overlay_changes_torch_and_leaves_the_install_alone(
    stack_series: Path, tmp_path: Path
) -> None:
    torch_dir = installed_torch_dir()
    watched = [
        torch_dir / TARGET.removeprefix("torch/"),
        *sorted((torch_dir / "_inductor" / "__pycache__").glob("comm_lowering.*")),
    ]
    before = digest_tree(watched)
    out = tmp_path / "overlay"
    rc, stdout, stderr = overlay(stack_series, out, "--print-env")
    assert rc == 0, stderr
    target = out / "2"
    assert stdout.splitlines() == [
        f"export PYTHONPATH={target}${{PYTHONPATH:+:$PYTHONPATH}}",
        "export SYMM_STACK_LEVEL=2",
    ]
    meta = json.loads((target / "OVERLAY.json").read_text())
    assert meta["upto"] == 2
    assert meta["patches"] == sorted(p.name for p in stack_series.glob("*.patch"))
    assert set(meta["sha256"]) == set(meta["patches"])
    assert meta["torch_dir"] == str(torch_dir)
    assert list(meta["files"]) == [TARGET]

    patched = target / TARGET
    assert not patched.is_symlink() and patched.is_file()
    assert (target / "torch/__init__.py").resolve() == torch_dir / "__init__.py"
    assert (target / "torch/_inductor").is_dir()
    assert not (target / "torch/_inductor").is_symlink()
    cache = target / "torch/_inductor/__pycache__"
    assert not list(cache.glob("comm_lowering.*.pyc"))
    assert all(p.is_symlink() for p in cache.glob("lowering.*.pyc"))

    seen = probe(target)
    assert seen["torch"] == str(target / "torch/__init__.py")
    assert seen["module"] == str(patched)
    assert seen["mark"] == 2
    assert seen["commented"] is True
    assert seen["level"] == 2
    assert digest_tree(watched) == before


def test_overlay_rerun_is_idempotent_and_rebuilds_on_change(
    stack_series: Path, tmp_path: Path
) -> None:
    out = tmp_path / "overlay"
    assert overlay(stack_series, out, "--upto", "1")[0] == 0
    marker = out / "1" / "OVERLAY.json"
    first = marker.stat().st_ino
    rc, _, stderr = overlay(stack_series, out, "--upto", "1")
    assert rc == 0 and "up to date" in stderr
    assert marker.stat().st_ino == first

    (out / "1" / TARGET).write_text("tampered\n")
    rc, _, stderr = overlay(stack_series, out, "--upto", "1")
    assert rc == 0 and "up to date" not in stderr
    assert "SYMM_STACK_TOOLING_MARK = 1" in (out / "1" / TARGET).read_text()

    changed = edit_series(
        stack_series,
        tmp_path / "changed",
        lambda name, text: (
            text.replace("TOOLING_MARK = 1\n", "TOOLING_MARK = 11\n")
            if name.startswith("0001-")
            else text
        ),
    )
    rc, _, stderr = overlay(changed, out, "--upto", "1")
    assert rc == 0 and "up to date" not in stderr
    assert "SYMM_STACK_TOOLING_MARK = 11" in (out / "1" / TARGET).read_text()
    assert sorted(p.name for p in out.iterdir()) == ["1"]


def test_overlay_is_all_or_nothing(
    stack_series: Path, bad_series: Path, tmp_path: Path
) -> None:
    out = tmp_path / "overlay"
    rc, _, stderr = overlay(bad_series, out)
    assert rc == 2
    line = stderr.strip().splitlines()[-1]
    assert "patch 2 does not apply" in line
    assert "0002-inductor-comment-the-one-shot" in line
    assert f"{TARGET} hunk 2/2 @@" in line
    assert not out.exists()

    assert overlay(stack_series, out)[0] == 0
    good = (out / "2" / "OVERLAY.json").read_text()
    rc, _, _ = overlay(bad_series, out)
    assert rc == 2
    assert sorted(p.name for p in out.iterdir()) == ["2"]
    assert (out / "2" / "OVERLAY.json").read_text() == good


def test_overlay_removal_restores_the_stock_torch(
    stack_series: Path, tmp_path: Path
) -> None:
    out = tmp_path / "overlay"
    assert overlay(stack_series, out, "--upto", "1")[0] == 0
    assert overlay(stack_series, out, "--upto", "2")[0] == 0
    rc, _, stderr = overlay(stack_series, out, "--upto", "2", "--remove")
    assert rc == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["1"]
    seen = probe(out / "2")
    torch_dir = installed_torch_dir()
    assert seen["torch"] == str(torch_dir / "__init__.py")
    assert seen["mark"] is None
    assert seen["level"] == 0
    rc, _, stderr = overlay(stack_series, out, "--remove")
    assert rc == 0, stderr
    assert not out.exists()


def test_overlay_level_zero_is_the_stock_pin(
    stack_series: Path, tmp_path: Path
) -> None:
    out = tmp_path / "overlay"
    rc, stdout, _ = overlay(stack_series, out, "--upto", "0", "--print-env")
    assert rc == 0
    assert stdout.splitlines() == ["export SYMM_STACK_LEVEL=0"]
    assert not out.exists()


def test_overlay_refuses_a_wrong_torch_and_an_impossible_level(
    stack_series: Path, tmp_path: Path
) -> None:
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "version.py").write_text("__version__ = '0.1'\ngit_version = 'abc'\n")
    out = tmp_path / "overlay"
    proc = stack(
        "overlay",
        "--series-dir",
        stack_series,
        "--out",
        out,
        env=clean_env(PYTHONPATH=str(fake.parent)),
    )
    assert proc.returncode == 2
    assert "wrong torch" in proc.stderr and "git abc" in proc.stderr
    rc, _, stderr = overlay(stack_series, out, "--upto", "3")
    assert rc == 2
    assert "--upto 3" in stderr and "has 2 patch(es)" in stderr
    assert not out.exists()
