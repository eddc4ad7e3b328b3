#!/usr/bin/env bash
# The repository's test command (.ci/run execs it).  `--help` lists the steps.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
STACK_LOG_PREFIX="test"
ROOT="$STACK_ROOT"

usage() {
    cat <<'EOF'
Usage: scripts/test.sh [--base VERSION]... [--python PY] [--no-venv] [--jobs N]

Runs the checks of every supported base (patches/<VERSION>/ with PIN and
series; --base VERSION, or $SYMM_STACK_BASE, restricts them to one; --base
may be given more than once).  Per
base it sets up .venv/<VERSION> (that base's torch wheel plus
requirements-dev.txt, as scripts/apply_and_build.sh does).  Once:
  lint (newest base's venv): ruff check and ruff format --check on
     conftest.py, scripts/, test/ (and benchmarks/); shellcheck on
     scripts/*.sh and .ci/run; actionlint and zizmor on .github/workflows/*.yml
  pytest test/tooling (the toolchain's own tests; oldest base's venv)
Then per base V (step names start "V: "):
  lint: `stack.py lint-patched` on the patched torch files of the full
     overlay (no ruff diagnostics or formatting drift beyond their originals)
  series integrity: `stack.py base` then `stack.py check-series`
  C++ compile check: scripts/cxx_check.sh --base V (exit 3: cannot run here,
     e.g. no vendored sources for V, reported as skipped)
  the CPU tier (every test/distributed/test_symm_mem_*_cpu.py) at every
     series level 0..N (N = patches in V's series): level 0 on the stock
     torch, level L on overlay L (build/V/overlay/L), SYMM_STACK_LEVEL=L;
     up to --jobs levels at a time (their output is shown when each ends)

A skipped step (tool or file not there yet) counts as neither passed nor
failed and is listed with its reason.

The summary lists every step, then one line per base and one for the steps
run once ("2.11.0: steps: P passed, F failed, S skipped; tests: N passed, M
failed, K skipped").  The line before last counts all steps: "steps: P
passed, F failed, S skipped".  The last line, "N passed, M failed, K skipped",
sums pytest's own test totals over every pytest step (failed includes
errors).  The exit status is 1 if any step failed or none passed.

Options:
  --base VERSION  only this base (repeatable)
  --python PY     make the venvs from PY; with --no-venv use PY as it is (then,
                  without --base, only the base of PY's torch is tested)
  --no-venv       no venv and no pip (tools missing there are skipped, loudly)
  --jobs N        CPU-tier levels run at a time (default: 2 with 2 cores or
                  more, else 1)
  -h, --help      this text
EOF
}

PY_ARG=""
NO_VENV=0
BASE_ARGS=()
JOBS=""
while (($#)); do
    case "$1" in
        --python | --base | --jobs)
            [[ $# -ge 2 && -n "$2" ]] || die 2 "$1 needs a value"
            case "$1" in
                --python) PY_ARG="$2" ;;
                --base) BASE_ARGS+=("$2") ;;
                --jobs) JOBS="$2" ;;
            esac
            shift 2
            ;;
        --no-venv) NO_VENV=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die 2 "unknown argument '$1'; see --help" ;;
    esac
done
if [[ -z "$JOBS" ]]; then
    JOBS=1
    (($(nproc) >= 2)) && JOBS=2
fi
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die 2 "--jobs is '$JOBS'; needs a number >= 1"

# The bases to test, oldest first; refused (exit 2, one line) before anything
# is made.
BASES=()
if ((${#BASE_ARGS[@]})); then
    for b in "${BASE_ARGS[@]}"; do
        use_base "$b" "--base $b"
        BASES+=("$b")
    done
elif [[ -n "${SYMM_STACK_BASE:-}" ]]; then
    use_base "$SYMM_STACK_BASE" "SYMM_STACK_BASE $SYMM_STACK_BASE"
    BASES=("$BASE")
elif ((NO_VENV)); then
    command -v "${PY_ARG:-python3}" >/dev/null 2>&1 ||
        die 2 "interpreter ${PY_ARG:-python3} not found; needs --python PY with the torch of a supported base"
    detected="$(base_of_torch "${PY_ARG:-python3}")" # exits 2 here when it refuses
    BASES=("$detected")
else
    mapfile -t BASES < <(supported_bases)
    ((${#BASES[@]})) || use_base ""
fi

# Each base's interpreter: its venv (made or refreshed now), or PY as it is.
# The interpreters are checked first, so that a bad one is refused before
# any venv is made.
declare -A PYS=()
for b in "${BASES[@]}"; do
    use_base "$b"
    check_python "$PY_ARG" "$NO_VENV"
done
for dir in "$PATCHES_ROOT"/*/; do
    dir="${dir%/}"
    if [[ -f "$dir/PIN" && ! -f "$dir/series" ]]; then
        log "note: base ${dir##*/} has a PIN but no series yet: not tested"
    fi
done
for b in "${BASES[@]}"; do
    use_base "$b"
    select_python "$PY_ARG" "$NO_VENV" "$(venv_dir)" 1
    PYS[$b]="$PY"
done
cd "$ROOT"
PYTHONPATH="$(without_overlays)"
export PYTHONPATH
unset SYMM_STACK_LEVEL SYMM_STACK_BASE

# The CPU tier: LoweringTest and the CPU tests of every other level.
CPU_TIER=(test/distributed/test_symm_mem_*_cpu.py)
PASSED=()
FAILED=()
SKIPPED=()
# Per group (a base, or "common" for the steps run once): "P F K" step counts.
declare -A GROUP_STEPS=()
GROUP=common

# count_step NAME RC SECONDS: file a finished step under passed, skipped (rc 3
# with a reason in $SKIP_FILE) or failed, for the summary and for $GROUP.
count_step() {
    local name=$1 rc=$2 took=$3 p f k
    read -r p f k <<<"${GROUP_STEPS[$GROUP]:-0 0 0}"
    if ((rc == 0)); then
        PASSED+=("$name")
        p=$((p + 1))
        log "PASS $name ($took s)"
    elif ((rc == 3)) && [[ -f "$SKIP_FILE" ]]; then
        SKIPPED+=("$name: $(cat "$SKIP_FILE")")
        k=$((k + 1))
        log "SKIP $name: $(cat "$SKIP_FILE")"
    else
        FAILED+=("$name (exit $rc)")
        f=$((f + 1))
        log "FAIL $name (exit $rc, $took s)"
    fi
    GROUP_STEPS[$GROUP]="$p $f $k"
}

# step NAME FUNCTION [ARGS...]: run FUNCTION with errexit on; it returns 0
# (pass), 3 (skipped, reason in $SKIP_FILE) or anything else (fail).
step() {
    local name=$1 start rc
    shift
    log "==> $name"
    start="$(now_us)"
    SKIP_FILE="$STEP_DIR/skip"
    rm -f "$SKIP_FILE"
    set +e
    (
        set -e
        "$@"
    )
    rc=$?
    set -e
    count_step "$name" "$rc" "$(seconds_since "$start")"
}

# bg_step NAME FUNCTION [ARGS...]: as step, in the background (at most $JOBS
# at a time), its output kept in a file until bg_wait shows it.  The step sees
# the globals (PY, BASE, ...) as they are when it starts.
BG_NAMES=()
BG_GROUPS=()
bg_step() {
    local name=$1 n=${#BG_NAMES[@]}
    shift
    BG_NAMES[n]="$name"
    BG_GROUPS[n]="$GROUP"
    while (($(jobs -rp | wc -l) >= JOBS)); do
        wait -n || true
    done
    log "started: $name"
    (
        SKIP_FILE="$STEP_DIR/skip.$n"
        start="$(now_us)"
        set +e
        (
            set -e
            "$@"
        ) >"$STEP_DIR/out.$n" 2>&1
        echo $? >"$STEP_DIR/rc.$n"
        seconds_since "$start" >"$STEP_DIR/took.$n"
    ) &
}

# bg_wait: wait for the background steps, then show each one's output and
# outcome in the order they were started.
bg_wait() {
    local n saved=$GROUP
    wait
    for n in "${!BG_NAMES[@]}"; do
        log "==> ${BG_NAMES[n]} (ran in the background; its output:)"
        cat "$STEP_DIR/out.$n"
        SKIP_FILE="$STEP_DIR/skip.$n"
        GROUP="${BG_GROUPS[n]}"
        count_step "${BG_NAMES[n]}" "$(cat "$STEP_DIR/rc.$n" 2>/dev/null || echo 1)" \
            "$(cat "$STEP_DIR/took.$n" 2>/dev/null || echo '?')"
    done
    GROUP=$saved
    BG_NAMES=()
    BG_GROUPS=()
}

# skipped REASON: from inside a step, end it as skipped.
skipped() {
    echo "$1" >"$SKIP_FILE"
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
# totals are appended to $STEP_DIR/totals.$GROUP (conftest.py writes them).
pytest_run() {
    local rc=0
    SYMM_STACK_PYTEST_TOTALS="$STEP_DIR/totals.$GROUP" "$PY" -m pytest -q -p no:cacheprovider "$@" || rc=$?
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
    n="$(series_count "$BASE_DIR")"
    ((n > 0)) || skipped "the series has no patches yet"
    "$PY" "$STACK_PY" lint-patched --base "$BASE" --python "$PY" --upto "$n" || {
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
    "$PY" "$STACK_PY" base --base "$BASE" --python "$PY" >/dev/null
    "$PY" "$STACK_PY" check-series --base "$BASE"
}

tooling_tests() {
    [[ -d test/tooling ]] || skipped "no test/tooling directory"
    pytest_run test/tooling
}

# cxx_deps: nvcc's toolkit here lacks nvml.h (needed by c10/cuda/driver_api.h):
# NVIDIA ships it on PyPI; cxx_check.sh looks for it under build/cxx/deps.
# Installed once, before the C++ checks of the bases run side by side.
cxx_deps() {
    if ((NO_VENV == 0)) && [[ ! -f build/cxx/deps/nvml/nvidia/cu13/include/nvml.h ]] \
        && command -v nvcc >/dev/null; then
        "$PY" -m pip install -q --no-deps --target build/cxx/deps/nvml \
            'nvidia-nvml-dev==13.0.*' || log "could not install nvidia-nvml-dev"
    fi
}

cxx_check() {
    local rc=0
    [[ -f scripts/cxx_check.sh ]] || skipped "scripts/cxx_check.sh is not written yet"
    bash scripts/cxx_check.sh --base "$BASE" --python "$PY" || rc=$?
    ((rc == 3)) && skipped "scripts/cxx_check.sh says it cannot run here (exit 3; reason above)"
    return "$rc"
}

cpu_tier() {
    local level=$1 target
    [[ -f "${CPU_TIER[0]}" ]] || skipped "no test/distributed/test_symm_mem_*_cpu.py yet"
    if ((level > 0)); then
        target="$("$PY" "$STACK_PY" overlay --base "$BASE" --python "$PY" --upto "$level")"
        export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
    fi
    SYMM_STACK_LEVEL="$level" pytest_run "${CPU_TIER[@]}"
}

STEP_DIR="$(mktemp -d)"
trap 'rm -rf "$STEP_DIR"' EXIT

# Once, with the newest base's interpreter: the lints of this repository.
NEWEST="${BASES[-1]}"
use_base "$NEWEST"
PY="${PYS[$NEWEST]}"
GROUP=common
step "lint: ruff check" lint_ruff_check
step "lint: ruff format" lint_ruff_format
step "lint: shellcheck" lint_shellcheck
step "lint: actionlint" lint_actionlint
step "lint: zizmor" lint_zizmor
# Per base, the quick steps; lint-patched also makes the full overlay that the
# CPU tier's last level then finds up to date.
for b in "${BASES[@]}"; do
    use_base "$b"
    PY="${PYS[$b]}"
    GROUP="$b"
    step "$b: lint: patched torch files vs pin" lint_patched
    step "$b: series integrity" series_integrity
done
cxx_deps
# The long steps, $JOBS at a time: the toolchain tests (once, with the oldest
# base tested: their fixtures hold line numbers and blob ids of 2.11.0's
# comm_lowering.py), then per base the C++ check and the CPU tier at every level.
use_base "${BASES[0]}"
PY="${PYS[${BASES[0]}]}"
GROUP=common
bg_step "toolchain tests (test/tooling)" tooling_tests
for b in "${BASES[@]}"; do
    use_base "$b"
    PY="${PYS[$b]}"
    GROUP="$b"
    bg_step "$b: C++ compile check" cxx_check
    LEVELS="$(series_count "$BASE_DIR")"
    for ((level = 0; level <= LEVELS; level++)); do
        bg_step "$b: CPU tier, series level $level" cpu_tier "$level"
    done
done
bg_wait

# totals FILE: "P F K", the sum of the pytest totals appended to FILE.
totals() {
    local p=0 f=0 k=0 passed failed skipped
    if [[ -f "$1" ]]; then
        while read -r passed failed skipped; do
            p=$((p + passed)) f=$((f + failed)) k=$((k + skipped))
        done <"$1"
    fi
    echo "$p $f $k"
}

echo
echo "==================== scripts/test.sh summary ===================="
for name in "${PASSED[@]}"; do echo "PASS  $name"; done
for name in "${SKIPPED[@]}"; do echo "SKIP  $name"; done
for name in "${FAILED[@]}"; do echo "FAIL  $name"; done
if ((${#PASSED[@]} == 0)); then
    echo "no step passed: nothing was tested"
fi
tests_passed=0 tests_failed=0 tests_skipped=0
for g in common "${BASES[@]}"; do
    read -r sp sf sk <<<"${GROUP_STEPS[$g]:-0 0 0}"
    read -r tp tf tk < <(totals "$STEP_DIR/totals.$g")
    label="base $g"
    [[ "$g" == common ]] && label="all bases (lint, test/tooling)"
    echo "$label: steps: $sp passed, $sf failed, $sk skipped; tests: $tp passed, $tf failed, $tk skipped"
    tests_passed=$((tests_passed + tp))
    tests_failed=$((tests_failed + tf))
    tests_skipped=$((tests_skipped + tk))
done
echo "steps: ${#PASSED[@]} passed, ${#FAILED[@]} failed, ${#SKIPPED[@]} skipped"
echo "$tests_passed passed, $tests_failed failed, $tests_skipped skipped"
if ((${#FAILED[@]} > 0 || ${#PASSED[@]} == 0)); then
    exit 1
fi
