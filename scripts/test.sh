#!/usr/bin/env bash
# The repository's test command (.ci/run execs it).  `--help` lists the steps.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
STACK_LOG_PREFIX="test"
ROOT="$STACK_ROOT"

usage() {
    cat <<'EOF'
Usage: scripts/test.sh [--python PY] [--no-venv]

Sets up .venv (the pinned torch wheel plus requirements-dev.txt, as
scripts/apply_and_build.sh does) and runs, reporting each step:
  1. lint: ruff check and ruff format --check on conftest.py, scripts/, test/
     (and benchmarks/); `stack.py lint-patched` on the patched torch files of the
     full overlay (no ruff diagnostics or formatting drift beyond their pinned
     originals); shellcheck on scripts/*.sh and .ci/run; actionlint and zizmor
     on .github/workflows/*.yml
  2. series integrity: `stack.py base` then `stack.py check-series`
  3. pytest test/tooling (the toolchain's own tests)
  4. C++ compile check: scripts/cxx_check.sh --python PY (exit 3: cannot run
     here, reported as skipped)
  5. the CPU tier (every test/distributed/test_symm_mem_*_cpu.py) at every
     series level 0..N (N = patches in the series): level 0 on the stock pin,
     level L on overlay L

A skipped step (tool or file not there yet) counts as neither passed nor
failed and is listed with its reason.

The line before last counts steps: "steps: P passed, F failed, S skipped".
The last line, "N passed, M failed, K skipped", sums pytest's own test totals
over every pytest step (failed includes errors).  The exit status is 1 if any
step failed or none passed.

Options:
  --python PY   make the venv from PY; with --no-venv use PY as it is
  --no-venv     no venv and no pip (tools missing there are skipped, loudly)
  -h, --help    this text
EOF
}

PY_ARG=""
NO_VENV=0
while (($#)); do
    case "$1" in
        --python)
            [[ $# -ge 2 && -n "$2" ]] || die 2 "--python needs a value"
            PY_ARG="$2"
            shift 2
            ;;
        --no-venv) NO_VENV=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die 2 "unknown argument '$1'; see --help" ;;
    esac
done

load_pin
select_python "$PY_ARG" "$NO_VENV" "$ROOT/.venv" 1
cd "$ROOT"
PYTHONPATH="$(without_overlays)"
export PYTHONPATH
unset SYMM_STACK_LEVEL

SERIES_DIR="$ROOT/patches"
# The CPU tier: LoweringTest and the CPU tests of every other level.
CPU_TIER=(test/distributed/test_symm_mem_*_cpu.py)
PASSED=()
FAILED=()
SKIPPED=()

# step NAME FUNCTION [ARGS...]: run FUNCTION with errexit on; it returns 0
# (pass), 3 (skipped, reason in $STEP_DIR/skip) or anything else (fail).
step() {
    local name=$1 start rc
    shift
    log "==> $name"
    start="$(now_us)"
    rm -f "$STEP_DIR/skip"
    set +e
    (
        set -e
        "$@"
    )
    rc=$?
    set -e
    if ((rc == 0)); then
        PASSED+=("$name")
        log "PASS $name ($(seconds_since "$start") s)"
    elif ((rc == 3)) && [[ -f "$STEP_DIR/skip" ]]; then
        SKIPPED+=("$name: $(cat "$STEP_DIR/skip")")
        log "SKIP $name: $(cat "$STEP_DIR/skip")"
    else
        FAILED+=("$name (exit $rc)")
        log "FAIL $name (exit $rc, $(seconds_since "$start") s)"
    fi
}

# skipped REASON: from inside a step, end it as skipped.
skipped() {
    echo "$1" >"$STEP_DIR/skip"
    exit 3
}

# tool NAME: path of NAME (beside $PY, else on PATH); without it the step is
# skipped under --no-venv and failed otherwise, since .venv must have it.
tool() {
    local found
    if found="$(find_tool "$1")"; then
        echo "$found"
    elif ((NO_VENV)); then
        skipped "$1 is not installed for $PY or on PATH (--no-venv installs nothing)"
    else
        log "$1 is missing from the venv; requirements-dev.txt should provide it"
        exit 1
    fi
}

# pytest_run ARGS...: pytest -q; "no tests ran" (exit 5) is a failure.  Its
# totals are appended to $TOTALS (conftest.py writes them).
pytest_run() {
    local rc=0
    SYMM_STACK_PYTEST_TOTALS="$TOTALS" "$PY" -m pytest -q -p no:cacheprovider "$@" || rc=$?
    if ((rc == 5)); then
        log "pytest ran no tests: counted as a failure"
        return 1
    fi
    return "$rc"
}

python_dirs() {
    local dir
    for dir in conftest.py scripts test benchmarks; do
        [[ -e "$dir" ]] && echo "$dir"
    done
}

lint_ruff_check() {
    local ruff
    ruff="$(tool ruff)"
    mapfile -t dirs < <(python_dirs)
    "$ruff" check --no-cache "${dirs[@]}"
}

lint_ruff_format() {
    local ruff
    ruff="$(tool ruff)"
    mapfile -t dirs < <(python_dirs)
    "$ruff" format --check --no-cache "${dirs[@]}"
}

lint_patched() {
    local n
    n="$(series_count "$SERIES_DIR")"
    ((n > 0)) || skipped "the series has no patches yet"
    "$PY" "$STACK_PY" lint-patched --python "$PY" --upto "$n" || {
        local rc=$?
        ((rc == 3)) && skipped "ruff is not available to stack.py"
        return "$rc"
    }
}

lint_shellcheck() {
    local shellcheck files=()
    shellcheck="$(tool shellcheck)"
    shopt -s nullglob
    files=(scripts/*.sh .ci/run)
    shopt -u nullglob
    "$shellcheck" -x "${files[@]}"
}

# >>> actionlint hook: how actionlint gets installed (owned by the lint-tools
# script's author; this only calls it).  Prints the path of actionlint.
install_actionlint() {
    local found
    if found="$(find_tool actionlint)"; then
        echo "$found"
        return 0
    fi
    if [[ -x "$ROOT/scripts/install_lint_tools.sh" ]] &&
        "$ROOT/scripts/install_lint_tools.sh" --quiet >&2 &&
        [[ -x "$ROOT/build/tools/bin/actionlint" ]]; then
        echo "$ROOT/build/tools/bin/actionlint"
        return 0
    fi
    return 1
}
# <<< actionlint hook

workflows() {
    shopt -s nullglob
    local files=(.github/workflows/*.yml .github/workflows/*.yaml)
    shopt -u nullglob
    ((${#files[@]})) || skipped "no .github/workflows/*.yml yet"
    printf '%s\n' "${files[@]}"
}

lint_actionlint() {
    local actionlint
    mapfile -t files < <(workflows)
    ((${#files[@]})) || skipped "no .github/workflows/*.yml yet"
    if ! actionlint="$(install_actionlint)"; then
        log "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
        log "!!! ACTIONLINT IS NOT AVAILABLE: the workflows were NOT actionlinted !!!"
        log "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
        skipped "actionlint could not be installed (see install_actionlint in scripts/test.sh)"
    fi
    "$actionlint" "${files[@]}"
}

lint_zizmor() {
    local zizmor
    mapfile -t files < <(workflows)
    ((${#files[@]})) || skipped "no .github/workflows/*.yml yet"
    zizmor="$(tool zizmor)"
    local color=never
    [[ -t 1 ]] && color=auto # with CI set, zizmor's auto colours a pipe too
    "$zizmor" --offline --no-progress --color "$color" "${files[@]}"
}

series_integrity() {
    "$PY" "$STACK_PY" base --python "$PY" >/dev/null
    "$PY" "$STACK_PY" check-series
}

tooling_tests() {
    [[ -d test/tooling ]] || skipped "no test/tooling directory"
    pytest_run test/tooling
}

cxx_check() {
    local rc=0
    [[ -f scripts/cxx_check.sh ]] || skipped "scripts/cxx_check.sh is not written yet"
    # nvcc's toolkit here lacks nvml.h (needed by c10/cuda/driver_api.h):
    # NVIDIA ships it on PyPI; cxx_check.sh looks for it under build/cxx/deps.
    if ((NO_VENV == 0)) && [[ ! -f build/cxx/deps/nvml/nvidia/cu13/include/nvml.h ]] \
        && command -v nvcc >/dev/null; then
        "$PY" -m pip install -q --no-deps --target build/cxx/deps/nvml \
            'nvidia-nvml-dev==13.0.*' || log "could not install nvidia-nvml-dev"
    fi
    bash scripts/cxx_check.sh --python "$PY" || rc=$?
    ((rc == 3)) && skipped "scripts/cxx_check.sh says it cannot run here (exit 3; reason above)"
    return "$rc"
}

cpu_tier() {
    local level=$1 target
    [[ -f "${CPU_TIER[0]}" ]] || skipped "no test/distributed/test_symm_mem_*_cpu.py yet"
    if ((level > 0)); then
        target="$("$PY" "$STACK_PY" overlay --python "$PY" --upto "$level")"
        export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
    fi
    SYMM_STACK_LEVEL="$level" pytest_run "${CPU_TIER[@]}"
}

STEP_DIR="$(mktemp -d)"
trap 'rm -rf "$STEP_DIR"' EXIT
TOTALS="$STEP_DIR/pytest-totals"
: >"$TOTALS"

step "lint: ruff check" lint_ruff_check
step "lint: ruff format" lint_ruff_format
step "lint: patched torch files vs pin" lint_patched
step "lint: shellcheck" lint_shellcheck
step "lint: actionlint" lint_actionlint
step "lint: zizmor" lint_zizmor
step "series integrity" series_integrity
step "toolchain tests (test/tooling)" tooling_tests
step "C++ compile check" cxx_check
LEVELS="$(series_count "$SERIES_DIR")"
for ((level = 0; level <= LEVELS; level++)); do
    step "CPU tier, series level $level" cpu_tier "$level"
done

echo
echo "==================== scripts/test.sh summary ===================="
for name in "${PASSED[@]}"; do echo "PASS  $name"; done
for name in "${SKIPPED[@]}"; do echo "SKIP  $name"; done
for name in "${FAILED[@]}"; do echo "FAIL  $name"; done
if ((${#PASSED[@]} == 0)); then
    echo "no step passed: nothing was tested"
fi
echo "steps: ${#PASSED[@]} passed, ${#FAILED[@]} failed, ${#SKIPPED[@]} skipped"
tests_passed=0 tests_failed=0 tests_skipped=0
while read -r passed failed skipped; do
    tests_passed=$((tests_passed + passed))
    tests_failed=$((tests_failed + failed))
    tests_skipped=$((tests_skipped + skipped))
done <"$TOTALS"
echo "$tests_passed passed, $tests_failed failed, $tests_skipped skipped"
if ((${#FAILED[@]} > 0 || ${#PASSED[@]} == 0)); then
    exit 1
fi
