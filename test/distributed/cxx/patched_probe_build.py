"""Build the probe of the PATCHED CUDAPeerAllocInfo (patch 5's C++ change).

The released wheel's libtorch_cuda holds the pin's CUDAPeerAllocInfo, so the
runtime check of patch 5 compiles the patch's own definitions into a probe
library of its own, next to (not instead of) libtorch's class:

* Sources: a tree with the series applied, as ``scripts/cxx_check.sh`` makes
  it (``--make-tree DIR``: ``stack.py base`` + ``stack.py import``, the tree
  its compile check uses), or any tree passed to ``cxx_check.sh --tree``:
  ``TREE/torch/csrc/distributed/c10d/symm_mem/CUDASymmetricMemory.{cu,hpp}``.
* ``extract`` takes from the patched .cu, by its C++ structure (comments play
  no part, so a patch that only changes comments changes nothing here): the
  unconditional top-level ``#include`` lines, the anonymous namespace that
  defines ``RetiredPeerPtrTables``, and the definitions of
  ``CUDAPeerAllocInfo``'s constructor and destructor.
* ``defs_source`` puts them in ``patched_peer_alloc_info_defs.inc`` behind
  ``#define CUDAPeerAllocInfo PatchedCUDAPeerAllocInfo``: the patched
  CUDASymmetricMemory.hpp (TREE comes first on the include path, as in
  cxx_check.sh) then declares the class under that name and the extracted
  code defines it, so no symbol of the probe is libtorch's.  ``#line``
  directives point compiler messages at the patched .cu.
* ``patched_peer_alloc_info_probe.cu`` (beside this file) includes that file
  and gives the class a C ABI for ctypes.

``build`` compiles (keeping the -MD dependency list) and links it with nvcc,
then checks that the patched header was the one read and, where ``nm`` exists,
that the library defines ``PatchedCUDAPeerAllocInfo`` and no
``CUDAPeerAllocInfo`` symbol.  Nothing is run on a GPU here.

Command line (``scripts/cxx_check.sh`` runs it after its own compile):

    PY test/distributed/cxx/patched_probe_build.py --tree TREE --out-dir DIR \
        [--nvcc NVCC] [--arch sm_90] [--idirafter DIR]... [--load]

Exit status: 0 built; 1 extraction, compile, link or check failed; 2 usage;
3 the tree's sources are not patch 5's (its header declares no destructor).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
PROBE_SRC = HERE / "patched_peer_alloc_info_probe.cu"
DEFS_NAME = "patched_peer_alloc_info_defs.inc"
LIB_NAME = "libpatched_peer_alloc_info_probe.so"
REL_DIR = "torch/csrc/distributed/c10d/symm_mem"
CU_REL = f"{REL_DIR}/CUDASymmetricMemory.cu"
HPP_REL = f"{REL_DIR}/CUDASymmetricMemory.hpp"
CLASS = "CUDAPeerAllocInfo"
RENAMED = "PatchedCUDAPeerAllocInfo"
RETIRED = "RetiredPeerPtrTables"
DEFAULT_ARCH = "sm_90"  # cxx_check.sh's default


class ProbeBuildError(Exception):
    """The patched definitions could not be extracted, compiled or checked."""


class NotPatchedError(ProbeBuildError):
    """The tree's sources are not patch 5's (no ~CUDAPeerAllocInfo)."""


# -------- extraction --------


def _blank(buf: list[str], text: str, start: int, end: int) -> None:
    for k in range(start, end):
        if text[k] != "\n":
            buf[k] = " "


_RAW_STRING = re.compile(r'(?:u8|[uUL])?R"([^()\\\s"]{0,16})\(')
_NUMBER_TAIL = re.compile(r"(?<![\w.])\.?[0-9][0-9A-Za-z'.]*$")


def mask(text: str) -> tuple[str, str]:
    """``(code, skeleton)`` of C++ source ``text``, both as long as ``text``.

    ``code`` is ``text`` with comments blanked; ``skeleton`` also blanks the
    insides of string and character literals, so brackets and keywords found
    in it are code.  Newlines are kept, so offsets and line numbers agree.
    """
    code = list(text)
    skel = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            _blank(code, text, i, j)
            _blank(skel, text, i, j)
            i = j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            _blank(code, text, i, j)
            _blank(skel, text, i, j)
            i = j
            continue
        raw = _RAW_STRING.match(text, i) if c in "uULR" else None
        if raw and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            close = ")" + raw.group(1) + '"'
            j = text.find(close, raw.end())
            j = n if j < 0 else j
            _blank(skel, text, raw.end(), j)
            i = min(n, j + len(close))
            continue
        if c == "'" and _NUMBER_TAIL.search(text, max(0, i - 64), i):
            i += 1  # a digit separator (1'000), not a character literal
            continue
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            _blank(skel, text, i + 1, min(j, n))
            i = j + 1
            continue
        i += 1
    return "".join(code), "".join(skel)


_CLOSERS = {"(": ")", "[": "]", "{": "}"}


def match_bracket(skel: str, pos: int) -> int:
    """Offset just past the bracket that closes the one at ``skel[pos]``."""
    stack: list[str] = []
    for k in range(pos, len(skel)):
        ch = skel[k]
        if ch in _CLOSERS:
            stack.append(_CLOSERS[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                break
            if not stack:
                return k + 1
    line = skel.count("\n", 0, pos) + 1
    raise ProbeBuildError(f"unbalanced brackets from line {line}")


def _skip_space(skel: str, pos: int) -> int:
    while pos < len(skel) and skel[pos].isspace():
        pos += 1
    return pos


_SPECIFIERS = re.compile(r"(?:noexcept|override|final|const)\b(?:\s*\([^)]*\))?")
_INIT_NAME = re.compile(r"[A-Za-z_][\w:]*(?:\s*<[^;{}()]*>)?\s*")


def function_end(skel: str, paren: int, what: str) -> int:
    """End of the definition whose parameter list opens at ``skel[paren]``:
    past the closing brace of its body, after any constructor initializer
    list (``name(...)`` or ``name{...}`` items)."""
    pos = _skip_space(skel, match_bracket(skel, paren))
    while m := _SPECIFIERS.match(skel, pos):
        pos = _skip_space(skel, m.end())
    if skel.startswith(":", pos) and not skel.startswith("::", pos):
        pos = _skip_space(skel, pos + 1)
        while True:
            m = _INIT_NAME.match(skel, pos)
            if not m or m.end() >= len(skel) or skel[m.end()] not in "({":
                raise ProbeBuildError(f"{what}: cannot read its initializer list")
            pos = _skip_space(skel, match_bracket(skel, m.end()))
            if not skel.startswith(",", pos):
                break
            pos = _skip_space(skel, pos + 1)
    if not skel.startswith("{", pos):
        raise ProbeBuildError(f"{what}: no function body where one was expected")
    return match_bracket(skel, pos)


@dataclass(frozen=True)
class Piece:
    """A slice of the patched .cu: ``code[start:end]``, from line ``line``."""

    what: str
    start: int
    end: int
    line: int


def _only(found: list[Piece], what: str) -> Piece:
    if len(found) != 1:
        raise ProbeBuildError(
            f"expected exactly one {what} in the patched {CU_REL}, found {len(found)}"
        )
    return found[0]


def _line_start(text: str, pos: int) -> int:
    return text.rfind("\n", 0, pos) + 1


def _member_definition(skel: str, name: str, what: str) -> Piece:
    pattern = re.compile(rf"(?<![\w:~])\b{CLASS}\s*::\s*{name}\s*\(")
    found = []
    for m in pattern.finditer(skel):
        start = _line_start(skel, m.start())
        if skel[start : m.start()].strip():
            continue  # not at the start of a declaration: a use, not a definition
        end = function_end(skel, m.end() - 1, what)
        found.append(Piece(what, start, end, skel.count("\n", 0, start) + 1))
    return _only(found, what)


def _retired_namespace(skel: str) -> Piece:
    what = f"anonymous namespace defining {RETIRED}"
    defines = re.compile(rf"\b(?:class|struct)\s+{RETIRED}\b")
    found = []
    for m in re.finditer(r"(?<![\w:])namespace\s*\{", skel):
        end = match_bracket(skel, m.end() - 1)
        if defines.search(skel, m.end(), end):
            start = _line_start(skel, m.start())
            found.append(Piece(what, start, end, skel.count("\n", 0, start) + 1))
    return _only(found, what)


def _toplevel_includes(code: str, skel: str) -> list[str]:
    """The .cu's ``#include`` lines outside any ``#if`` block, in order."""
    includes = []
    depth = 0
    code_lines = code.splitlines()
    for k, line in enumerate(skel.splitlines()):
        directive = re.match(r"\s*#\s*(\w+)", line)
        if not directive:
            continue
        word = directive.group(1)
        if word in ("if", "ifdef", "ifndef"):
            depth += 1
        elif word == "endif":
            depth -= 1
        elif word == "include" and depth == 0:
            includes.append(code_lines[k].strip())
    return includes


@dataclass(frozen=True)
class Extracted:
    includes: list[str]
    pieces: list[Piece]  # in the order they appear in the .cu
    text: str  # the .cu as it is (the pieces keep their comments)


def extract(cu_text: str) -> Extracted:
    """What the probe needs of the patched CUDASymmetricMemory.cu."""
    code, skel = mask(cu_text)
    pieces = [
        _retired_namespace(skel),
        _member_definition(skel, CLASS, f"{CLASS} constructor definition"),
        _member_definition(skel, rf"~\s*{CLASS}", f"{CLASS} destructor definition"),
    ]
    pieces.sort(key=lambda p: p.start)
    return Extracted(_toplevel_includes(code, skel), pieces, cu_text)


def defs_source(tree: Path) -> str:
    """The text of ``patched_peer_alloc_info_defs.inc`` for patched ``tree``."""
    cu = tree / CU_REL
    hpp = tree / HPP_REL
    for path in (cu, hpp):
        if not path.is_file():
            raise ProbeBuildError(f"{path} does not exist")
    if not re.search(rf"~\s*{CLASS}\s*\(", mask(hpp.read_text())[1]):
        raise NotPatchedError(
            f"{hpp} declares no ~{CLASS}: these are not patch 5's sources"
        )
    ex = extract(cu.read_text())
    out = [
        f"// GENERATED by {Path(__file__).name} from {cu}",
        "// (the series' patched source); do not edit.",
        "//",
        f"// {CLASS} is renamed to {RENAMED} for all of this file,",
        "// the patched header included, so that nothing here clashes with",
        "// libtorch_cuda's own class.",
        "",
        "// CUDASymmetricMemoryTypes.hpp names CUmemGenericAllocationHandle without",
        "// including the driver API header; the .cu gets it from",
        "// c10/cuda/driver_api.h, which this probe leaves out (it needs nvml.h).",
        "#include <cuda.h>",
        "",
        f"#define {CLASS} {RENAMED}",
        "",
        "// The .cu's unconditional top-level includes, in its order:",
        *ex.includes,
        "",
        "namespace c10d::symmetric_memory {",
    ]
    for piece in ex.pieces:
        out += ["", f"// {piece.what}", f'#line {piece.line} "{cu}"']
        out.append(ex.text[piece.start : piece.end].rstrip())
    out += ["", "} // namespace c10d::symmetric_memory", "", f"#undef {CLASS}", ""]
    return "\n".join(out)


# -------- build --------


def torch_paths() -> tuple[Path, Path, int]:
    """(include dir, lib dir, _GLIBCXX_USE_CXX11_ABI) of the installed torch."""
    import torch

    root = Path(torch.__file__).resolve().parent
    return root / "include", root / "lib", int(torch._C._GLIBCXX_USE_CXX11_ABI)


def peer_info_flags(hpp: Path) -> list[str]:
    """The flags a probe needs for the CUDASymmetricMemory.hpp at `hpp` and
    the installed torch: the C++ standard its headers need (2.14's ATen
    refuses anything below C++20), and SYMM_STACK_PEER_INFO_GROUP_NAME when
    the CUDAPeerAllocInfo constructor takes the group's name (see
    fake_peer_pointers.h)."""
    import torch

    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    flags = ["-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"]
    ctor = re.search(r"CUDAPeerAllocInfo\(([^)]*)\);", hpp.read_text())
    if ctor and "group_name" in ctor.group(1):
        flags.append("-DSYMM_STACK_PEER_INFO_GROUP_NAME=1")
    return flags


def default_after_dirs() -> list[Path]:
    """Where headers the toolkit may lack are found (cuBLAS, cuSPARSE, ...):
    the nvidia-* wheels next to torch and build/cxx/deps (as cxx_check.sh)."""
    import torch

    site = Path(torch.__file__).resolve().parent.parent
    patterns = [
        str(site / "nvidia" / "*" / "include"),
        str(REPO / "build" / "cxx" / "deps" / "*" / "nvidia" / "*" / "include"),
        str(REPO / "build" / "cxx" / "deps" / "*" / "include"),
    ]
    return [Path(d) for pattern in patterns for d in sorted(glob.glob(pattern))]


def find_nvcc() -> str | None:
    import os

    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def nvcc_commands(
    nvcc: str,
    tree: Path,
    out_dir: Path,
    *,
    arch: str = DEFAULT_ARCH,
    after_dirs: Sequence[Path] = (),
) -> tuple[list[str], list[str]]:
    """The compile and the link command of the probe library in ``out_dir``."""
    inc, lib, abi = torch_paths()
    obj = out_dir / "patched_peer_alloc_info_probe.o"
    hpp = tree / HPP_REL if (tree / HPP_REL).is_file() else inc / HPP_REL
    compile_cmd = [
        nvcc, *peer_info_flags(hpp), f"-arch={arch}", "-O2", "-c",
        str(PROBE_SRC),
        "-o", str(obj), "-MD", "-MF", str(out_dir / "patched_peer_alloc_info_probe.d"),
        "--expt-relaxed-constexpr", "--expt-extended-lambda",
        # The flags cxx_check.sh compiles CUDASymmetricMemory.cu with:
        "-DCUDA_HAS_FP16=1", "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-DUSE_CUDA", "-DUSE_DISTRIBUTED",
        "-DUSE_C10D_NCCL", "-DUSE_C10D_GLOO", "-DPYTORCH_C10_DRIVER_API_SUPPORTED=1",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DNDEBUG",
        "-Xcompiler", "-fPIC",
        # The generated file; then the patched tree before the wheel's headers.
        "-I", str(out_dir), "-I", str(tree),
        "-I", str(inc), "-I", str(inc / "torch" / "csrc" / "api" / "include"),
    ]  # fmt: skip
    seen: set[str] = set()
    for d in after_dirs:
        if str(d) not in seen:
            seen.add(str(d))
            compile_cmd += ["-Xcompiler", "-idirafter", "-Xcompiler", str(d)]
    link_cmd = [
        nvcc, "-shared", "--cudart=shared", str(obj), "-o", str(out_dir / LIB_NAME),
        "-L", str(lib), "-ltorch_cuda", "-lc10_cuda", "-ltorch_cpu", "-lc10",
        f"-Xlinker=-rpath,{lib}",
    ]  # fmt: skip
    return compile_cmd, link_cmd


def _run(cmd: list[str], what: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise ProbeBuildError(
            f"{what} failed (exit {res.returncode}):\n{shlex.join(cmd)}\n"
            + res.stdout
            + res.stderr
        )


def header_used(dep_file: Path) -> list[Path]:
    """Every CUDASymmetricMemory.hpp that the -MD dependency list names."""
    words = dep_file.read_text().replace("\\\n", " ").split()
    return [Path(w).resolve() for w in words if w.endswith(HPP_REL)]


def check_symbols(lib: Path) -> str:
    """Checks the renamed class is defined and libtorch's is not; says how."""
    nm = shutil.which("nm")
    if nm is None:
        return "symbols not checked (no nm)"
    res = subprocess.run(
        [nm, "-D", "--defined-only", str(lib)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise ProbeBuildError(f"nm -D {lib} failed: {res.stderr.strip()}")
    names = [line.split()[-1] for line in res.stdout.splitlines() if line.split()]
    renamed = f"{len(RENAMED)}{RENAMED}"
    stock = f"{len(CLASS)}{CLASS}"
    ctor = [s for s in names if f"{renamed}C1E" in s or f"{renamed}C2E" in s]
    dtor = [s for s in names if f"{renamed}D" in s]
    clash = [s for s in names if stock in s]
    if not ctor or not dtor:
        raise ProbeBuildError(f"{lib} does not define {RENAMED}'s constructor and "
                              "destructor")  # fmt: skip
    if clash:
        raise ProbeBuildError(f"{lib} defines libtorch's own {CLASS}: {clash[:3]}")
    return f"defines {RENAMED} (constructor, destructor), no {CLASS} symbol"


def build(
    tree: Path,
    out_dir: Path,
    *,
    nvcc: str,
    arch: str = DEFAULT_ARCH,
    after_dirs: Sequence[Path] = (),
    log: bool = False,
) -> Path:
    """Build the probe library from patched ``tree`` into ``out_dir``."""
    tree = tree.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DEFS_NAME).write_text(defs_source(tree))
    compile_cmd, link_cmd = nvcc_commands(
        nvcc, tree, out_dir, arch=arch, after_dirs=[*after_dirs, *default_after_dirs()]
    )
    for cmd, what in ((compile_cmd, "compile"), (link_cmd, "link")):
        if log:
            print(f"patched_probe: {what}: {shlex.join(cmd)}", flush=True)
        _run(cmd, f"nvcc {what} of {PROBE_SRC.name}")
    want = (tree / HPP_REL).resolve()
    used = header_used(out_dir / "patched_peer_alloc_info_probe.d")
    if used != [want]:
        raise ProbeBuildError(f"expected the patched {want} to be the header read, "
                              f"read: {[str(u) for u in used]}")  # fmt: skip
    lib = out_dir / LIB_NAME
    checked = check_symbols(lib)
    if log:
        print(f"patched_probe: header used: {want}", flush=True)
        print(f"patched_probe: {lib.name}: {checked}", flush=True)
    return lib


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, required=True, help="patched tree")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--nvcc", default=None, help="default: nvcc found as usual")
    parser.add_argument("--arch", default=DEFAULT_ARCH)
    parser.add_argument("--idirafter", type=Path, action="append", default=[])
    parser.add_argument(
        "--load", action="store_true", help="then load it (all symbols resolve)"
    )
    args = parser.parse_args(argv)
    nvcc = args.nvcc or find_nvcc()
    if nvcc is None:
        print("patched_probe: error: nvcc not found", file=sys.stderr)
        return 2
    try:
        lib = build(
            args.tree,
            args.out_dir,
            nvcc=nvcc,
            arch=args.arch,
            after_dirs=args.idirafter,
            log=True,
        )
        if args.load:
            import torch  # noqa: F401  (loads libtorch_cuda and its libraries)

            try:
                ctypes.CDLL(str(lib))
            except OSError as err:
                raise ProbeBuildError(f"loading {lib} failed: {err}") from None
            print(f"patched_probe: loaded {lib.name} (every symbol resolved)")
    except NotPatchedError as err:
        print(f"patched_probe: not built: {err}", file=sys.stderr)
        return 3
    except ProbeBuildError as err:
        print(f"patched_probe: FAILED: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
