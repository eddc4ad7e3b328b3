"""scripts/ghstack_stack.sh, run with --dry-run on a clone of the wheel-derived
base repo (scripts/stack.py base), and the nightly workflow's build step.

The stack is built twice over: from a synthetic 2-patch series made here
against the base (always), and from the real series in patches/ (when it is
there and applies to the wheel-derived base).  The pin file handed to the
scripts (SYMM_STACK_PIN_FILE) names the clone's commit as the pin; the
overlay that the final tree is compared with is made against the real pin
and the installed torch.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import tooling_helpers
from tooling_helpers import (
    BASE,
    BASE_DIR,
    IDENTITY,
    NEWEST,
    PATCHES,
    PIN,
    REPO,
    STACK_PY,
    clean_env,
    git,
    read_pin,
)


SCRIPT = REPO / "scripts" / "ghstack_stack.sh"
NIGHTLY = REPO / ".github" / "workflows" / "nightly.yml"
CI = REPO / ".github" / "workflows" / "ci.yml"
TESTS_DIR = REPO / "test" / "distributed"
SUBDIR = "test/distributed/symm_mem_stack"


def run(
    args: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    "tooling_helpers.run with a fixed git identity, failing loudly unless check=False"
    proc = tooling_helpers.run(
        list(args), cwd=cwd, env=clean_env(**IDENTITY, **(env or {}))
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def stack_py(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, str(STACK_PY), *args], check=check)


# The wheel-derived base repo is conftest's session fixture `stack_base`.


@dataclass(frozen=True)
class Series:
    name: str
    dir: Path
    patches: list[Path]


def patch_files(patch: Path) -> set[str]:
    names = set()
    for line in patch.read_text(encoding="utf-8", errors="replace").splitlines():
        m = re.match(r"^diff --git a/(\S+) b/(\S+)$", line)
        if m:
            names |= {m[1], m[2]}
    return names


def series_patches(series_dir: Path) -> list[Path]:
    names = [
        line.strip()
        for line in (series_dir / "series").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return [series_dir / name for name in names]


SYNTHETIC = [
    (
        "[inductor] Add a symmetric-memory planning stub",
        "Summary:\nAdds torch/_inductor/symm_mem_stack_demo.py, the first step of a\n"
        "synthetic series used to test scripts/ghstack_stack.sh.\n\n"
        "Test Plan:\npython -c 'import torch._inductor.symm_mem_stack_demo'\n\n"
        "Signed-off-by: Stack Test <stack-test@example.invalid>\n",
    ),
    (
        "[inductor] Use the planning stub",
        "Summary:\nExtends the stub and touches an existing module.\n\n"
        "Test Plan:\nCI\n",
    ),
]


@pytest.fixture(scope="session")
def synthetic_series(
    stack_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Series:
    """Two patches made here against the base and exported by stack.py export."""
    root = tmp_path_factory.mktemp("synthetic")
    work = root / "work"
    run(["git", "clone", "-q", str(stack_base), str(work)])
    git(work, "checkout", "-q", "-b", "synth", "pin-base")
    demo = work / "torch" / "_inductor" / "symm_mem_stack_demo.py"
    demo.write_text('"""Synthetic module."""\n\nPLANNED = ()\n')
    git(work, "add", str(demo))
    title, body = SYNTHETIC[0]
    git(work, "commit", "-q", "-m", f"{title}\n\n{body}")
    demo.write_text('"""Synthetic module."""\n\nPLANNED = ("one_shot_all_reduce",)\n')
    config = work / "torch" / "_inductor" / "config.py"
    config.write_text(config.read_text() + "\n# synthetic series: patch 2\n")
    git(work, "add", str(demo), str(config))
    title, body = SYNTHETIC[1]
    git(work, "commit", "-q", "-m", f"{title}\n\n{body}")
    out = root / "series"
    stack_py("export", "--base-dir", str(work), "--branch", "synth", "--out", str(out))
    return Series("synthetic", out, series_patches(out))


@pytest.fixture(scope="session")
def real_series(stack_base: Path) -> Series:
    series_dir = BASE_DIR
    if not (series_dir / "series").is_file():
        pytest.skip(f"patches/{BASE}/series is not written yet")
    patches = series_patches(series_dir)
    if not patches:
        pytest.skip(f"patches/{BASE}/series lists no patch yet")
    tracked = set(
        git(stack_base, "ls-tree", "-r", "--name-only", "pin-base").split("\n")
    )
    added: set[str] = set()
    for patch in patches:
        for name in patch_files(patch):
            # git am in a wheel-derived checkout can only touch files it has.
            if name not in tracked and name not in added:
                if f"--- /dev/null\n+++ b/{name}" in patch.read_text(errors="replace"):
                    added.add(name)
                else:
                    pytest.skip(
                        f"{patch.name} touches {name}, not in the wheel-derived base"
                    )
    return Series("real", series_dir, patches)


@pytest.fixture(params=["synthetic", "real"])
def series(request: pytest.FixtureRequest) -> Series:
    return request.getfixturevalue(f"{request.param}_series")


# --------------------------------------------------------------------------- stack


@dataclass
class Stack:
    series: Series
    src: Path
    pin: str
    commits: list[str]
    proc: subprocess.CompletedProcess[str]
    ghstack_log: Path


def fake_ghstack(tmp: Path) -> tuple[Path, Path]:
    log = tmp / "ghstack-calls.jsonl"
    fake = tmp / "ghstack"
    fake.write_text(
        "#!/usr/bin/env python3\n"
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd()}) + '\\n')\n"
    )
    fake.chmod(0o755)
    return fake, log


def make_checkout(stack_base: Path, tmp: Path, length: int) -> tuple[Path, Path, str]:
    """A clone of the base at pin-base, and a pin file naming that commit."""
    src = tmp / "pytorch"
    run(["git", "clone", "-q", str(stack_base), str(src)])
    git(src, "checkout", "-q", "--detach", "pin-base")
    pin_commit = git(src, "rev-parse", "HEAD").strip()
    pin = dict(PIN)
    pin["TORCH_GIT_COMMIT"] = pin_commit
    pin["SERIES_LENGTH"] = str(length)
    pin_file = tmp / "PIN"
    pin_file.write_text("".join(f"{k}={v}\n" for k, v in pin.items()))
    return src, pin_file, pin_commit


def ghstack_stack(
    src: Path,
    pin_file: Path,
    series: Series,
    fake: Path,
    *extra: str,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    return run(
        [str(SCRIPT), "--source", str(src), "--series-dir", str(series.dir), *extra],
        env={"SYMM_STACK_PIN_FILE": str(pin_file), "GHSTACK": str(fake)},
        check=check,
    )


@pytest.fixture
def stack(stack_base: Path, series: Series, tmp_path: Path) -> Stack:
    src, pin_file, pin_commit = make_checkout(stack_base, tmp_path, len(series.patches))
    fake, log = fake_ghstack(tmp_path)
    proc = ghstack_stack(src, pin_file, series, fake, "--dry-run")
    commits = git(src, "rev-list", "--reverse", f"{pin_commit}..HEAD").split()
    return Stack(series, src, pin_commit, commits, proc, log)


def patch_message(patch: Path) -> tuple[str, str]:
    """Title (without the [PATCH n/M] prefix) and body of a format-patch file."""
    text = patch.read_text(encoding="utf-8", errors="replace")
    head, _, rest = text.partition("\n\n")
    message = email.message_from_string(head + "\n\n", policy=email.policy.default)
    subject = re.sub(r"^\[PATCH[^\]]*\]\s*", "", str(message["Subject"]))
    body = re.split(r"^---$", rest, maxsplit=1, flags=re.M)[0]
    return subject, body.strip("\n")


def upstream_tests(level: int, tmp: Path) -> dict[str, bytes]:
    "What `stack.py upstream-tests --level LEVEL` writes: name -> content"
    out = tmp / f"upstream-{level}"
    names = stack_py("upstream-tests", "--level", str(level), "--out", str(out))
    return {name: (out / name).read_bytes() for name in names.stdout.split()}


def expected_commands(files: dict[str, bytes]) -> list[str]:
    # the GPU tier by plain pytest: its classes spawn their own workers
    return [
        f"python -m pytest {SUBDIR}/{name}"
        for name in sorted(files)
        if re.fullmatch(r"test_.*\.py", name)
    ]


def test_one_commit_per_patch_on_the_stack_branch(stack: Stack) -> None:
    n = len(stack.series.patches)
    assert len(stack.commits) == n
    assert (
        git(stack.src, "symbolic-ref", "--short", "HEAD").strip()
        == f"symm-mem-stack-{n}"
    )
    assert git(stack.src, "status", "--porcelain").strip() == ""
    parents = git(stack.src, "rev-list", "--parents", "--reverse", f"{stack.pin}..HEAD")
    assert all(len(line.split()) == 2 for line in parents.splitlines()), "no merges"


def test_each_commit_keeps_title_summary_and_test_plan(
    stack: Stack, tmp_path: Path
) -> None:
    for level, (commit, patch) in enumerate(
        zip(stack.commits, stack.series.patches, strict=True), 1
    ):
        commands = expected_commands(upstream_tests(level, tmp_path))
        assert commands, "every commit has GPU-tier tests to run"
        title, body = patch_message(patch)
        message = git(stack.src, "log", "-1", "--format=%B", commit).rstrip("\n")
        lines = message.split("\n")
        assert lines[0] == title
        assert "Summary:" in lines and "Test Plan:" in lines
        intro = next(
            i for i, line in enumerate(lines) if line.startswith("Tests of this commit")
        )
        assert f"commit {level} of the stack" in lines[intro]
        assert lines.index("Test Plan:") < intro
        added = lines[intro : intro + 2 + len(commands)]
        assert [line.strip() for line in added[2:]] == commands
        # What is left once the added block is taken out is the original message.
        rest = lines[:intro] + lines[intro + 2 + len(commands) :]
        squeeze = [line for line in rest[1:] if line.strip()]
        assert squeeze == [line for line in body.split("\n") if line.strip()]
        # Trailers stay last.
        original_last = [line for line in body.split("\n") if line.strip()][-1]
        if original_last.startswith("Signed-off-by:"):
            assert lines[-1] == original_last


def test_commit_n_carries_its_upstream_form_tests(stack: Stack, tmp_path: Path) -> None:
    previous: dict[str, bytes] = {}
    for level, (commit, patch) in enumerate(
        zip(stack.commits, stack.series.patches, strict=True), 1
    ):
        want = upstream_tests(level, tmp_path)
        listed = git(stack.src, "ls-tree", "--name-only", f"{commit}:{SUBDIR}").split()
        assert sorted(listed) == sorted(want)
        # No level machinery and none of the CPU tier goes upstream.
        assert "stack_level.py" not in want and "SERIES_LEVEL" not in want
        assert not any(name.endswith("_cpu.py") for name in want)
        for name, content in want.items():
            blob = subprocess.run(
                ["git", "-C", str(stack.src), "show", f"{commit}:{SUBDIR}/{name}"],
                capture_output=True,
                check=True,
            ).stdout
            assert blob == content, f"{name} in commit {level}"
            text = content.decode()
            compile(text, name, "exec")
            assert "stack_level" not in text and "@levels(" not in text, name
        # Outside the tests folder, the commit changes exactly the patch's files;
        # inside it, the tests whose rendering changed.
        changed = set(
            git(
                stack.src, "diff", "--name-only", "--no-renames", f"{commit}^", commit
            ).split()
        )
        assert {c for c in changed if not c.startswith(SUBDIR + "/")} == patch_files(
            patch
        )
        moved = {
            n for n in want.keys() | previous.keys() if want.get(n) != previous.get(n)
        }
        assert {c for c in changed if c.startswith(SUBDIR + "/")} == {
            f"{SUBDIR}/{n}" for n in moved
        }
        previous = want


def test_final_tree_equals_the_overlay(stack: Stack, tmp_path: Path) -> None:
    n = len(stack.series.patches)
    out = tmp_path / "overlay"
    stack_py(
        "overlay",
        "--upto",
        str(n),
        "--series-dir",
        str(stack.series.dir),
        "--out",
        str(out),
    )
    meta = json.loads((out / str(n) / "OVERLAY.json").read_text())
    files = meta["files"]
    assert files, "the series patches torch Python files"
    tree = set(git(stack.src, "ls-tree", "-r", "--name-only", "HEAD").split("\n"))
    for rel, digest in files.items():
        if digest is None:
            assert rel not in tree, f"{rel} is deleted by the series"
            continue
        final = subprocess.run(
            ["git", "-C", str(stack.src), "show", f"HEAD:{rel}"],
            capture_output=True,
            check=True,
        ).stdout
        assert final == (out / str(n) / rel).read_bytes(), rel


def test_dry_run_names_every_pull_request_and_stays_offline(stack: Stack) -> None:
    out = stack.proc.stdout
    n = len(stack.series.patches)
    positions = []
    for level, patch in enumerate(stack.series.patches, 1):
        title, _ = patch_message(patch)
        line = f"PR {level}/{n}: {title}"
        assert line in out
        positions.append(out.index(line))
    assert positions == sorted(positions), "bottom of the stack first"
    assert f"{SUBDIR}/test_symm_mem_lowering.py" in out
    assert "stack_level.py" not in out and "SERIES_LEVEL" not in out
    assert f"submit {stack.pin}..HEAD" in out
    assert not stack.ghstack_log.exists(), "a dry run must not call ghstack"


def test_submit_passes_extra_flags_to_ghstack(
    stack_base: Path, synthetic_series: Series, tmp_path: Path
) -> None:
    src, pin_file, pin_commit = make_checkout(
        stack_base, tmp_path, len(synthetic_series.patches)
    )
    fake, log = fake_ghstack(tmp_path)
    ghstack_stack(src, pin_file, synthetic_series, fake, "--", "--draft", "--no-skip")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [
        {
            "argv": ["submit", "--draft", "--no-skip", f"{pin_commit}..HEAD"],
            "cwd": str(src),
        }
    ]


def test_refuses_a_checkout_that_is_not_at_the_pin(
    stack_base: Path, synthetic_series: Series, tmp_path: Path
) -> None:
    src, pin_file, pin_commit = make_checkout(
        stack_base, tmp_path, len(synthetic_series.patches)
    )
    (src / "stray.txt").write_text("x\n")
    git(src, "add", "stray.txt")
    git(src, "commit", "-q", "-m", "not the pin")
    fake, log = fake_ghstack(tmp_path)
    proc = ghstack_stack(
        src, pin_file, synthetic_series, fake, "--dry-run", check=False
    )
    assert proc.returncode != 0
    assert pin_commit in proc.stdout + proc.stderr
    assert git(src, "branch", "--list", "symm-mem-stack-*").strip() == ""
    assert not log.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source"], "--source needs a value"),
        (["--upto", ""], "--upto needs a value"),
        (["--bogus"], "unknown argument '--bogus'"),
        (["--source", "/nonexistent-dir"], "/nonexistent-dir is not a directory"),
    ],
)
def test_bad_arguments_exit_2(args: list[str], message: str) -> None:
    proc = run([str(SCRIPT), *args], check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_help_and_shellcheck() -> None:
    proc = run([str(SCRIPT), "--help"])
    assert "--dry-run" in proc.stdout and "--source" in proc.stdout
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    shellcheck = shellcheck or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    run(
        [shellcheck, "-x", str(SCRIPT), str(REPO / "scripts" / "install_lint_tools.sh")]
    )


# --------------------------------------------------------------------------- workflows


def test_nightly_builds_through_apply_and_build_source_mode() -> None:
    text = NIGHTLY.read_text()
    calls = re.findall(r"^\s*(\S*scripts/apply_and_build\.sh [^\n]*)$", text, re.M)
    build = [c for c in calls if "--source" in c]
    assert len(build) == 1, calls
    flags = build[0].split()
    for flag in ("--source", "--wheel", "--no-tests", "--upto"):
        assert flag in flags, build[0]
    # One source of truth: the workflow itself neither applies nor builds.
    for forbidden in (
        "git am",
        "git apply",
        "pip wheel",
        "setup.py",
        "pip install -e",
        "python -m build",
    ):
        assert forbidden not in text, forbidden
    # The PyTorch checkout is the pinned commit, with submodules.
    assert "repository: pytorch/pytorch" in text
    assert "submodules: recursive" in text
    assert "ref: ${{ needs.plan.outputs.torch_commit }}" in text


def test_nightly_gpu_job_is_optional_and_reported() -> None:
    text = NIGHTLY.read_text()
    gpu = text[text.index("\n  gpu-tests:") : text.index("\n  summary:")]
    for var in (
        "NCCL_NVLS_ENABLE",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST",
        "NVSHMEM_DISABLE_NVLS",
    ):
        assert re.search(rf"^\s+{var}: \"[01]\"$", gpu, re.M), var
    assert "continue-on-error: true" in gpu
    assert re.search(r"timeout-minutes: \d+", gpu)
    assert "runs-on: ${{ needs.plan.outputs.gpu_runner }}" in gpu
    # the whole GPU tier on the built torch, at the build's level
    assert re.search(
        r"run: scripts/gpu_tier\.sh --installed .*--levels \"\$UPTO\"", gpu
    ), gpu
    assert "gpu_runner_label:" in text and "upto:" in text
    summary = text[text.index("\n  summary:") :]
    assert "if: always()" in summary
    for word in ("passed", "FAILED", "unavailable"):
        assert word in summary


def step_script(workflow: str, step: str) -> str:
    "The `run: |` script of the step named ``step``, dedented"
    match = re.search(
        rf"(?ms)^( +)- name: {re.escape(step)}\n.*?^\1  run: \|\n(.*?)(?=^\1- |\n\n)",
        workflow,
    )
    assert match, step
    return textwrap.dedent(match.group(2))


def test_nightly_plan_resolves_the_pin(tmp_path: Path) -> None:
    # Run the plan job's Resolve step as Actions would, in the repository.
    output, summary = tmp_path / "output", tmp_path / "summary"
    run(
        ["bash", "-c", step_script(NIGHTLY.read_text(), "Resolve")],
        env={
            "GITHUB_OUTPUT": str(output),
            "GITHUB_STEP_SUMMARY": str(summary),
            "DEFAULT_GPU_RUNNER_LABEL": "2-gpu",
        },
    )
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    pin = read_pin(PATCHES / NEWEST / "PIN")  # the nightly builds the newest base
    assert outputs["base"] == NEWEST
    assert outputs["torch_commit"] == pin["TORCH_GIT_COMMIT"]
    assert outputs["python_version"] == pin["PYTHON_VERSION"]
    series = (PATCHES / NEWEST / "series").read_text().split()
    assert outputs["upto"] == str(len([n for n in series if n.endswith(".patch")]))
    assert outputs["gpu_runner"] == "2-gpu"
    assert pin["TORCH_GIT_TAG"] in summary.read_text()


def test_ci_reads_the_pin(tmp_path: Path) -> None:
    output = tmp_path / "output"
    run(
        ["bash", "-c", step_script(CI.read_text(), "Read the pin")],
        env={"GITHUB_OUTPUT": str(output)},
    )
    pin = read_pin(PATCHES / NEWEST / "PIN")  # no matrix base given: the newest
    assert output.read_text() == f"python_version={pin['PYTHON_VERSION']}\n"


@pytest.mark.parametrize("path", [CI, NIGHTLY], ids=lambda p: p.name)
def test_workflow_hardening(path: Path) -> None:
    text = path.read_text()
    assert re.search(r"^permissions: \{\}$", text, re.M)
    assert re.search(r"^concurrency:$", text, re.M)
    uses = re.findall(r"uses: (\S+)(.*)$", text, re.M)
    assert uses
    for ref, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), ref
        assert re.fullmatch(r" # v\d+\.\d+\.\d+", comment), (ref, comment)
    checkouts = text.count("uses: actions/checkout@")
    assert text.count("persist-credentials: false") == checkouts
    for block in re.findall(r"(?ms)^\s+run: \|?\n?(.*?)(?=^\s+(?:- |\w[\w-]*:))", text):
        assert "${{" not in block, block
    for job in re.findall(
        r"(?ms)^  [\w-]+:\n    name:.*?(?=^  [\w-]+:\n    name:|\Z)", text
    ):
        assert "timeout-minutes:" in job
        assert "permissions:" in job


def test_workflows_pass_actionlint_and_zizmor() -> None:
    actionlint = REPO / "build" / "tools" / "bin" / "actionlint"
    zizmor = Path(sys.executable).parent / "zizmor"
    ran = False
    if actionlint.is_file():
        run([str(actionlint), str(CI), str(NIGHTLY)], cwd=REPO)
        ran = True
    if zizmor.is_file():
        run([str(zizmor), "--offline", "--persona", "pedantic", str(CI), str(NIGHTLY)])
        ran = True
    if not ran:
        pytest.skip(
            "neither actionlint (scripts/install_lint_tools.sh) nor zizmor is installed"
        )
