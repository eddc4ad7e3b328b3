#!/usr/bin/env bash
# The main job: put patches 1..N of a base's series on that base's PyTorch and
# run LoweringTest on it.  `scripts/apply_and_build.sh --help` explains the modes.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
STACK_LOG_PREFIX=apply
ROOT="$STACK_ROOT"

usage() {
    cat <<'EOF'
Usage: scripts/apply_and_build.sh [MODE] [options]

One series per base: patches/<VERSION>/ holds a base's PIN, series and
patches.  The base is --base VERSION, else $SYMM_STACK_BASE; without either,
the base of the interpreter's torch with --no-venv (a torch no series
supports is refused), else the newest base.

Modes:
  (default)        wheel mode: venv .venv/<VERSION> with the base's wheel (its
                   PIN's TORCH_WHEEL), check it, overlay patches 1..N
                   (stack.py overlay, build/<VERSION>/overlay/N), time the
                   overlay plus `import torch._inductor.lowering`, run LoweringTest
  --source DIR     source mode on an existing PyTorch checkout (env PYTORCH_SRC
                   works too): check it (pinned commit, clean, nothing
                   half-applied), git-am patches 1..N on a new branch
                   symm-mem-stack-N, build it (pip install -e, or --wheel), then
                   run LoweringTest against the built torch
  --clone [DIR]    source mode on a fresh clone of PyTorch at TORCH_GIT_TAG, with
                   submodules, into DIR (default build/<VERSION>/pytorch); an
                   existing checkout there is used as it is
  --installed      test the torch already installed for --python (e.g. a wheel
                   built by source mode): no overlay, no pin check

Options:
  --base VERSION   the base (a directory patches/VERSION/ with PIN and series;
                   default: see above)
  --upto N         patches 1..N (default: every patch in the series; 0 = the stock pin)
  --python PY      interpreter: the venv is made from it, or with --no-venv used
                   as it is
  --no-venv        use --python PY (default python3) as it is: no venv, no pip
                   for this repository's tools (for offline machines)
  --wheel          source mode: build a wheel into DIR/dist and install it,
                   instead of `pip install -e .`
  --no-build       source mode: stop after applying the patches (no build, no tests)
  --no-tests       stop before LoweringTest
  --force          source mode: replace an existing branch symm-mem-stack-N
  --series-dir D   series to apply (default: patches/<VERSION>/)
  --overlay-dir D  overlay root for wheel mode (default: build/<VERSION>/overlay)
  -h, --help       this text

LoweringTest: with a CUDA GPU or more visible, the GPU tier
  timeout ${GPU_TIMEOUT:-1200} PY -m pytest -v test/distributed/test_symm_mem_lowering.py
(no torchrun: the test class spawns one worker per visible GPU, world size 1
included; with NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 unless already set); with no GPU the CPU tier,
pytest test/distributed/test_symm_mem_lowering_cpu.py.
Both run with SYMM_STACK_LEVEL=N.

Environment: SYMM_STACK_BASE (the base when --base is not given), PYTORCH_SRC
(source checkout), GPU_TIMEOUT (seconds, default 1200), SYMM_STACK_PIN_FILE
(another pin file, for tests), SYMM_STACK_PATCHES_ROOT (another patches/, for
tests), and for the source build
MAX_JOBS (default: nproc), TORCH_CUDA_ARCH_LIST (default "9.0"), USE_CUDA,
USE_DISTRIBUTED, CMAKE_* and the rest of PyTorch's build variables, passed
through; ccache is used when installed (CMAKE_{C,CXX,CUDA}_COMPILER_LAUNCHER).

Exit codes: 0 ok, 1 a step failed, 2 bad input or refusal (an unknown --base,
a torch no series supports: one line naming the supported bases, nothing made).
EOF
}

MODE=wheel
UPTO=""
PY_ARG=""
NO_VENV=0
SOURCE=""
SOURCE_ARG=""
CLONE=0
CLONE_DIR=""
WHEEL=0
NO_BUILD=0
NO_TESTS=0
FORCE=0
SERIES_DIR=""
OVERLAY_DIR=""
BASE_ARG="${SYMM_STACK_BASE:-}"
BASE_HOW="SYMM_STACK_BASE $BASE_ARG"

need_value() {
    [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die 2 "$1 needs a value"
}

while (($#)); do
    case "$1" in
        --base) need_value "$@"; BASE_ARG="$2"; BASE_HOW="--base $2"; shift 2 ;;
        --upto) need_value "$@"; UPTO="$2"; shift 2 ;;
        --python) need_value "$@"; PY_ARG="$2"; shift 2 ;;
        --no-venv) NO_VENV=1; shift ;;
        --source) need_value "$@"; SOURCE_ARG="$2"; shift 2 ;;
        --clone)
            CLONE=1
            if [[ $# -ge 2 && -n "$2" && "$2" != -* ]]; then
                CLONE_DIR="$2"
                shift
            fi
            shift
            ;;
        --installed) MODE=installed; shift ;;
        --wheel) WHEEL=1; shift ;;
        --no-build) NO_BUILD=1; shift ;;
        --no-tests) NO_TESTS=1; shift ;;
        --force) FORCE=1; shift ;;
        --series-dir) need_value "$@"; SERIES_DIR="$2"; shift 2 ;;
        --overlay-dir) need_value "$@"; OVERLAY_DIR="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die 2 "unknown argument '$1'; see --help" ;;
    esac
done

# The base: asked for, else (--no-venv, outside source mode) the one of the
# interpreter's torch, else the newest.  Refused here, before anything is made.
if [[ -n "$BASE_ARG" ]]; then
    use_base "$BASE_ARG" "$BASE_HOW"
elif ((NO_VENV)) && ((!CLONE)) && [[ -z "$SOURCE_ARG" && -z "${PYTORCH_SRC:-}" ]]; then
    detect_py="${PY_ARG:-python3}"
    command -v "$detect_py" >/dev/null 2>&1 ||
        die 2 "interpreter $detect_py not found; needs --python PY naming a Python with the torch of a supported base ($(bases_line))"
    detected="$(base_of_torch "$detect_py")" # exits 2 here when it refuses
    use_base "$detected"
else
    use_base ""
fi
SERIES_DIR="${SERIES_DIR:-$BASE_DIR}"
OVERLAY_DIR="${OVERLAY_DIR:-$ROOT/build/$BASE/overlay}"
[[ -d "$SERIES_DIR" ]] || die 2 "--series-dir $SERIES_DIR is not a directory; needs a series (patches/)"
LENGTH="$(series_count "$SERIES_DIR")"
# default: every patch the series has (SERIES_LENGTH once it is complete)
UPTO="${UPTO:-$LENGTH}"
if ! [[ "$UPTO" =~ ^[0-9]+$ ]] || ((10#$UPTO > LENGTH)); then
    die 2 "--upto $UPTO: the series in $SERIES_DIR has $LENGTH patch(es); needs a number 0..$LENGTH"
fi
UPTO=$((10#$UPTO))
if [[ "$MODE" == installed ]]; then
    if ((CLONE)) || [[ -n "$SOURCE_ARG" ]]; then
        die 2 "--installed does not go with --source/--clone; needs one mode"
    fi
elif ((CLONE)); then
    [[ -z "$SOURCE_ARG" ]] || die 2 "--clone and --source both given; needs one"
    MODE=source
elif [[ -n "$SOURCE_ARG" || -n "${PYTORCH_SRC:-}" ]]; then
    SOURCE="${SOURCE_ARG:-$PYTORCH_SRC}"
    MODE=source
fi
if [[ "$MODE" != source ]] && ((WHEEL || NO_BUILD || FORCE)); then
    die 2 "--wheel, --no-build and --force belong to source mode (--source/--clone)"
fi
check_python "$PY_ARG" "$NO_VENV"

# check_source: refuse a --source checkout that apply-source would refuse,
# before anything is made or installed (stack.py apply-source --check).
check_source() {
    local force=() rc=0 err
    [[ -d "$SOURCE" ]] || die 2 "source checkout $SOURCE is not a directory; needs a PyTorch clone"
    SOURCE="$(cd "$SOURCE" && pwd)"
    ((FORCE)) && force=(--force)
    err="$("$CHECK_PY" "$STACK_PY" apply-source --check --source "$SOURCE" --upto "$UPTO" \
        --base "$BASE" --series-dir "$SERIES_DIR" "${force[@]}" 2>&1 >/dev/null)" || rc=$?
    if ((rc != 0)); then
        [[ "$err" == *$'\n'* ]] || die "$rc" "${err#stack.py apply-source: error: }"
        printf '%s\n' "$err" >&2
        exit "$rc"
    fi
}
if [[ "$MODE" == source && -n "$SOURCE" ]]; then
    check_source
fi
export SYMM_STACK_LEVEL="$UPTO"

# ------------------------------------------------------------------ LoweringTest

# lowering_tests: the GPU tier with 1+ GPUs, else the CPU tier; SYMM_STACK_LEVEL
# and PYTHONPATH must already be set.
lowering_tests() {
    local gpus rc=0 file
    gpus="$(gpu_count)"
    cd "$ROOT"
    if ((gpus >= 1)); then
        file=test/distributed/test_symm_mem_lowering.py
        [[ -f "$file" ]] || die 1 "$file not found: the GPU tier of LoweringTest is not written yet"
        multicast_off
        log "GPU tier: $gpus CUDA GPU(s) visible; $file, world size $gpus, level $SYMM_STACK_LEVEL, timeout ${GPU_TIMEOUT:-1200}s"
        timeout -k 30 "${GPU_TIMEOUT:-1200}" "$PY" -m pytest -v -rfEs "$file" || rc=$?
        ((rc == 124 || rc == 137)) && log "GPU tier timed out after ${GPU_TIMEOUT:-1200}s"
    else
        TIER=CPU
        GPU_SKIPPED="no CUDA GPU visible, 1 needed"
        log "GPU tier skipped: $GPU_SKIPPED"
        file=test/distributed/test_symm_mem_lowering_cpu.py
        [[ -f "$file" ]] || die 1 "$file not found: the CPU tier of LoweringTest is not written yet"
        log "CPU tier: $file, level $SYMM_STACK_LEVEL"
        "$PY" -m pytest -v "$file" || rc=$?
        ((rc == 5)) && log "pytest collected no tests: that counts as a failure"
    fi
    if ((rc != 0)); then
        summary "LoweringTest FAILED (exit $rc)"
        exit 1
    fi
    summary "LoweringTest passed"
}

# summary OUTCOME: the job's last line: the outcome, the level, which tier ran
# and, when the GPU tier did not, why.
TIER=GPU
GPU_SKIPPED=""
SUMMARY_DONE=0
summary() {
    local tier=" on the $TIER tier"
    if [[ -n "$GPU_SKIPPED" ]]; then
        tier+=" only (GPU tier not run: $GPU_SKIPPED)"
    fi
    [[ "$1" == LoweringTest* ]] || tier=""
    SUMMARY_DONE=1
    log "summary: $1 at level $UPTO$tier"
}
# on_exit RC: any other way out after the checks above still ends with one.
on_exit() {
    if ((SUMMARY_DONE == 0 && $1 != 0)); then
        summary "FAILED (exit $1) before LoweringTest ran"
    fi
}
trap 'on_exit $?' EXIT

# ------------------------------------------------------------------ wheel mode

wheel_mode() {
    select_python "$PY_ARG" "$NO_VENV" "$(venv_dir)" 1
    "$PY" "$STACK_PY" check-torch --base "$BASE" --python "$PY" >/dev/null
    PYTHONPATH="$(without_overlays)"
    export PYTHONPATH
    local start target
    start="$(now_us)"
    if ((UPTO > 0)); then
        target="$("$PY" "$STACK_PY" overlay --base "$BASE" --upto "$UPTO" --python "$PY" \
            --series-dir "$SERIES_DIR" --out "$OVERLAY_DIR")"
        PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
        log "PYTHONPATH=$PYTHONPATH SYMM_STACK_LEVEL=$UPTO"
    else
        log "level 0: the stock pin, no overlay"
    fi
    (cd "$ROOT" && "$PY" -c 'import torch._inductor.lowering')
    log "overlay + import torch._inductor.lowering: $(seconds_since "$start") s (target: 15 s)"
    if ((NO_TESTS)); then
        summary "overlay and import ready, LoweringTest not run (--no-tests)"
        return 0
    fi
    lowering_tests
}

# ------------------------------------------------------------------ source mode

clone_source() {
    local dir="${CLONE_DIR:-$ROOT/build/$BASE/pytorch}"
    if [[ -e "$dir" ]]; then
        git -C "$dir" rev-parse --git-dir >/dev/null 2>&1 ||
            die 2 "$dir exists and is not a git checkout; needs a free path for --clone"
        log "$dir already exists: using that checkout, not cloning again"
    else
        log "cloning PyTorch $TORCH_GIT_TAG with submodules into $dir"
        mkdir -p "$(dirname "$dir")"
        GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null GIT_TERMINAL_PROMPT=0 \
            git clone --branch "$TORCH_GIT_TAG" --depth 1 --recurse-submodules \
            --shallow-submodules https://github.com/pytorch/pytorch "$dir"
    fi
    SOURCE="$dir"
}

build_source() {
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    if command -v ccache >/dev/null 2>&1; then
        export CMAKE_C_COMPILER_LAUNCHER="${CMAKE_C_COMPILER_LAUNCHER:-ccache}"
        export CMAKE_CXX_COMPILER_LAUNCHER="${CMAKE_CXX_COMPILER_LAUNCHER:-ccache}"
        export CMAKE_CUDA_COMPILER_LAUNCHER="${CMAKE_CUDA_COMPILER_LAUNCHER:-ccache}"
    fi
    local name
    for name in MAX_JOBS TORCH_CUDA_ARCH_LIST USE_CUDA USE_DISTRIBUTED \
        CMAKE_C_COMPILER_LAUNCHER CMAKE_CXX_COMPILER_LAUNCHER CMAKE_CUDA_COMPILER_LAUNCHER; do
        log "build env: $name=${!name-(unset)}"
    done
    log "pip install -r requirements.txt (PyTorch's build requirements)"
    (cd "$SOURCE" && "$PY" -m pip install -r requirements.txt)
    if ((WHEEL)); then
        log "building a wheel into $SOURCE/dist"
        (cd "$SOURCE" && "$PY" -m pip wheel --no-build-isolation --no-deps -v -w dist .)
        local wheel="" candidate
        for candidate in "$SOURCE"/dist/torch-*.whl; do
            if [[ -f "$candidate" && (-z "$wheel" || "$candidate" -nt "$wheel") ]]; then
                wheel="$candidate"
            fi
        done
        [[ -n "$wheel" ]] || die 1 "no torch wheel in $SOURCE/dist after the build"
        log "installing $wheel"
        "$PY" -m pip install --force-reinstall --no-deps "$wheel"
    else
        log "building in place: pip install --no-build-isolation -v -e ."
        (cd "$SOURCE" && "$PY" -m pip install --no-build-isolation -v -e .)
    fi
}

source_mode() {
    if ((CLONE)); then
        clone_source
        check_source
    fi
    select_python "$PY_ARG" "$NO_VENV" "$ROOT/build/venv-source" 0
    local force=()
    ((FORCE)) && force=(--force)
    "$PY" "$STACK_PY" apply-source --source "$SOURCE" --upto "$UPTO" --base "$BASE" \
        --series-dir "$SERIES_DIR" "${force[@]}" >/dev/null
    if ((NO_BUILD)); then
        summary "branch symm-mem-stack-$UPTO made in $SOURCE, not built, LoweringTest not run (--no-build)"
        return 0
    fi
    build_source
    PYTHONPATH="$(without_overlays)"
    export PYTHONPATH
    report_torch built
    if ((NO_TESTS)); then
        summary "torch built, LoweringTest not run (--no-tests)"
        return 0
    fi
    lowering_tests
}

# ------------------------------------------------------------------ installed mode

installed_mode() {
    select_python "$PY_ARG" "$NO_VENV" "$(venv_dir)" 1
    PYTHONPATH="$(without_overlays)"
    export PYTHONPATH
    report_torch installed
    if ((NO_TESTS)); then
        summary "nothing to do, LoweringTest not run (--installed with --no-tests)"
        return 0
    fi
    lowering_tests
}

log "mode: $MODE, base $BASE, patches 1..$UPTO, pin $TORCH_GIT_TAG (${TORCH_GIT_COMMIT:0:12})"
case "$MODE" in
    wheel) wheel_mode ;;
    source) source_mode ;;
    installed) installed_mode ;;
esac
