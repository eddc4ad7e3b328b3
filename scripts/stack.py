#!/usr/bin/env -S sh -c 'exec sh "${0%/*}/venv_python.sh" "$0" "$@"'
# ^ Run as `scripts/stack.py`, it runs under the newest of the repository's
# venvs, .venv/<VERSION>/bin/python3 (else python3 on PATH: venv_python.sh);
# `PY scripts/stack.py` runs under PY.
"""Toolchain core for the symmetric-memory patch series against pinned PyTorch.

Subcommands (``stack.py SUBCOMMAND --help`` lists each one's flags):

  check-torch   find the torch an interpreter would import and check it is the pin
  bases         the supported bases (patches/<VERSION>/ with PIN and series)
  base          materialize the pin as a git repo (build/<VERSION>/base, tag pin-base)
  import        git-am patches 1..N of the series onto a branch of the base repo
  export        write that branch back as a canonical, deterministic patch series
  overlay       run patched torch/*.py on the installed wheel through PYTHONPATH
  check-series  series file, subjects, bodies, applicability and whitespace
  apply-source  check a PyTorch checkout and git-am the series there (source mode)
  lint-patched  ruff on the overlay's patched files, judged against the pinned files
  upstream-tests  the GPU-tier tests of commit N of the stack, in upstream form

One series per base: patches/<VERSION>/ holds the base's PIN, its series and
its patches; build/<VERSION>/ its base repo and overlays; vendor/<VERSION>/
its vendored sources.  `--base VERSION` picks the base; without it
SYMM_STACK_BASE, else the base whose TORCH_VERSION is the release of the
interpreter's torch (--python PY, else this one), else the newest base.  The
pin is read from patches/<VERSION>/PIN (or the file named by the environment
variable SYMM_STACK_PIN_FILE).  Exit codes: 0 success, 1 a check
found problems, 2 bad input or a refusal (one line on stderr, nothing left
half-done), 3 a tool this needs is not available here.
"""

from __future__ import annotations

import argparse
import ast
import email
import email.policy
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parent.parent
# patches/<VERSION>/{PIN,series,*.patch}; SYMM_STACK_PATCHES_ROOT names another
# root (the toolchain's tests use it for a made-up second base).
PATCHES_ROOT = Path(os.environ.get("SYMM_STACK_PATCHES_ROOT") or REPO / "patches")
TOOL = "scripts/stack.py"
LAYOUT = 2  # bump when the layout of build/base or build/overlay changes
BASE_TAG = "pin-base"
BASE_BRANCH = "base"
BASE_META = ".stack-base.json"
OVERLAY_META = "OVERLAY.json"
IMPORT_RECORD = "stack-import.json"  # kept in the base repo's git dir
IDENTITY_NAME = "Symm-Mem Stack"
IDENTITY_EMAIL = "symm-mem-stack@example.invalid"
FIXED_DATE = "2025-01-01T00:00:00+00:00"
SUBJECT_PREFIX = "[inductor] "
PY_PATTERN = "torch/*.py"  # git apply's --include wildmatch: '*' crosses '/'
HEADER_SUFFIXES = (".h", ".hpp", ".cuh")
PIN_KEYS = (
    "TORCH_VERSION",
    "TORCH_GIT_TAG",
    "TORCH_GIT_COMMIT",
    "TORCH_WHEEL",
    "PYTHON_VERSION",
    "SERIES_LENGTH",
)
IN_PROGRESS = ("rebase-apply", "rebase-merge", "MERGE_HEAD", "CHERRY_PICK_HEAD")
RUFF_SELECT = "E,W,F,B,UP,C4,PIE,SIM"
RUFF_TARGET = "py310"  # the oldest Python the pinned PyTorch supports


class StackError(Exception):
    """A refusal or bad input: reported as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def log(message: str) -> None:
    print(f"[stack] {message}", file=sys.stderr, flush=True)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -------- bases and pin --------

# The base every subcommand works on, set by main() (resolve_base).
BASE = ""


def version_key(version: str) -> tuple[int, ...]:
    "2.14.1 -> (2, 14, 1): bases compare as version tuples"
    return tuple(int(n) for n in re.findall(r"\d+", version))


def known_bases() -> list[str]:
    "Every patches/<VERSION>/ with a PIN, oldest first (series or not)"
    if not PATCHES_ROOT.is_dir():
        return []
    found = [d.name for d in PATCHES_ROOT.iterdir() if (d / "PIN").is_file()]
    return sorted(found, key=version_key)


def supported_bases() -> list[str]:
    "The bases with a PIN and a series file, oldest first"
    return [b for b in known_bases() if (PATCHES_ROOT / b / "series").is_file()]


def bases_line() -> str:
    "'2.11.0, 2.14.1' plus the bases without a series yet, for one-line refusals"
    line = ", ".join(supported_bases()) or "none"
    pending = [b for b in known_bases() if b not in supported_bases()]
    return line + (f" (no series yet: {' '.join(pending)})" if pending else "")


def release_of(version: str) -> str:
    "'2.11.0+cu130' and '2.11.0a0+git70d99e9' -> '2.11.0'"
    match = re.match(r"\d+\.\d+\.\d+", version)
    return match.group(0) if match else version


def base_of_torch(python: str) -> str:
    "The supported base whose TORCH_VERSION is the release of PY's torch"
    try:
        torch = find_torch(python)
    except StackError as err:
        raise StackError(f"{err}; supported bases: {bases_line()}") from None
    release = release_of(torch.version)
    if release not in supported_bases():
        raise StackError(
            f"torch {torch.version} (installed for {python}) is not a supported base; "
            f"supported: {bases_line()}"
        )
    return release


def resolve_base(args: argparse.Namespace) -> str:
    """--base, else SYMM_STACK_BASE, else the base of the interpreter's torch
    (when supported), else the newest supported base.  --base may name a base
    whose series is not written yet (a PIN only): base, import and export
    are how it gets one."""
    asked = getattr(args, "base", None) or os.environ.get("SYMM_STACK_BASE")
    if asked:
        if asked not in known_bases():
            how = "--base" if getattr(args, "base", None) else "SYMM_STACK_BASE"
            raise StackError(
                f"{how} {asked} is not a supported base; supported: {bases_line()}"
            )
        return asked
    supported = supported_bases()
    if not supported:
        raise StackError(
            f"no supported base in {PATCHES_ROOT}; needs <VERSION>/ with PIN and "
            "series, or --base naming a directory with a PIN"
        )
    try:
        python = getattr(args, "python", sys.executable)
        release = release_of(find_torch(python).version)
    except StackError:
        release = ""
    return release if release in supported else supported[-1]


def pin_path() -> Path:
    override = os.environ.get("SYMM_STACK_PIN_FILE")
    return Path(override) if override else PATCHES_ROOT / BASE / "PIN"


def load_pin() -> dict[str, str]:
    path = pin_path()
    try:
        text = path.read_text()
    except OSError as err:
        raise StackError(
            f"cannot read pin file {path} ({err.strerror}); needs KEY=VALUE lines"
        ) from None
    pin: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            raise StackError(f"{path}:{number}: found {raw!r}; needs KEY=VALUE")
        pin[key] = value
    missing = [key for key in PIN_KEYS if key not in pin]
    if missing:
        raise StackError(f"{path} lacks {', '.join(missing)}; needs all of {PIN_KEYS}")
    if not pin["SERIES_LENGTH"].isdigit():
        raise StackError(
            f"{path}: SERIES_LENGTH is {pin['SERIES_LENGTH']!r}; needs a number"
        )
    if not os.environ.get("SYMM_STACK_PIN_FILE") and pin["TORCH_VERSION"] != BASE:
        raise StackError(
            f"{path}: TORCH_VERSION is {pin['TORCH_VERSION']}; needs {BASE}, "
            "its directory's name"
        )
    return pin


# -------- git --------


def git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A controlled environment: no user or system config, fixed identity, C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL="/dev/null",
        GIT_AUTHOR_NAME=IDENTITY_NAME,
        GIT_AUTHOR_EMAIL=IDENTITY_EMAIL,
        GIT_COMMITTER_NAME=IDENTITY_NAME,
        GIT_COMMITTER_EMAIL=IDENTITY_EMAIL,
        GIT_TERMINAL_PROMPT="0",
        GIT_PAGER="cat",
        LC_ALL="C",
        LANGUAGE="C",
    )
    if extra:
        env.update(extra)
    return env


def fixed_dates() -> dict[str, str]:
    return {"GIT_AUTHOR_DATE": FIXED_DATE, "GIT_COMMITTER_DATE": FIXED_DATE}


def git(
    args: Sequence[str],
    cwd: Path,
    *,
    check: bool = True,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["git", "-c", "core.hooksPath=/dev/null", "-c", "advice.detachedHead=false"]
        + list(args),
        cwd=cwd,
        env=git_env(env),
        input=stdin,
        text=True,
        capture_output=True,
    )
    if check and proc.returncode != 0:
        raise StackError(
            f"git {' '.join(args[:2])} failed in {cwd}: "
            f"{last_line(proc.stderr + proc.stdout)}",
            code=1,
        )
    return proc


def is_git_repo(path: Path) -> bool:
    if not path.is_dir():
        return False
    proc = git(["rev-parse", "--show-toplevel"], path, check=False)
    return (
        proc.returncode == 0 and Path(proc.stdout.strip()).resolve() == path.resolve()
    )


def rev_parse(repo: Path, rev: str) -> str | None:
    proc = git(["rev-parse", "-q", "--verify", f"{rev}^{{commit}}"], repo, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def branch_exists(repo: Path, branch: str) -> bool:
    return rev_parse(repo, f"refs/heads/{branch}") is not None


def current_ref(repo: Path) -> str:
    proc = git(["symbolic-ref", "-q", "--short", "HEAD"], repo, check=False)
    if proc.returncode == 0:
        return proc.stdout.strip()
    return git(["rev-parse", "HEAD"], repo).stdout.strip()


def git_path(repo: Path, name: str) -> Path:
    path = Path(git(["rev-parse", "--git-path", name], repo).stdout.strip())
    return path if path.is_absolute() else repo / path


def operation_in_progress(repo: Path) -> str | None:
    for name in IN_PROGRESS:
        if git_path(repo, name).exists():
            return name
    return None


def dirty_files(repo: Path) -> list[str]:
    out = git(["status", "--porcelain", "--untracked-files=no"], repo).stdout
    return [line[3:] for line in out.splitlines() if line.strip()]


def tracked_files(repo: Path, rev: str = "HEAD") -> set[str]:
    out = git(["ls-tree", "-r", "--name-only", "-z", rev], repo).stdout
    return {name for name in out.split("\0") if name}


# -------- series --------


@dataclass(frozen=True)
class Patch:
    number: int
    name: str
    path: Path


@dataclass(frozen=True)
class HunkInfo:
    index: int
    count: int
    header: str
    source_start: int
    first_line: int
    last_line: int

    def describe(self) -> str:
        return f"hunk {self.index}/{self.count} {self.header}"


@dataclass(frozen=True)
class FileChange:
    source: str | None  # None: the patch adds the file
    target: str | None  # None: the patch deletes the file
    hunks: tuple[HunkInfo, ...]

    @property
    def path(self) -> str:
        return self.target or self.source or "?"

    def names(self) -> set[str]:
        return {name for name in (self.source, self.target) if name}


def series_names(series_dir: Path) -> list[str]:
    """The patch names `series` lists; none while no patch exists yet."""
    series = series_dir / "series"
    if not series.is_file():
        if series_dir.is_dir() and any(series_dir.glob("*.patch")):
            raise StackError(
                f"{series_dir} has patches but no series file; "
                "needs `series` listing them, one name per line"
            )
        return []
    names = []
    for raw in series.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            names.append(line)
    return names


def load_series(series_dir: Path, upto: int | None) -> list[Patch]:
    series = series_dir / "series"
    names = series_names(series_dir)
    for name, count in Counter(names).items():
        if count > 1:
            raise StackError(f"{series} lists {name} {count} times; needs each once")
    for name in names:
        if not (series_dir / name).is_file():
            raise StackError(f"{series} lists {name}, which is not in {series_dir}")
    if upto is None:
        upto = len(names)
    if not 0 <= upto <= len(names):
        raise StackError(
            f"--upto {upto}: the series in {series_dir} has {len(names)} patch(es); "
            f"needs a number 0..{len(names)}"
        )
    return [
        Patch(i + 1, name, series_dir / name) for i, name in enumerate(names[:upto])
    ]


def _strip_prefix(name: str) -> str | None:
    if name == "/dev/null":
        return None
    return name[2:] if name.startswith(("a/", "b/")) else name


def file_changes(patch: Patch) -> list[FileChange]:
    """The files and hunks of one patch, as unidiff reads them."""
    try:
        from unidiff import PatchSet
        from unidiff.errors import UnidiffParseError
    except ImportError:
        raise StackError(
            f"python module unidiff is missing for {sys.executable}, the interpreter "
            "running stack.py; needs `PY -m pip install -r requirements-dev.txt` "
            "there, or stack.py run by .venv/<VERSION>/bin/python (which "
            "scripts/apply_and_build.sh makes)",
            code=3,
        ) from None
    try:
        patchset = PatchSet(patch.path.read_text(encoding="utf-8"))
    except (UnidiffParseError, UnicodeDecodeError) as err:
        raise StackError(f"{patch.name} is not a readable diff ({err})") from None
    changes = []
    for pfile in patchset:
        hunks = []
        for i, hunk in enumerate(pfile):
            header = (
                f"@@ -{hunk.source_start},{hunk.source_length} "
                f"+{hunk.target_start},{hunk.target_length} @@"
            )
            if hunk.section_header:
                header += f" {hunk.section_header.strip()}"
            numbers = [line.diff_line_no for line in hunk]
            hunks.append(
                HunkInfo(
                    index=i + 1,
                    count=len(pfile),
                    header=header,
                    source_start=hunk.source_start,
                    first_line=min(numbers, default=0) - 1,
                    last_line=max(numbers, default=0),
                )
            )
        changes.append(
            FileChange(
                source=None
                if pfile.is_added_file
                else _strip_prefix(pfile.source_file),
                target=None
                if pfile.is_removed_file
                else _strip_prefix(pfile.target_file),
                hunks=tuple(hunks),
            )
        )
    return changes


_FAILED_AT = re.compile(r"^error: patch failed: (?P<file>.+):(?P<line>\d+)$", re.M)
_FILE_ERROR = re.compile(
    r"^error: (?P<file>.+?): (?P<why>does not exist in index|"
    r"No such file or directory|already exists in (?:index|working directory)|"
    r"does not match index|wrong type|patch does not apply)$",
    re.M,
)
_WHITESPACE = re.compile(
    r"^(?P<patch>.+?):(?P<line>\d+): (?P<why>[a-z][a-z ]+)\.$", re.M
)


def explain_failure(patch: Patch, output: str) -> str:
    """Name the file and hunk that git apply (or git am) stopped at."""
    changes = file_changes(patch)

    def change_for(name: str) -> FileChange | None:
        return next((c for c in changes if name in c.names()), None)

    match = _FAILED_AT.search(output)
    if match:
        name, line = match["file"], int(match["line"])
        change = change_for(name)
        if change and change.hunks:
            hunk = min(change.hunks, key=lambda h: abs(h.source_start - line))
            return f"{patch.name}: {name} {hunk.describe()} does not apply"
        return f"{patch.name}: {name} (line {line}) does not apply"
    match = _WHITESPACE.search(output)
    if match:
        line = int(match["line"])
        for change in changes:
            for hunk in change.hunks:
                if hunk.first_line <= line <= hunk.last_line:
                    return (
                        f"{patch.name}: {change.path} {hunk.describe()}: "
                        f"{match['why']} (patch line {line})"
                    )
        return f"{patch.name}: {match['why']} (patch line {line})"
    match = _FILE_ERROR.search(output)
    if match:
        name = match["file"]
        change = change_for(name)
        count = len(change.hunks) if change else 0
        return f"{patch.name}: {name}: {match['why']} ({count} hunk(s))"
    return f"{patch.name}: {last_line(output)}"


# -------- torch --------


@dataclass(frozen=True)
class Torch:
    python: str
    dir: Path
    version: str
    git: str


_FIND_TORCH = """
import importlib.util, os, sys
def _overlay(p):
    return os.path.isfile(os.path.join(p or os.getcwd(), "OVERLAY.json"))
sys.path[:] = [p for p in sys.path if p != "" and not _overlay(p)]
spec = importlib.util.find_spec("torch")
print(spec.origin if spec is not None and spec.origin else "")
"""


def find_torch(python: str) -> Torch:
    """Locate torch for `python` without importing it, ignoring any overlay."""
    try:
        proc = subprocess.run(
            [python, "-c", _FIND_TORCH], text=True, capture_output=True, timeout=120
        )
    except FileNotFoundError:
        raise StackError(f"interpreter {python!r} not found; needs a Python") from None
    if proc.returncode != 0:
        raise StackError(f"{python} could not look for torch: {last_line(proc.stderr)}")
    origin = proc.stdout.strip()
    if not origin:
        raise StackError(f"no torch found for {python}; needs torch installed")
    torch_dir = Path(origin).parent
    try:
        text = (torch_dir / "version.py").read_text()
    except OSError:
        raise StackError(
            f"torch at {torch_dir} has no version.py; needs a torch wheel install"
        ) from None
    fields = dict(
        re.findall(r"^(__version__|git_version)\s*=\s*['\"]([^'\"]*)['\"]", text, re.M)
    )
    return Torch(
        python=python,
        dir=torch_dir,
        version=fields.get("__version__", "?"),
        git=fields.get("git_version", "?"),
    )


def check_torch(python: str, pin: dict[str, str]) -> Torch:
    torch = find_torch(python)
    if torch.git != pin["TORCH_GIT_COMMIT"]:
        raise StackError(
            f"wrong torch for {python}: found torch {torch.version} (git {torch.git}) "
            f"at {torch.dir}; needs {pin['TORCH_WHEEL']} built from "
            f"{pin['TORCH_GIT_TAG']} ({pin['TORCH_GIT_COMMIT']})"
        )
    return torch


def cmd_bases(args: argparse.Namespace) -> int:
    if args.installed:
        print(base_of_torch(args.python))
        return 0
    bases = supported_bases()
    if not bases:
        raise StackError(f"no supported base in {PATCHES_ROOT}")
    for base in bases[-1:] if args.newest else bases:
        print(base)
    return 0


def cmd_check_torch(args: argparse.Namespace) -> int:
    torch = check_torch(args.python, load_pin())
    log(f"torch {torch.version} (git {torch.git[:12]}) for {args.python}: the pin")
    print(torch.dir)
    return 0


# -------- base --------


def vendor_root() -> Path:
    "vendor/<VERSION>/pytorch: the base's own vendored sources (may not exist)"
    return REPO / "vendor" / BASE / "pytorch"


def vendor_files() -> list[tuple[str, Path]]:
    root = vendor_root()
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("README"):  # the vendor directory's own notes
            continue
        if path.is_file() and "__pycache__" not in path.parts:
            found.append((rel, path))
    return found


def base_wanted(pin: dict[str, str], torch: Torch) -> dict[str, Any]:
    digest = hashlib.sha256()
    for rel, path in vendor_files():
        digest.update(f"{rel}\0{sha256_file(path)}\n".encode())
    return {
        "layout": LAYOUT,
        "torch_git_tag": pin["TORCH_GIT_TAG"],
        "torch_git_commit": pin["TORCH_GIT_COMMIT"],
        "torch_wheel": pin["TORCH_WHEEL"],
        "torch_version": torch.version,
        "vendor_sha256": digest.hexdigest(),
    }


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(0o644)


def _walk_files(root: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if keep(rel):
                yield rel, path


def populate_base(tree: Path, torch: Torch) -> tuple[int, int, int]:
    n_py = n_h = 0
    for rel, path in _walk_files(
        torch.dir, lambda r: r.endswith(".py") and not r.startswith("include/")
    ):
        _copy(path, tree / "torch" / rel)
        n_py += 1
    headers = torch.dir / "include" / "torch" / "csrc"
    if headers.is_dir():
        for rel, path in _walk_files(headers, lambda r: r.endswith(HEADER_SUFFIXES)):
            _copy(path, tree / "torch" / "csrc" / rel)
            n_h += 1
    vendored = vendor_files()
    for rel, path in vendored:
        _copy(path, tree / rel)
    return n_py, n_h, len(vendored)


def branches_with_work(base: Path) -> list[str]:
    refs = git(["for-each-ref", "--format=%(refname:short)", "refs/heads"], base).stdout
    work = []
    for branch in refs.split():
        if branch == BASE_BRANCH:
            continue
        count = git(["rev-list", "--count", f"{BASE_TAG}..{branch}"], base, check=False)
        if count.returncode != 0 or count.stdout.strip() != "0":
            work.append(branch)
    return work


def remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def cmd_base(args: argparse.Namespace) -> int:
    pin = load_pin()
    torch = check_torch(args.python, pin)
    out: Path = args.out.absolute()
    want = base_wanted(pin, torch)
    if out.exists() or out.is_symlink():
        meta = read_json(out / BASE_META)
        ours = meta is not None and meta.get("tool") == TOOL
        if not ours and not args.force:
            raise StackError(
                f"{out} exists and is not a base made by {TOOL} (no {BASE_META}); "
                "needs a free path, or --force to replace it"
            )
        sha = rev_parse(out, f"refs/tags/{BASE_TAG}") if ours else None
        if ours and meta and meta.get("wanted") == want and sha and not args.force:
            log(f"base at {out} is up to date ({BASE_TAG} = {sha[:12]})")
            print(sha)
            return 0
        if ours and meta and not args.force:
            busy = branches_with_work(out) if sha else []
            dirty = dirty_files(out) if sha else []
            if busy or dirty:
                held = ", ".join(busy + [f"uncommitted {d}" for d in dirty][:5])
                raise StackError(
                    f"base at {out} is stale (made for {meta.get('wanted')}) and holds "
                    f"work ({held}); export it, then rerun with --force to rebuild"
                )
            log(f"base at {out} is stale; rebuilding")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        start = time.monotonic()
        log(f"copying torch {torch.version} from {torch.dir}")
        n_py, n_h, n_v = populate_base(tmp, torch)
        log(f"{n_py} Python files, {n_h} headers, {n_v} vendored file(s); committing")
        git(["init", "-q", "-b", BASE_BRANCH], tmp)
        git(["add", "-A"], tmp)
        message = (
            f"PyTorch {pin['TORCH_GIT_TAG']} ({pin['TORCH_GIT_COMMIT']}) base, "
            f"from the {pin['TORCH_WHEEL']} wheel\n\n"
            f"Made by {TOOL} base: torch/**/*.py and the torch/csrc headers of\n"
            f"the wheel, plus everything under vendor/{BASE}/pytorch/.\n"
        )
        git(
            ["-c", "core.looseCompression=1", "commit", "-q", "--no-verify", "-F", "-"],
            tmp,
            env=fixed_dates(),
            stdin=message,
        )
        git(["tag", BASE_TAG], tmp)
        sha = git(["rev-parse", "HEAD"], tmp).stdout.strip()
        meta = {
            "tool": TOOL,
            "wanted": want,
            "source": {"python": torch.python, "torch_dir": str(torch.dir)},
            "commit": sha,
        }
        (tmp / BASE_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        with git_path(tmp, "info/exclude").open("a") as exclude:
            exclude.write(f"/{BASE_META}\n")
        if out.exists() or out.is_symlink():
            remove_path(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"base at {out}: {BASE_TAG} = {sha[:12]} ({time.monotonic() - start:.1f} s)")
    print(sha)
    return 0


def require_base(base: Path) -> str:
    sha = rev_parse(base, f"refs/tags/{BASE_TAG}") if is_git_repo(base) else None
    if sha is None:
        raise StackError(
            f"{base} is not a base repo with tag {BASE_TAG}; "
            f"needs `{TOOL} base --out {base}` first"
        )
    return sha


# -------- am --------


@dataclass(frozen=True)
class Exclusion:
    patch: str
    file: str
    hunks: int


def missing_files(repo: Path, patch: Patch) -> list[Exclusion]:
    present = tracked_files(repo)
    return [
        Exclusion(patch.name, change.source, len(change.hunks))
        for change in file_changes(patch)
        if change.source is not None and change.source not in present
    ]


def am_one(repo: Path, patch: Patch, exclusions: Sequence[Exclusion]) -> None:
    """git am one patch; on failure abort it and raise naming patch, file, hunk."""
    args = ["am", "--keep-non-patch", "--committer-date-is-author-date"]
    args += [f"--exclude={e.file}" for e in exclusions]
    proc = git([*args, str(patch.path.resolve())], repo, check=False)
    if proc.returncode != 0:
        git(["am", "--abort"], repo, check=False)
        raise StackError(
            f"patch {patch.number} does not apply: "
            f"{explain_failure(patch, proc.stdout + proc.stderr)}"
        )


def report_exclusions(exclusions: Sequence[Exclusion]) -> None:
    for e in exclusions:
        log(
            f"{e.patch}: excluded {e.file} ({e.hunks} hunk(s)): "
            "file not in the wheel-derived base "
            f"(vendor it under vendor/{BASE}/pytorch/)"
        )


def make_branch(
    repo: Path,
    start: str,
    branch: str,
    patches: Sequence[Patch],
    *,
    force: bool,
    exclude_missing: bool,
) -> list[Exclusion]:
    """Apply `patches` on `start` and point `branch` there; all or nothing."""
    check_checkout(repo, branch, force=force)
    original = current_ref(repo)
    git(["checkout", "-q", "--detach", start], repo)
    excluded: list[Exclusion] = []
    try:
        for patch in patches:
            skip = missing_files(repo, patch) if exclude_missing else []
            report_exclusions(skip)
            log(f"applying {patch.name}")
            am_one(repo, patch, skip)
            excluded += skip
    except BaseException:
        if operation_in_progress(repo):
            git(["am", "--abort"], repo, check=False)
        git(["checkout", "-q", original], repo, check=False)
        raise
    git(["checkout", "-q", "-B", branch], repo)
    return excluded


def check_checkout(repo: Path, branch: str, *, force: bool) -> None:
    """Refuse a checkout that `make_branch` must not touch."""
    if branch_exists(repo, branch) and not force:
        raise StackError(
            f"branch {branch} already exists in {repo}; needs --force to replace it"
        )
    state = operation_in_progress(repo)
    if state:
        raise StackError(
            f"half-applied: {repo} has a git operation in progress ({state}); "
            "needs `git am --abort` (or rebase/merge --abort) there first"
        )
    dirty = dirty_files(repo)
    if dirty:
        raise StackError(
            f"{repo} has uncommitted changes to {', '.join(dirty[:10])}; "
            "needs a clean checkout (commit or stash them)"
        )


def import_record(base: Path) -> Path:
    return git_path(base, IMPORT_RECORD)


def cmd_import(args: argparse.Namespace) -> int:
    base: Path = args.base_dir.absolute()
    start = require_base(base)
    patches = load_series(args.series_dir, args.upto)
    wheel_base = (base / BASE_META).is_file()
    excluded = make_branch(
        base, start, args.branch, patches, force=args.force, exclude_missing=wheel_base
    )
    record_path = import_record(base)
    record = read_json(record_path) or {}
    record[args.branch] = {
        "patches": [p.name for p in patches],
        "excluded": [asdict(e) for e in excluded],
    }
    record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    log(f"branch {args.branch} in {base}: {len(patches)} patch(es) on {BASE_TAG}")
    if excluded:
        hunks = sum(e.hunks for e in excluded)
        log(
            f"NOTE: {hunks} hunk(s) in {len(excluded)} file(s) were excluded (above); "
            f"`export` of {args.branch} is refused until those files are vendored"
        )
    return 0


# -------- export --------


def message_problems(subject: str, body: str) -> list[str]:
    "What a patch's subject (without '[PATCH n/M] ') and body lack"
    problems = []
    if not subject.startswith(SUBJECT_PREFIX):
        problems.append(f"Subject {subject!r} does not start with {SUBJECT_PREFIX!r}")
    for section in ("Summary:", "Test Plan:"):
        if not re.search(rf"^{section}", body, re.M):
            problems.append(f"message has no {section!r} section")
    return problems


def check_message(commit: str, message: str) -> list[str]:
    lines = message.splitlines()
    subject = lines[0] if lines else ""
    body = "\n".join(lines[1:])
    return [f"commit {commit[:12]}: {p}" for p in message_problems(subject, body)]


def canonical_patches(
    repo: Path, start: str, head: str, out: Path, check_messages: bool = True
) -> list[str]:
    """Write start..head as canonical patches into `out`; return their names.

    `check_messages=False` leaves the commit messages unchecked (check-series
    reports them per patch with check_headers)."""
    commits = git(["rev-list", "--reverse", f"{start}..{head}"], repo).stdout.split()
    merges = git(["rev-list", "--merges", f"{start}..{head}"], repo).stdout.split()
    if merges:
        raise StackError(
            f"{head} has merge commit {merges[0][:12]}; needs a linear history"
        )
    if git(["merge-base", "--is-ancestor", start, head], repo, check=False).returncode:
        raise StackError(
            f"{head} does not descend from {BASE_TAG}; needs a branch of it"
        )
    if not commits:
        raise StackError(f"no commits between {BASE_TAG} and {head}; nothing to export")
    messages = []
    problems = []
    for commit in commits:
        message = git(["log", "-1", "--format=%B", commit], repo).stdout.rstrip() + "\n"
        if check_messages:
            problems += check_message(commit, message)
        messages.append(message)
    if problems:
        raise StackError("; ".join(problems))
    parent = start
    for commit, message in zip(commits, messages, strict=True):
        tree = git(["rev-parse", f"{commit}^{{tree}}"], repo).stdout.strip()
        parent = git(
            ["commit-tree", tree, "-p", parent], repo, env=fixed_dates(), stdin=message
        ).stdout.strip()
    made = git(
        [
            "format-patch",
            "--zero-commit",
            "--no-signature",
            "--full-index",
            "--numbered",
            "--subject-prefix=PATCH",
            "--no-renames",
            "-o",
            str(out),
            f"{start}..{parent}",
        ],
        repo,
    ).stdout.split()
    return [Path(name).name for name in made]


def write_series(directory: Path, names: Sequence[str], pin: dict[str, str]) -> None:
    header = (
        f"# Patch series against PyTorch {pin['TORCH_GIT_TAG']} "
        f"({pin['TORCH_GIT_COMMIT']}), applied in this order.\n"
        f"# Written by `{TOOL} export`; edit the patches through import/export.\n"
    )
    (directory / "series").write_text(header + "".join(f"{n}\n" for n in names))


def replace_dir(new: Path, out: Path) -> None:
    """Swap `new` into place at `out`; the old contents go only once it is there."""
    if not out.exists():
        os.rename(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


def cmd_export(args: argparse.Namespace) -> int:
    pin = load_pin()
    base: Path = args.base_dir.absolute()
    start = require_base(base)
    if not branch_exists(base, args.branch):
        raise StackError(
            f"no branch {args.branch} in {base}; needs `{TOOL} import` first"
        )
    record = (read_json(import_record(base)) or {}).get(args.branch) or {}
    excluded = record.get("excluded") or []
    if excluded:
        files = ", ".join(sorted({e["file"] for e in excluded}))
        raise StackError(
            f"branch {args.branch} was imported without hunks for {files} (not in the "
            "wheel-derived base); exporting would drop them: vendor those files under "
            f"vendor/{BASE}/pytorch/, rebuild the base with --force and import again"
        )
    out: Path = args.out.absolute()
    if out.exists() and not out.is_dir():
        raise StackError(f"--out {out} is not a directory; needs a patches directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        names = canonical_patches(base, start, f"refs/heads/{args.branch}", tmp)
        write_series(tmp, names, pin)
        stale: list[str] = []
        if out.is_dir():
            for entry in sorted(out.iterdir()):
                if entry.name.endswith(".patch") and entry.name not in names:
                    stale.append(entry.name)
                elif not entry.name.endswith(".patch") and entry.name != "series":
                    if entry.is_dir():
                        shutil.copytree(entry, tmp / entry.name, symlinks=True)
                    else:
                        shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
        tmp.chmod(0o755)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {len(names)} patch(es) from {args.branch} to {out}")
    for name in stale:
        log(f"removed stale {name}")
    return 0


# -------- overlay --------


def is_python_source(path: str) -> bool:
    return path.startswith("torch/") and path.endswith(".py")


def _holds_python(src: str) -> set[str]:
    """Directories under `src` with Python source somewhere beneath them."""
    holding: set[str] = set()
    for dirpath, _dirs, filenames in os.walk(src, topdown=False):
        if any(n.endswith(".py") for n in filenames) or any(
            os.path.join(dirpath, d) in holding for d in _dirs
        ):
            holding.add(dirpath)
    return holding


def mirror_tree(src: Path, dst: Path) -> int:
    """Mirror `src` at `dst`: real directories, files as symlinks to `src`.

    A directory with no Python source beneath it (include/, lib/, share/ ...)
    is one symlink to the installed directory: Python never writes there, and
    it saves thousands of links.  __pycache__ stays a real directory of links,
    so Python can replace a cached file without touching the installed one.
    """
    holding = _holds_python(str(src))
    count = 0
    for dirpath, dirnames, filenames in os.walk(src):
        target = os.path.normpath(os.path.join(dst, os.path.relpath(dirpath, src)))
        os.mkdir(target)
        for name in list(dirnames):
            full = os.path.join(dirpath, name)
            if name == "__pycache__":
                continue
            if os.path.islink(full) or full not in holding:
                dirnames.remove(name)
                filenames.append(name)
        for name in filenames:
            os.symlink(os.path.join(dirpath, name), os.path.join(target, name))
            count += 1
    return count


def expand_links(tree: Path, rel: str) -> None:
    """Make every directory on the way to `rel` real, so nothing writes through."""
    path = tree
    for part in Path(rel).parent.parts:
        path = path / part
        if path.is_symlink() and path.is_dir():
            source = path.resolve()
            path.unlink()
            path.mkdir()
            for child in sorted(source.iterdir()):
                os.symlink(child, path / child.name)


def materialize(tree: Path, rel: str) -> None:
    """Turn the symlink for `rel` into a real copy and drop its cached bytecode."""
    expand_links(tree, rel)
    path = tree / rel
    if path.is_symlink():
        content = path.read_bytes()
        path.unlink()
        path.write_bytes(content)
        path.chmod(0o644)
    cache = path.parent / "__pycache__"
    if cache.is_dir():
        for pyc in cache.glob(f"{path.stem}.*.pyc"):
            pyc.unlink()


def overlay_wanted(torch: Torch, patches: Sequence[Patch]) -> dict[str, Any]:
    return {
        "layout": LAYOUT,
        "upto": len(patches),
        "patches": [p.name for p in patches],
        "sha256": {p.name: sha256_file(p.path) for p in patches},
        "torch_dir": str(torch.dir),
        "torch_git": torch.git,
        "torch_version": torch.version,
    }


def overlay_current(target: Path, want: dict[str, Any]) -> bool:
    meta = read_json(target / OVERLAY_META)
    if meta is None or {k: meta.get(k) for k in want} != want:
        return False
    for rel, digest in (meta.get("files") or {}).items():
        path = target / rel
        if digest is None:
            if path.exists() or path.is_symlink():
                return False
        elif path.is_symlink() or not path.is_file() or sha256_file(path) != digest:
            return False
    return True


def build_overlay(
    out: Path, torch: Torch, patches: Sequence[Patch], want: dict[str, Any]
) -> Path:
    target = out / str(len(patches))
    start = time.monotonic()
    made_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{len(patches)}.tmp-", dir=out))
    try:
        links = mirror_tree(torch.dir, tmp / "torch")
        touched: set[str] = set()
        for patch in patches:
            for change in file_changes(patch):
                touched |= {n for n in change.names() if is_python_source(n)}
        for rel in sorted(touched):
            materialize(tmp, rel)
        # Outside any repository: stop git's discovery at the overlay directory.
        ceiling = {"GIT_CEILING_DIRECTORIES": str(out.resolve())}
        for patch in patches:
            proc = git(
                ["apply", f"--include={PY_PATTERN}", str(patch.path.resolve())],
                tmp,
                check=False,
                env=ceiling,
            )
            if proc.returncode != 0:
                raise StackError(
                    f"patch {patch.number} does not apply to the installed torch: "
                    f"{explain_failure(patch, proc.stdout + proc.stderr)}; "
                    f"no overlay written"
                )
        files: dict[str, str | None] = {}
        for rel in sorted(touched):
            path = tmp / rel
            files[rel] = sha256_file(path) if path.is_file() else None
        meta = dict(want, files=files)
        (tmp / OVERLAY_META).write_text(
            json.dumps(meta, indent=2, sort_keys=True) + "\n"
        )
        tmp.chmod(0o755)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_out and not any(out.iterdir()):
            out.rmdir()
        raise
    log(
        f"overlay {target}: {len(patches)} patch(es), {len(touched)} patched file(s), "
        f"{links} links to {torch.dir} ({time.monotonic() - start:.1f} s)"
    )
    return target


def remove_overlays(out: Path, upto: int | None) -> None:
    if upto is not None:
        targets = [out / str(upto)]
    elif out.is_dir():
        targets = sorted(p for p in out.iterdir() if p.is_dir() and not p.is_symlink())
    else:
        targets = []
    removed = 0
    for target in targets:
        stray = target.name.startswith(".") and ".tmp-" in target.name
        if not target.exists():
            continue
        if not stray and not (target / OVERLAY_META).is_file():
            raise StackError(
                f"{target} has no {OVERLAY_META}; not an overlay, so not removing it"
            )
        shutil.rmtree(target)
        removed += 1
        log(f"removed {target}")
    if removed == 0:
        log(f"no overlay to remove under {out}")
    if upto is None and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def ensure_overlay(args: argparse.Namespace) -> tuple[Path | None, list[Patch]]:
    pin = load_pin()
    patches = load_series(args.series_dir, args.upto)
    torch = check_torch(args.python, pin)
    if not patches:
        log("level 0 is the stock pin: no overlay needed")
        return None, patches
    out: Path = args.out.absolute()
    target = out / str(len(patches))
    want = overlay_wanted(torch, patches)
    if target.exists() and not (target / OVERLAY_META).is_file():
        raise StackError(
            f"{target} exists and is not an overlay (no {OVERLAY_META}); "
            "needs it moved away"
        )
    if overlay_current(target, want):
        log(f"overlay {target} is up to date")
        return target, patches
    return build_overlay(out, torch, patches, want), patches


def cmd_overlay(args: argparse.Namespace) -> int:
    if args.remove:
        remove_overlays(args.out.absolute(), args.upto)
        return 0
    target, patches = ensure_overlay(args)
    if args.print_env:
        if target is not None:
            where = shlex.quote(str(target))
            print(f"export PYTHONPATH={where}${{PYTHONPATH:+:$PYTHONPATH}}")
        print(f"export SYMM_STACK_LEVEL={len(patches)}")
    elif target is not None:
        print(target)
    return 0


# -------- lint --------


def ruff_command() -> list[str]:
    beside = Path(sys.executable).parent / "ruff"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("ruff")
    if found:
        return [found]
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    raise StackError("ruff is not installed for this interpreter or on PATH", code=3)


def ruff_codes(ruff: list[str], path: Path) -> tuple[Counter[str], list[str]]:
    proc = subprocess.run(
        ruff
        + ["check", "--isolated", "--no-cache", "--output-format", "json"]
        + ["--select", RUFF_SELECT, "--ignore", "E501"]
        + ["--target-version", RUFF_TARGET, str(path)],
        text=True,
        capture_output=True,
    )
    if proc.returncode not in (0, 1):
        raise StackError(f"ruff failed on {path}: {last_line(proc.stderr)}", code=1)
    found = json.loads(proc.stdout or "[]")
    codes: Counter[str] = Counter(str(d.get("code")) for d in found)
    lines = [f"{d['location']['row']}: {d.get('code')} {d['message']}" for d in found]
    return codes, lines


def ruff_format_diff(ruff: list[str], path: Path) -> str:
    """What `ruff format` would change, as a diff ('' when formatted)."""
    proc = subprocess.run(
        [*ruff, "format", "--isolated", "--no-cache", "--diff"]
        + ["--target-version", RUFF_TARGET, str(path)],
        text=True,
        capture_output=True,
    )
    if proc.returncode not in (0, 1):
        raise StackError(f"ruff format failed on {path}: {last_line(proc.stderr)}", 1)
    return proc.stdout


def hunk_count(diff: str) -> int:
    return sum(1 for line in diff.splitlines() if line.startswith("@@"))


def cmd_lint_patched(args: argparse.Namespace) -> int:
    ruff = ruff_command()
    target, _ = ensure_overlay(args)
    if target is None:
        log("no patches: nothing to lint")
        return 0
    meta = read_json(target / OVERLAY_META) or {}
    torch_dir = Path(meta["torch_dir"])
    failures = 0
    for rel, digest in sorted((meta.get("files") or {}).items()):
        if digest is None:
            continue
        patched = target / rel
        original = torch_dir / rel.removeprefix("torch/")
        before: Counter[str] = Counter()
        before_hunks = 0
        if original.is_file():
            before, _ = ruff_codes(ruff, original)
            before_hunks = hunk_count(ruff_format_diff(ruff, original))
        after, lines = ruff_codes(ruff, patched)
        after_diff = ruff_format_diff(ruff, patched)
        after_hunks = hunk_count(after_diff)
        worse = {code: n for code, n in after.items() if n > before.get(code, 0)}
        if worse:
            failures += 1
            log(f"FAIL {rel}: new ruff diagnostics {worse}, pinned: {dict(before)}")
            for line in lines:
                if line.split()[1] in worse:
                    print(f"  {rel}:{line}", file=sys.stderr)
        if after_hunks > before_hunks:
            failures += 1
            log(
                f"FAIL {rel}: `ruff format` would change {after_hunks} hunk(s), "
                f"{before_hunks} in the pinned file"
            )
            for line in after_diff.splitlines()[:60]:
                print(f"  {line}", file=sys.stderr)
        if not worse and after_hunks <= before_hunks:
            log(f"ok   {rel}")
    if failures:
        log(f"{failures} lint problem(s) in patched torch files")
        return 1
    return 0


# -------- check-series --------


_SUBJECT = re.compile(r"^\[PATCH (?P<n>\d+)/(?P<m>\d+)\] (?P<rest>.*)$", re.S)


def patch_message(path: Path) -> tuple[str, str]:
    """The decoded, unfolded Subject and the commit message body of a patch."""
    text = path.read_text(encoding="utf-8", errors="replace")
    head, _, rest = text.partition("\n\n")
    message = email.message_from_string(head + "\n\n", policy=email.policy.default)
    subject = str(message.get("Subject", ""))
    body = re.split(r"^---$", rest, maxsplit=1, flags=re.M)[0]
    return subject, body


def check_headers(patch: Patch, total: int) -> list[str]:
    subject, body = patch_message(patch.path)
    problems = []
    match = _SUBJECT.match(subject)
    if not match:
        problems.append(f"{patch.name}: Subject {subject!r} is not '[PATCH n/M] ...'")
    else:
        n, m = int(match["n"]), int(match["m"])
        if (n, m) != (patch.number, total):
            problems.append(
                f"{patch.name}: Subject says [PATCH {n}/{m}]; "
                f"its place in series needs [PATCH {patch.number}/{total}]"
            )
    rest = match["rest"] if match else SUBJECT_PREFIX  # no subject: said above
    problems += [f"{patch.name}: {p}" for p in message_problems(rest, body)]
    return problems


@dataclass(frozen=True)
class Section:
    """One part of a patch file: the message (path None) or one file's diff."""

    path: str | None
    start: int  # line number in the patch file of its first line
    lines: tuple[str, ...]

    def blobs(self) -> tuple[str, str] | None:
        """The (pre-image, post-image) blob ids of its `index` line."""
        for line in self.lines:
            match = _INDEX.match(line)
            if match:
                return match["old"], match["new"]
        return None


_DIFF_GIT = re.compile(r"^diff --git a/.* b/(?P<path>.*)$")
_INDEX = re.compile(r"^index (?P<old>[0-9a-f]+)\.\.(?P<new>[0-9a-f]+)(?: [0-7]+)?$")


def patch_sections(path: Path) -> list[Section]:
    """Split a patch file at its `diff --git` lines."""
    sections: list[Section] = []
    name: str | None = None
    start, lines = 1, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _DIFF_GIT.match(line)
        if match:
            sections.append(Section(name, start, tuple(lines)))
            name, start, lines = match["path"], number, []
        lines.append(line)
    sections.append(Section(name, start, tuple(lines)))
    return sections


def is_position(line: str) -> bool:
    """An `index` or `@@` line: it changes when an earlier patch moves the code."""
    return line.startswith(("index ", "@@ "))


def first_difference(ours: Section, theirs: Section, positions: bool) -> str | None:
    """Line N: has X; export writes Y -- for the first line that differs.

    With `positions` False, `index` and `@@` lines of a file's diff are not
    compared (they hold the blob ids and line numbers, which an earlier patch
    changes without this one being touched)."""
    n = max(len(ours.lines), len(theirs.lines))
    for i in range(n):
        a = ours.lines[i] if i < len(ours.lines) else None
        b = theirs.lines[i] if i < len(theirs.lines) else None
        if a == b:
            continue
        masked = ours.path is not None and not positions
        if masked and a is not None and b is not None and is_position(a):
            if is_position(b):
                continue
        has = f"has {a!r}" if a is not None else "ends"
        wants = f"export writes {b!r}" if b is not None else "export ends there"
        return f"line {ours.start + i}: {has}; {wants}"
    return None


def blob_difference(
    repo: Path, patch: Patch, path: str, written: str, applied: str
) -> str:
    """Where the file `patch` gives (blob `applied`) departs from the one export
    wrote (blob `written`): the patch line, if `repo` still holds that blob."""
    have = git(["cat-file", "-e", f"{written}^{{blob}}"], repo, check=False)
    if have.returncode != 0:
        return (
            f"{path}: applying its hunks gives blob {applied[:12]}, its index line "
            f"says export wrote {written[:12]} (the edited line cannot be read back "
            f"from a blob id, and {repo} does not hold that blob)"
        )
    from unidiff import PatchSet  # file_changes has read the patch already

    diff = git(["diff", "--no-color", "-U0", written, applied], repo).stdout
    hunk = PatchSet(diff)[0][0]
    added = [line for line in hunk if line.is_added]
    removed = [line for line in hunk if line.is_removed]
    wrote = added_line(removed[0].value) if removed else "nothing there"
    if not added:
        return (
            f"{path} line {removed[0].source_line_no}: export wrote {wrote}, "
            "which the patch lacks"
        )
    wanted = added[0].target_line_no
    pfile = next(f for f in PatchSet(patch.path.read_text()) if f.path == path)
    lines = [line for h in pfile for line in h if line.is_added]
    where = next((x.diff_line_no for x in lines if x.target_line_no == wanted), None)
    return (
        f"line {where}: has {added_line(added[0].value)}; export wrote {wrote} "
        f"({path} line {wanted})"
    )


def added_line(value: str) -> str:
    return repr("+" + value.rstrip("\n"))


def export_differences(repo: Path, pairs: Sequence[tuple[Patch, Path]]) -> list[str]:
    """Each patch that differs from what export writes, with its first differing line.

    Export's `index` lines name the blobs before and after each file's diff.  A
    code line edited by hand shows as a post-image that is not the one named; it
    also changes the pre-image, `index` and `@@` lines of every later patch to
    that file, and those are not counted against the later patches."""
    problems = []
    moved: set[str] = set()  # files whose content differs from what export saw
    for patch, canonical in pairs:
        found = compare_to_export(repo, patch, canonical, moved)
        if found:
            problems.append(
                f"{patch.name}: differs from what `{TOOL} export` writes: {found}; "
                "import and export the series again (or restore the exported patch)"
            )
    return problems


def compare_to_export(
    repo: Path, patch: Patch, canonical: Path, moved: set[str]
) -> str | None:
    """How `patch` first differs from export's `canonical`, or None.

    `moved` holds the files that an earlier patch left other than export saw
    them; this patch's files of that kind are added to it."""
    ours, theirs = patch_sections(patch.path), patch_sections(canonical)
    export_of = {s.path: s for s in theirs[1:]}
    files = [(mine, export_of.get(mine.path)) for mine in ours[1:]]
    before = set(moved)
    for mine, export in files:
        blobs, applied = mine.blobs(), export.blobs() if export else None
        if blobs and applied and not applied[1].startswith(blobs[1]):
            moved.add(mine.path or "?")
    if patch.name != canonical.name:
        return f"export names it {canonical.name}"
    if [s.path for s in ours] != [s.path for s in theirs]:
        whole = [line for s in ours for line in s.lines]
        wanted = [line for s in theirs for line in s.lines]
        return first_difference(
            Section(None, 1, tuple(whole)), Section(None, 1, tuple(wanted)), True
        )
    for mine, export in files:
        assert export is not None  # the same paths, in the same order
        found = first_difference(mine, export, positions=False)
        if found:
            return found
    for mine, export in files:
        assert export is not None
        blobs, applied = mine.blobs(), export.blobs()
        path = mine.path or "?"
        if blobs and applied and not applied[0].startswith(blobs[0]):
            if path in before:
                continue  # an earlier patch changed the file; said there
            return (
                f"{path}: its index line says the file before it is blob "
                f"{blobs[0][:12]}, it is {applied[0][:12]} (an edited index line, "
                "or a patch written against another base)"
            )
        if blobs and applied and not applied[1].startswith(blobs[1]):
            return blob_difference(repo, patch, path, blobs[1], applied[1])
        found = first_difference(mine, export, positions=True)
        if found:
            return found
    return first_difference(ours[0], theirs[0], positions=True)


def check_applies(base: Path, patches: Sequence[Patch]) -> tuple[list[str], list[str]]:
    """Apply the series cumulatively on a scratch worktree of pin-base."""
    start = require_base(base)
    wheel_base = (base / BASE_META).is_file()
    problems: list[str] = []
    notes: list[str] = []
    scratch = Path(tempfile.mkdtemp(prefix="stack-check-"))
    worktree = scratch / "tree"
    git(["worktree", "add", "-q", "--detach", str(worktree), start], base)
    try:
        for patch in patches:
            skip = missing_files(worktree, patch) if wheel_base else []
            for e in skip:
                notes.append(
                    f"{patch.name}: {e.file} ({e.hunks} hunk(s)) not checked: "
                    "not in the wheel-derived base "
                    f"(vendor it under vendor/{BASE}/pytorch/)"
                )
            excludes = [f"--exclude={e.file}" for e in skip]
            path = str(patch.path.resolve())
            plain = git(["apply", "--check", *excludes, path], worktree, check=False)
            if plain.returncode != 0:
                problems.append(
                    f"patch {patch.number} does not apply after patches "
                    f"1..{patch.number - 1}: "
                    f"{explain_failure(patch, plain.stdout + plain.stderr)}"
                )
                break
            strict = git(
                ["apply", "--check", "--whitespace=error-all", *excludes, path],
                worktree,
                check=False,
            )
            if strict.returncode != 0:
                problems.append(
                    f"whitespace error: "
                    f"{explain_failure(patch, strict.stdout + strict.stderr)}"
                )
            am_one(worktree, patch, skip)
        else:
            if patches and not any("not checked" in n for n in notes):
                canonical = scratch / "canonical"
                names = canonical_patches(
                    worktree, start, "HEAD", canonical, check_messages=False
                )
                pairs = zip(patches, names, strict=True)
                problems += export_differences(
                    base, [(p, canonical / n) for p, n in pairs]
                )
    finally:
        git(["worktree", "remove", "--force", str(worktree)], base, check=False)
        git(["worktree", "prune"], base, check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    return problems, notes


def cmd_check_series(args: argparse.Namespace) -> int:
    pin = load_pin()
    series_dir: Path = args.series_dir
    expected = int(pin["SERIES_LENGTH"])
    names = series_names(series_dir)
    problems: list[str] = []
    notes: list[str] = []
    for name, count in Counter(names).items():
        if count > 1:
            problems.append(f"series lists {name} {count} times")
    missing = [n for n in names if not (series_dir / n).is_file()]
    problems += [f"series lists {n}, which is not in {series_dir}" for n in missing]
    listed = set(names)
    if not (series_dir / "series").is_file():
        notes.append(f"no series file in {series_dir} yet")
    for path in sorted(series_dir.glob("*.patch")):
        if path.name not in listed:
            problems.append(f"{path.name} is in {series_dir} but not in series")
    if len(names) > expected:
        problems.append(f"series has {len(names)} patches; SERIES_LENGTH is {expected}")
    elif len(names) < expected:
        notes.append(f"series incomplete: {len(names)} of SERIES_LENGTH {expected}")
    present = [
        Patch(i + 1, n, series_dir / n)
        for i, n in enumerate(names)
        if (series_dir / n).is_file()
    ]
    for patch in present:
        problems += check_headers(patch, len(names))
    prefix = []
    for patch in present:
        if patch.name in missing or patch.number != len(prefix) + 1:
            break
        prefix.append(patch)
    if prefix:
        applied, more = check_applies(args.base_dir.absolute(), prefix)
        problems += applied
        notes += more
    for note in notes:
        log(f"note: {note}")
    for problem in problems:
        log(f"FAIL: {problem}")
    if problems:
        log(f"series in {series_dir}: {len(problems)} problem(s)")
        return 1
    log(f"series in {series_dir}: {len(names)} patch(es), OK")
    return 0


# -------- source --------


def cmd_apply_source(args: argparse.Namespace) -> int:
    pin = load_pin()
    source: Path = args.source.absolute()
    if not is_git_repo(source):
        raise StackError(
            f"{source} is not the top of a git checkout; needs a PyTorch clone"
        )
    state = operation_in_progress(source)
    if state:
        raise StackError(
            f"half-applied: {source} has a git operation in progress ({state}); "
            "needs `git am --abort` (or rebase/merge --abort) there first"
        )
    head = rev_parse(source, "HEAD")
    if head is None:
        raise StackError(
            f"{source} has no commit checked out (an empty repository?); needs a "
            f"PyTorch clone at {pin['TORCH_GIT_TAG']} ({pin['TORCH_GIT_COMMIT']})"
        )
    if head != pin["TORCH_GIT_COMMIT"]:
        ref = current_ref(source)
        raise StackError(
            f"foreign checkout: {source} HEAD is {head} ({ref}); needs "
            f"{pin['TORCH_GIT_TAG']} ({pin['TORCH_GIT_COMMIT']}) checked out"
        )
    patches = load_series(args.series_dir, args.upto)
    branch = f"symm-mem-stack-{len(patches)}"
    if args.check:
        check_checkout(source, branch, force=args.force)
        log(f"{source}: ready for branch {branch} ({len(patches)} patch(es))")
        return 0
    make_branch(source, head, branch, patches, force=args.force, exclude_missing=False)
    log(
        f"{source}: branch {branch}, {len(patches)} patch(es) on {pin['TORCH_GIT_TAG']}"
    )
    print(branch)
    return 0


# -------- upstream tests --------

LEVEL_GATE = "levels"  # stack_level.levels(lo, hi=None): run at levels lo..hi
LEVEL_TEST = "holds"  # stack_level.holds(lo, hi=None): is the level in lo..hi
LEVEL_MODULE = "stack_level"


def _gate_span(node: ast.expr) -> tuple[int, int | None] | None:
    """(lo, hi) of a ``levels(...)`` / ``holds(...)`` call, else None."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return None
    if node.func.id not in (LEVEL_GATE, LEVEL_TEST) or node.keywords:
        return None
    args = [ast.literal_eval(a) for a in node.args]
    if not 1 <= len(args) <= 2 or not all(isinstance(a, int) for a in args):
        raise StackError(f"line {node.lineno}: {ast.unparse(node)} needs 1 or 2 ints")
    return args[0], (args[1] if len(args) == 2 else None)


def _holds(span: tuple[int, int | None], level: int) -> bool:
    lo, hi = span
    return lo <= level and (hi is None or level <= hi)


def _has_tests(cls: ast.ClassDef | list[ast.stmt]) -> bool:
    "Whether a class (or a list of its statements) defines a test method"
    body = cls.body if isinstance(cls, ast.ClassDef) else cls
    return any(
        isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        and n.name.startswith("test")
        for n in body
    )


def render_upstream_test(source: str, level: int, name: str) -> str | None:
    """
    The tests of ``source`` (a GPU-tier test file) as they go upstream with
    commit ``level`` of the stack: no level machinery. A test or class gated
    ``@levels(lo)`` is kept from commit ``lo`` on (commit 1 for ``lo == 0``:
    it tests what the series must leave as at stock) and loses the
    decorator; one gated ``@levels(lo, hi)`` pins a state the series later
    changes (stock bugs among them) and stays in this repository. An
    ``if holds(...):`` statement keeps the branch that is taken at ``level``.
    A class left without tests goes too. None if no test is left.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    drop: set[int] = set()  # 0-based line numbers
    replace: dict[int, str] = {}

    def span_of(node: ast.stmt) -> range:
        first = min(
            [node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]
        )
        return range(first - 1, node.end_lineno or node.lineno)

    def taken_branch(node: ast.If) -> bool | None:
        "Whether an `if holds(...)` takes its body at `level`; None: not one"
        test = node.test
        negate = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
        span = _gate_span(test.operand if isinstance(test, ast.UnaryOp) else test)
        return None if span is None else _holds(span, level) != negate

    def keep_branch(node: ast.If, body: bool) -> None:
        "Replace the `if` statement by one of its branches, dedented"
        body_end = node.body[-1].end_lineno or node.body[-1].lineno
        branch = range(node.lineno, body_end)  # 0-based, after `if ...:`
        if not body:
            if not node.orelse:
                branch = range(0)
            else:
                elses = [
                    i
                    for i in range(body_end, node.orelse[0].lineno - 1)
                    if lines[i].strip() == "else:"
                ]
                if not elses:
                    raise StackError(f"{name}, line {node.lineno}: elif after holds()")
                branch = range(elses[0] + 1, node.orelse[-1].end_lineno or 0)
        drop.update(span_of(node))
        outer = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
        indents = [
            len(lines[i]) - len(lines[i].lstrip()) for i in branch if lines[i].strip()
        ]
        for i in branch:
            drop.discard(i)
            if lines[i].strip():
                replace[i] = " " * outer + lines[i][min(indents) :]

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.ImportFrom) and node.module == LEVEL_MODULE:
                drop.update(span_of(node))
                continue
            gates = [
                (d, span)
                for d in getattr(node, "decorator_list", [])
                if (span := _gate_span(d)) is not None
            ]
            if gates:
                ((decorator, (lo, hi)),) = gates
                if hi is not None or lo > level:
                    drop.update(span_of(node))
                    continue
                drop.update(range(decorator.lineno - 1, decorator.end_lineno or 0))
            if isinstance(node, ast.If) and (taken := taken_branch(node)) is not None:
                keep_branch(node, taken)
                visit(node.body if taken else node.orelse)
                continue
            for field in ("body", "orelse", "finalbody"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    visit([n for n in inner if isinstance(n, ast.stmt)])
            for handler in getattr(node, "handlers", []):
                visit(handler.body)
            if isinstance(node, ast.ClassDef):
                kept = [n for n in node.body if not set(span_of(n)) <= drop]
                if not kept or (_has_tests(node) and not _has_tests(kept)):
                    drop.update(span_of(node))  # nothing, or no test, left in it

    visit(tree.body)
    out = "".join(replace.get(i, line) for i, line in enumerate(lines) if i not in drop)
    out = re.sub(r"\n{4,}", "\n\n\n", out)
    final = ast.parse(out)
    if not any(isinstance(n, ast.ClassDef) and _has_tests(n) for n in final.body):
        return None
    for n in ast.walk(final):
        if isinstance(n, ast.Name) and n.id in (LEVEL_GATE, LEVEL_TEST):
            raise StackError(
                f"{name}, line {n.lineno}: {n.id}() left where it cannot be rendered"
            )
    return out


def upstream_test_files(tests: Path, level: int, out: Path) -> list[str]:
    """
    Write into ``out`` the GPU-tier tests of commit ``level`` in upstream form
    (`render_upstream_test`) and the helper modules they import from
    ``tests``; return the names written. The CPU tier and the level machinery
    stay in this repository.
    """
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    imported: set[str] = set()
    for path in sorted(tests.glob("test_*.py")):
        if path.stem.endswith("_cpu"):
            continue
        text = render_upstream_test(path.read_text(), level, path.name)
        if text is None:
            continue
        (out / path.name).write_text(text)
        written.append(path.name)
        imported |= _local_imports(text, tests)
    pending = sorted(imported)
    while pending:
        name = pending.pop()
        if name in written:
            continue
        text = (tests / name).read_text()
        (out / name).write_text(text)
        written.append(name)
        pending.extend(sorted(_local_imports(text, tests) - set(written)))
    # imports and helpers that only the tests of later commits use
    subprocess.run(
        [
            *ruff_command(),
            "check",
            "--quiet",
            "--no-cache",
            "--isolated",
            "--select",
            "F401",
            "--fix",
            *[str(out / n) for n in written],
        ],
        check=False,
        capture_output=True,
    )
    return sorted(written)


def _local_imports(text: str, tests: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        for module in modules:
            if module != LEVEL_MODULE and (tests / f"{module}.py").is_file():
                names.add(f"{module}.py")
    return names


def cmd_upstream_tests(args: argparse.Namespace) -> int:
    have = len(series_names(PATCHES_ROOT / BASE))
    if not 1 <= args.level <= have:
        raise StackError(
            f"--level wants a commit number 1..{have} (the patches of base {BASE}), "
            f"got {args.level}"
        )
    for name in upstream_test_files(args.tests, args.level, args.out):
        print(name)
    return 0


# -------- cli --------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stack.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Exit codes: 0 ok, 1 check failed, 2 bad input/refusal, 3 tool missing.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], doc: str) -> Any:
        p = sub.add_parser(name, help=doc, description=doc)
        p.set_defaults(func=func)
        return p

    def python_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--python",
            default=sys.executable,
            metavar="PY",
            help="interpreter whose installed torch is used (default: this one)",
        )

    def base_version_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--base",
            metavar="VERSION",
            help="the base, a directory patches/VERSION/ (default: SYMM_STACK_BASE, "
            "else the base of the interpreter's torch, else the newest)",
        )

    def series_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--series-dir",
            type=Path,
            metavar="DIR",
            help="directory holding `series` and the patches "
            "(default: patches/VERSION/)",
        )

    def upto_flag(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--upto",
            type=int,
            metavar="N",
            help=f"{what} patches 1..N of the series (default: all)",
        )

    def overlay_flags(p: argparse.ArgumentParser) -> None:
        "Where overlays live, whose torch they patch, and the series they apply"
        p.add_argument(
            "--out",
            type=Path,
            metavar="DIR",
            help="overlay root; level N goes to DIR/N (default: build/VERSION/overlay)",
        )
        python_flag(p)
        series_flag(p)

    def base_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--base-dir",
            type=Path,
            metavar="DIR",
            help="base repo made by `base` (default: build/VERSION/base)",
        )

    p = add("bases", cmd_bases, "list the supported bases, oldest first")
    python_flag(p)
    p.add_argument(
        "--installed",
        action="store_true",
        help="print only the base of PY's torch; "
        "refuse (exit 2) a torch no series supports",
    )
    p.add_argument("--newest", action="store_true", help="print only the newest base")

    p = add("check-torch", cmd_check_torch, "check that PY's torch is the pinned build")
    base_version_flag(p)
    python_flag(p)

    p = add("base", cmd_base, "materialize the pin as a git repo tagged pin-base")
    base_version_flag(p)
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where to put the base repo (default: build/VERSION/base)",
    )
    python_flag(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="recreate DIR even if it is not an up-to-date base (deletes its branches)",
    )

    p = add("import", cmd_import, "git am the series onto a new branch of the base")
    base_version_flag(p)
    upto_flag(p, "apply")
    base_flag(p)
    p.add_argument(
        "--branch", default="stack", help="branch to create (default: stack)"
    )
    series_flag(p)
    p.add_argument(
        "--force", action="store_true", help="replace the branch if it exists"
    )

    p = add("export", cmd_export, "write the branch back as the canonical series")
    base_version_flag(p)
    base_flag(p)
    p.add_argument(
        "--branch", default="stack", help="branch to export (default: stack)"
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="series directory to replace (default: patches/VERSION/; its PIN stays)",
    )

    p = add(
        "overlay", cmd_overlay, "patched torch Python files over the installed wheel"
    )
    base_version_flag(p)
    upto_flag(p, "overlay")
    overlay_flags(p)
    p.add_argument(
        "--remove",
        action="store_true",
        help="delete DIR/N (with --upto N) or every overlay under DIR",
    )
    p.add_argument(
        "--print-env",
        action="store_true",
        help="print `export PYTHONPATH=...` and `export SYMM_STACK_LEVEL=N` for eval",
    )

    p = add("check-series", cmd_check_series, "check the series for integrity")
    base_version_flag(p)
    base_flag(p)
    series_flag(p)

    p = add("apply-source", cmd_apply_source, "apply the series in a PyTorch checkout")
    p.add_argument(
        "--source",
        type=Path,
        required=True,
        metavar="DIR",
        help="PyTorch git checkout at the pinned commit",
    )
    base_version_flag(p)
    upto_flag(p, "apply")
    series_flag(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="replace branch symm-mem-stack-N if it exists",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="only check the checkout and the series; apply nothing",
    )

    p = add("lint-patched", cmd_lint_patched, "ruff the patched torch files vs the pin")
    base_version_flag(p)
    upto_flag(p, "lint the files touched by")
    overlay_flags(p)

    p = add(
        "upstream-tests",
        cmd_upstream_tests,
        "write the GPU-tier tests of stack commit N in upstream form",
    )
    base_version_flag(p)
    p.add_argument(
        "--level",
        type=int,
        required=True,
        metavar="N",
        help="commit N (at most the number of patches in the base's series)",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output dir")
    p.add_argument(
        "--tests",
        type=Path,
        default=REPO / "test" / "distributed",
        metavar="DIR",
        help="the tests (default: test/distributed)",
    )
    return parser


# Per subcommand, its path flags and their defaults under the selected base.
BASE_DEFAULTS: dict[str, dict[str, Callable[[str], Path]]] = {
    "base": {"out": lambda b: REPO / "build" / b / "base"},
    "import": {
        "base_dir": lambda b: REPO / "build" / b / "base",
        "series_dir": lambda b: PATCHES_ROOT / b,
    },
    "export": {
        "base_dir": lambda b: REPO / "build" / b / "base",
        "out": lambda b: PATCHES_ROOT / b,
    },
    "overlay": {
        "out": lambda b: REPO / "build" / b / "overlay",
        "series_dir": lambda b: PATCHES_ROOT / b,
    },
    "check-series": {
        "base_dir": lambda b: REPO / "build" / b / "base",
        "series_dir": lambda b: PATCHES_ROOT / b,
    },
    "apply-source": {"series_dir": lambda b: PATCHES_ROOT / b},
    "lint-patched": {
        "out": lambda b: REPO / "build" / b / "overlay",
        "series_dir": lambda b: PATCHES_ROOT / b,
    },
    "upstream-tests": {},
    "check-torch": {},
}


def main(argv: Sequence[str] | None = None) -> int:
    global BASE
    args = build_parser().parse_args(argv)
    try:
        if args.command in BASE_DEFAULTS:
            BASE = resolve_base(args)
            for name, default in BASE_DEFAULTS[args.command].items():
                if getattr(args, name) is None:
                    setattr(args, name, default(BASE))
        return int(args.func(args))
    except StackError as err:
        print(f"stack.py {args.command}: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
