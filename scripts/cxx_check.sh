#!/usr/bin/env bash
# Compile-check the C++/CUDA side of the patch series with nvcc, without a
# PyTorch source build.
#
# The translation unit torch/csrc/distributed/c10d/symm_mem/CUDASymmetricMemory.cu
# is compiled (object thrown away) against the INSTALLED torch's headers, with
# the directory of the (patched) sources put first on the include path, so a
# patched CUDASymmetricMemory.hpp there shadows the wheel's copy.
#
# Which sources:
#   --tree DIR   DIR holds already patched sources at their PyTorch paths
#                (DIR/torch/csrc/distributed/c10d/symm_mem/CUDASymmetricMemory.cu,
#                and normally the .hpp next to it).
#   (default)    a temporary tree: the base's pin as a git repo (`stack.py
#                base --base VERSION`: the wheel's headers under torch/csrc
#                plus vendor/VERSION/pytorch's .cu), with the base's series
#                (patches/VERSION/) applied by
#                `stack.py import` (git am).  If no patch changes the two
#                files, the UNPATCHED sources are compiled and the script says
#                so.  This needs the base's torch for --python, and the base's
#                vendored .cu (otherwise: cannot run here, exit 3).
#
# The base: --base VERSION, else $SYMM_STACK_BASE, else the base of
# --python's torch (stack.py bases --installed).
#
# Then (unless --no-probe) the probe library of test/distributed/cxx/
# test_peer_alloc_info.py's patched-class tests is built from the same tree
# (test/distributed/cxx/patched_probe_build.py: the patched constructor,
# destructor and RetiredPeerPtrTables of CUDAPeerAllocInfo, renamed
# PatchedCUDAPeerAllocInfo, compiled, linked against the installed torch and
# loaded), so a change to the series that breaks that GPU test shows here.
# --make-tree DIR only makes the default patched tree at DIR (no nvcc
# needed); that test gets its sources this way.
#
# Flags mirror PyTorch's build of this file: -std=c++17, or -std=c++20 for a
# torch whose ATen/ATen.h requires C++20 (2.14.1 does; the base's own build's
# C++ standard), PyTorch's CUDA flags, -DPYTORCH_C10_DRIVER_API_SUPPORTED=1
# (set for this file by caffe2/CMakeLists.txt), -D_GLIBCXX_USE_CXX11_ABI from
# torch._C._GLIBCXX_USE_CXX11_ABI.  Headers nvcc's toolkit lacks (cuSPARSE,
# cuBLAS, cuSOLVER, NVML) are taken from the nvidia-* wheels next to torch or
# from build/cxx/deps/ (see --help), added with -idirafter so the toolkit's
# own headers always win.
#
# Exit status: 0 compiled (and the probe built); 1 compile error (the .cu or
# the probe); 2 usage error or a patch does not apply; 3 cannot run here (no
# nvcc, no torch, a needed header missing).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REL_DIR="torch/csrc/distributed/c10d/symm_mem"
CU_REL="$REL_DIR/CUDASymmetricMemory.cu"
HPP_REL="$REL_DIR/CUDASymmetricMemory.hpp"
DEPS_DIR="$ROOT/build/cxx/deps"

PY=""
BASE="${SYMM_STACK_BASE:-}"
TREE=""
ARCH="sm_90"
KEEP=0
PROBE=1
MAKE_TREE=""
PROBE_PY="$ROOT/test/distributed/cxx/patched_probe_build.py"
EXTRA_INC=()

usage() {
  cat <<EOF
Usage: scripts/cxx_check.sh [options]

Compile torch/csrc/distributed/c10d/symm_mem/CUDASymmetricMemory.cu with nvcc
against the installed torch's headers (object thrown away), then build and
load (nothing runs on a GPU) the probe library of the patched
CUDAPeerAllocInfo that test/distributed/cxx/test_peer_alloc_info.py uses.

Options:
  --base VERSION      the base (patches/VERSION/; default: \$SYMM_STACK_BASE,
                      else the base of --python's torch)
  --python PY         Python whose torch provides the headers; without
                      --tree it must be the base's torch
                      (default: .venv/VERSION/bin/python, else the newest
                      .venv/*/bin/python, else python3)
  --tree DIR          directory holding the patched torch/csrc/... sources
                      (default: a temporary stack.py base tree — the wheel's
                      headers plus vendor/VERSION/pytorch — with
                      patches/VERSION/series applied by stack.py import)
  --arch ARCH         GPU architecture for -arch (default: sm_90)
  --include-dir DIR   extra directory to search for missing third-party
                      headers (nvml.h, cusparse.h, ...); may be repeated
  --keep              keep the temporary directory (printed at the end)
  --no-probe          do not build the probe library of the patched
                      CUDAPeerAllocInfo (test/distributed/cxx/
                      patched_probe_build.py) after the compile
  --make-tree DIR     only make the default patched tree (stack.py base +
                      import, as above) at DIR, a path that does not exist
                      yet, and exit; needs no nvcc
  -h, --help          show this help

Missing headers: nvcc's toolkit may lack nvml.h (needed by
c10/cuda/driver_api.h).  NVIDIA's header wheel provides it, e.g.
  python -m pip install --no-deps --target build/cxx/deps/nvml 'nvidia-nvml-dev==13.0.*'
Directories build/cxx/deps/*/nvidia/*/include are searched automatically.

Exit status: 0 compiled (and the probe built), 1 compile error (the .cu or
the probe), 2 usage error / patch does not apply, 3 cannot run here (reason
printed on one line).
EOF
}

die_usage() {
  echo "cxx_check: $*" >&2
  echo "Try 'scripts/cxx_check.sh --help'." >&2
  exit 2
}

cannot_run() {
  echo "cxx_check: CANNOT RUN HERE: $*" >&2
  exit 3
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --python)
      [[ $# -ge 2 ]] || die_usage "--python needs an argument"
      PY="$2"
      shift 2
      ;;
    --base)
      [[ $# -ge 2 ]] || die_usage "--base needs an argument"
      BASE="$2"
      shift 2
      ;;
    --tree)
      [[ $# -ge 2 ]] || die_usage "--tree needs an argument"
      TREE="$2"
      shift 2
      ;;
    --arch)
      [[ $# -ge 2 ]] || die_usage "--arch needs an argument"
      ARCH="$2"
      shift 2
      ;;
    --include-dir)
      [[ $# -ge 2 ]] || die_usage "--include-dir needs an argument"
      EXTRA_INC+=("$2")
      shift 2
      ;;
    --keep)
      KEEP=1
      shift
      ;;
    --no-probe)
      PROBE=0
      shift
      ;;
    --make-tree)
      [[ $# -ge 2 ]] || die_usage "--make-tree needs an argument"
      MAKE_TREE="$2"
      shift 2
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      die_usage "unknown argument: $1"
      ;;
  esac
done

# ---- tools --------------------------------------------------------------
if [[ -z "$PY" ]]; then
  newest_venv="$(printf '%s\n' "$ROOT"/.venv/*/bin/python | sort -V | tail -n1)"
  [[ -x "$newest_venv" ]] || newest_venv=""
  if [[ -n "$BASE" && -x "$ROOT/.venv/$BASE/bin/python" ]]; then
    PY="$ROOT/.venv/$BASE/bin/python"
  elif [[ -n "$newest_venv" ]]; then
    PY="$newest_venv"
  elif command -v python3 >/dev/null 2>&1; then
    PY="$(command -v python3)"
  else
    cannot_run "no Python found (.venv/VERSION/bin/python or python3); pass --python"
  fi
fi
command -v "$PY" >/dev/null 2>&1 || cannot_run "Python '$PY' not found"
if [[ -z "$BASE" ]]; then
  BASE="$("$PY" "$ROOT/scripts/stack.py" bases --python "$PY" --installed 2>&1)" ||
    cannot_run "no --base, and ${BASE##*error: }"
fi
PATCHES_ROOT="${SYMM_STACK_PATCHES_ROOT:-$ROOT/patches}"
[[ -f "$PATCHES_ROOT/$BASE/PIN" ]] ||
  die_usage "--base $BASE is not a supported base; supported: $(for d in "$PATCHES_ROOT"/*/PIN; do d="${d%/PIN}"; echo "${d##*/}"; done | sort -V | paste -sd' ')"
VENDOR_CU="$ROOT/vendor/$BASE/pytorch/$CU_REL"

# make_patched_tree DIR: the pin as a git repo (`stack.py base`: the wheel's
# headers under torch/csrc plus vendor/pytorch's .cu) with the whole series
# applied by git am (`stack.py import`).  Needs the pinned torch for $PY.
make_patched_tree() {
  local tree="$1" rc=0
  [[ -f "$VENDOR_CU" ]] ||
    cannot_run "base $BASE has no vendored sources yet ($VENDOR_CU is missing; the wheel has no .cu)"
  "$PY" "$ROOT/scripts/stack.py" check-torch --base "$BASE" --python "$PY" >/dev/null ||
    cannot_run "the default tree is made from base $BASE's torch; $PY's torch is not it"
  "$PY" "$ROOT/scripts/stack.py" base --base "$BASE" --python "$PY" --out "$tree" >/dev/null || rc=$?
  ((rc == 3)) && cannot_run "stack.py base: a tool it needs is missing (see above)"
  ((rc == 0)) || die_usage "stack.py base failed (exit $rc)"
  "$PY" "$ROOT/scripts/stack.py" import --base "$BASE" --base-dir "$tree" || rc=$?
  ((rc == 3)) && cannot_run "stack.py import: a tool it needs is missing (see above)"
  ((rc == 0)) || die_usage "the series does not apply (stack.py import, exit $rc)"
  return 0
}

if [[ -n "$MAKE_TREE" ]]; then
  [[ -z "$TREE" ]] || die_usage "--make-tree and --tree exclude each other"
  [[ -e "$MAKE_TREE" || -L "$MAKE_TREE" ]] &&
    die_usage "--make-tree $MAKE_TREE exists; needs a path that does not"
  make_patched_tree "$MAKE_TREE"
  echo "cxx_check: patched tree at $MAKE_TREE"
  exit 0
fi

NVCC=""
if command -v nvcc >/dev/null 2>&1; then
  NVCC="$(command -v nvcc)"
elif [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
  NVCC="${CUDA_HOME}/bin/nvcc"
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
  NVCC=/usr/local/cuda/bin/nvcc
else
  cannot_run "nvcc not found (not on PATH, not in \$CUDA_HOME/bin or /usr/local/cuda/bin)"
fi
NVCC_VERSION="$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -n1)"

# ---- what the installed torch says --------------------------------------
TORCH_INFO="$("$PY" - <<'PYEOF' 2>/dev/null
import glob
import os

import torch

pkg = os.path.dirname(torch.__file__)
print("TORCH_VERSION=" + torch.__version__)
print("TORCH_GIT=" + str(getattr(torch.version, "git_version", "") or ""))
print("TORCH_CUDA=" + str(torch.version.cuda or ""))
print("TORCH_INC=" + os.path.join(pkg, "include"))
print("CXX11_ABI=" + str(int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))))
for d in sorted(glob.glob(os.path.join(os.path.dirname(pkg), "nvidia", "*", "include"))):
    print("NV_INC=" + d)
PYEOF
)" || cannot_run "'$PY' cannot import torch"

TORCH_VERSION=""
TORCH_GIT=""
TORCH_CUDA=""
TORCH_INC=""
CXX11_ABI=""
NV_INCS=()
while IFS= read -r line; do
  key="${line%%=*}"
  val="${line#*=}"
  case "$key" in
    TORCH_VERSION) TORCH_VERSION="$val" ;;
    TORCH_GIT) TORCH_GIT="$val" ;;
    TORCH_CUDA) TORCH_CUDA="$val" ;;
    TORCH_INC) TORCH_INC="$val" ;;
    CXX11_ABI) CXX11_ABI="$val" ;;
    NV_INC) NV_INCS+=("$val") ;;
  esac
done <<<"$TORCH_INFO"

[[ -n "$TORCH_CUDA" ]] || cannot_run "torch $TORCH_VERSION is not a CUDA build"
[[ -f "$TORCH_INC/$HPP_REL" ]] ||
  cannot_run "torch's headers lack $HPP_REL (looked in $TORCH_INC)"

echo "cxx_check: torch $TORCH_VERSION (git ${TORCH_GIT:-?}, CUDA $TORCH_CUDA), nvcc $NVCC_VERSION ($NVCC)"

# ---- temporary directory ------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cxx_check.XXXXXX")"
cleanup() {
  if [[ "$KEEP" -eq 1 ]]; then
    echo "cxx_check: kept $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

# ---- sources ------------------------------------------------------------
UNPATCHED=0
if [[ -n "$TREE" ]]; then
  [[ -d "$TREE" ]] || die_usage "--tree $TREE: not a directory"
  TREE="$(cd "$TREE" && pwd)"
  [[ -f "$TREE/$CU_REL" ]] || die_usage "--tree $TREE has no $CU_REL"
  if [[ -f "$TREE/$HPP_REL" ]]; then
    echo "cxx_check: sources from --tree $TREE (its $HPP_REL shadows the wheel's)"
  else
    echo "cxx_check: sources from --tree $TREE (no $HPP_REL there: the wheel's header is used)"
  fi
else
  # The patched tree is the repository's own: the pin as a git repo (wheel
  # headers under torch/csrc plus vendor/) with the series applied by git am.
  TREE="$WORK/base"
  make_patched_tree "$TREE"
  if git -C "$TREE" diff --quiet pin-base HEAD -- "$CU_REL" "$HPP_REL"; then
    echo "cxx_check: NOTE: no patch in patches/$BASE/series changes $CU_REL or $HPP_REL;" \
      "compiling the UNPATCHED sources"
    UNPATCHED=1
  else
    echo "cxx_check: compiling $CU_REL with the series' C++ hunks applied"
  fi
fi

# ---- third-party headers the TU reaches ---------------------------------
NVCC_INC="$(cd "$(dirname "$NVCC")/.." && pwd)/include"
SEARCH_DIRS=("${EXTRA_INC[@]+"${EXTRA_INC[@]}"}" "${NV_INCS[@]+"${NV_INCS[@]}"}")
for d in "$DEPS_DIR"/*/nvidia/*/include "$DEPS_DIR"/*/include; do
  [[ -d "$d" ]] && SEARCH_DIRS+=("$d")
done
SEARCH_DIRS+=(/usr/local/cuda/include /usr/include /usr/local/include)

AFTER_DIRS=()
need_header() {
  local header="$1" why="$2" d a
  [[ -f "$NVCC_INC/$header" ]] && return 0
  for d in "${SEARCH_DIRS[@]}"; do
    if [[ -f "$d/$header" ]]; then
      for a in "${AFTER_DIRS[@]+"${AFTER_DIRS[@]}"}"; do
        [[ "$a" == "$d" ]] && return 0
      done
      AFTER_DIRS+=("$d")
      return 0
    fi
  done
  cannot_run "$header (needed by $why) not found in nvcc's include dir, the nvidia-* wheels, build/cxx/deps or /usr/include; see --help"
}
need_header cusparse.h "ATen/cuda/CUDAContextLight.h"
need_header cublas_v2.h "ATen/cuda/CUDAContextLight.h"
need_header cublasLt.h "ATen/cuda/CUDAContextLight.h"
need_header cusolverDn.h "ATen/cuda/CUDAContextLight.h"
need_header nvml.h "c10/cuda/driver_api.h"

# ---- compile -------------------------------------------------------------
# The C++ standard of the base's own build: what its ATen.h insists on.
CXX_STD=c++17
if grep -q 'C++20 or later' "$TORCH_INC/ATen/ATen.h" 2>/dev/null; then
  CXX_STD=c++20
fi
OBJ="$WORK/CUDASymmetricMemory.o"
DEP="$WORK/CUDASymmetricMemory.d"
CMD=(
  "$NVCC" "-std=$CXX_STD" "-arch=$ARCH" -O2 -c "$TREE/$CU_REL" -o "$OBJ"
  -MD -MF "$DEP"
  --expt-relaxed-constexpr --expt-extended-lambda
  -DCUDA_HAS_FP16=1 -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -DUSE_CUDA -DUSE_DISTRIBUTED -DUSE_C10D_NCCL -DUSE_C10D_GLOO
  -DPYTORCH_C10_DRIVER_API_SUPPORTED=1 -DTORCH_CUDA_BUILD_MAIN_LIB
  "-D_GLIBCXX_USE_CXX11_ABI=$CXX11_ABI" -DNDEBUG
  -Xcompiler -fPIC
  -I "$TREE" -I "$TORCH_INC" -I "$TORCH_INC/torch/csrc/api/include"
)
for d in "${AFTER_DIRS[@]+"${AFTER_DIRS[@]}"}"; do
  CMD+=(-Xcompiler -idirafter -Xcompiler "$d")
done

echo "cxx_check: command:"
printf '%q ' "${CMD[@]}"
echo
start_ns="$(date +%s%N)"
rc=0
"${CMD[@]}" || rc=$?
end_ns="$(date +%s%N)"
elapsed="$(awk -v a="$start_ns" -v b="$end_ns" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')"

if [[ "$rc" -ne 0 ]]; then
  echo "cxx_check: FAILED: nvcc exited with $rc after ${elapsed}s (compile error)" >&2
  exit 1
fi

# Show which CUDASymmetricMemory.hpp the compiler actually read.
used_hpp="$(tr -s ' ' '\n' <"$DEP" | grep -F "$HPP_REL" | head -n1 || true)"
echo "cxx_check: header used: ${used_hpp:-?}"
if [[ -f "$TREE/$HPP_REL" && "$used_hpp" != "$TREE/$HPP_REL" ]]; then
  echo "cxx_check: FAILED: expected $TREE/$HPP_REL to shadow the wheel's header" >&2
  exit 1
fi
echo "cxx_check: OK: compiled in ${elapsed}s ($(wc -c <"$OBJ") byte object, arch $ARCH)"

# ---- the probe of the patched CUDAPeerAllocInfo ---------------------------
if ((PROBE == 0)); then
  echo "cxx_check: probe of the patched CUDAPeerAllocInfo not built (--no-probe)"
  exit 0
fi
if ((UNPATCHED)); then
  echo "cxx_check: probe of the patched CUDAPeerAllocInfo not built: the sources are unpatched"
  exit 0
fi
PROBE_ARGS=(--tree "$TREE" --out-dir "$WORK/probe" --nvcc "$NVCC" --arch "$ARCH" --load)
for d in "${AFTER_DIRS[@]+"${AFTER_DIRS[@]}"}"; do
  PROBE_ARGS+=(--idirafter "$d")
done
echo "cxx_check: building the probe of the patched CUDAPeerAllocInfo:"
printf '%q ' "$PY" "$PROBE_PY" "${PROBE_ARGS[@]}"
echo
start_ns="$(date +%s%N)"
rc=0
"$PY" "$PROBE_PY" "${PROBE_ARGS[@]}" || rc=$?
end_ns="$(date +%s%N)"
elapsed="$(awk -v a="$start_ns" -v b="$end_ns" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')"
if ((rc == 3)); then
  echo "cxx_check: probe of the patched CUDAPeerAllocInfo not built: these sources lack patch 5's class (above)"
  exit 0
fi
if ((rc != 0)); then
  echo "cxx_check: FAILED: the probe of the patched CUDAPeerAllocInfo (exit $rc after ${elapsed}s, above)" >&2
  exit 1
fi
echo "cxx_check: OK: probe of the patched CUDAPeerAllocInfo built and loaded in ${elapsed}s"
