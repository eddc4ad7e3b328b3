#!/usr/bin/env bash
# The GPU tier of every patch, level by level, on the visible CUDA GPUs (1 or
# more).  `--help` says more.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
STACK_LOG_PREFIX="gpu-tier"
ROOT="$STACK_ROOT"

usage() {
    cat <<'EOF'
Usage: scripts/gpu_tier.sh [--base VERSION] [--python PY] [--levels "L ..."] [--installed]
                           [--timeout S] [--logs DIR] [--series-dir DIR]
                           [-- PYTEST_ARGS...]

The base: --base VERSION, else $SYMM_STACK_BASE, else the base whose
TORCH_VERSION is the release of PY's torch (a torch no series supports is
refused, exit 2, one line naming the supported bases).

For each level L (default: 0 1 .. N, N = patches in the base's series), runs
  PY -m pytest -v -rfEs \
      test/distributed/test_symm_mem_{lowering,cudagraphs,partition,allocator}.py
on `PY` (default python3, used as it is: nothing is installed) with the
overlay of patches 1..L (`stack.py overlay`, under build/VERSION/overlay) on
PYTHONPATH and SYMM_STACK_LEVEL=L, under `timeout S` (default 300) per level,
with NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
NVSHMEM_DISABLE_NVLS=1 (unless set otherwise).  No torchrun: each test class
(MultiProcContinuousTest) spawns one worker per visible CUDA GPU, so the world
size is the number of GPUs PY's torch sees (set CUDA_VISIBLE_DEVICES to choose
them); 1 GPU is enough, and the tests that need two ranks skip below 2.  Then,
once, the one-GPU runtime check of patch 5's C++ change,
`pytest test/distributed/cxx/test_peer_alloc_info.py` (its fix-specific checks
are expected failures on a torch without the fix).

--installed tests the torch installed for PY as it is (a wheel built by
source mode): no overlay and no pin check, one level (default N, the level the
build is taken to hold).

Each run's full log goes to DIR/<run>.log (default build/VERSION/gpu-tier: L<L>.log,
cxx.log).  Per run, one summary line from pytest's, e.g.
  L3 (world size 1): 30 passed, 2 skipped in 41.20s
After a test fails, MultiProcContinuousTest reports the rest of its class as
skipped ("Previous test failed, skipping ..."): those count as failed here,
not skipped, and fail the run even if pytest's exit status was 0.  The last
line is "P passed, F failed", counting runs (a level whose overlay cannot be
built counts as failed); the exit status is 1 if any run failed or timed out,
2 on bad input, 3 without a CUDA GPU.

PY needs the base's torch (patches/VERSION/PIN; checked unless --installed), unidiff importable
(stack.py uses it for overlays), pytest and expecttest; nvcc for the C++ check
(without it, that check skips).
EOF
}

PY=python3
LEVELS=""
TIMEOUT=300
LOGS=""
SERIES_DIR=""
BASE_ARG="${SYMM_STACK_BASE:-}"
BASE_HOW="SYMM_STACK_BASE $BASE_ARG"
PYTEST_EXTRA=()
INSTALLED=0
while (($#)); do
    case "$1" in
        --installed) INSTALLED=1; shift ;;
        --python | --levels | --timeout | --logs | --series-dir | --base)
            [[ $# -ge 2 && -n "$2" ]] || die 2 "$1 needs a value"
            case "$1" in
                --base) BASE_ARG="$2"; BASE_HOW="--base $2" ;;
                --python) PY="$2" ;;
                --levels) LEVELS="$2" ;;
                --timeout) TIMEOUT="$2" ;;
                --logs) LOGS="$2" ;;
                --series-dir) SERIES_DIR="$2" ;;
            esac
            shift 2
            ;;
        --) shift; PYTEST_EXTRA=("$@"); break ;;
        -h | --help) usage; exit 0 ;;
        *) die 2 "unknown argument '$1'; see --help" ;;
    esac
done

if [[ -n "$BASE_ARG" ]]; then
    use_base "$BASE_ARG" "$BASE_HOW"
else
    command -v "$PY" >/dev/null 2>&1 || die 2 "interpreter $PY not found; needs --python PY"
    detected="$(base_of_torch "$PY")" # exits 2 here when it refuses
    use_base "$detected"
fi
SERIES_DIR="${SERIES_DIR:-$BASE_DIR}"
LOGS="${LOGS:-$ROOT/build/$BASE/gpu-tier}"
cd "$ROOT"
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die 2 "--timeout is '$TIMEOUT'; needs seconds"
N="$(series_count "$SERIES_DIR")"
if [[ -z "$LEVELS" ]]; then
    if ((INSTALLED)); then LEVELS="$N"; else LEVELS="$(seq -s ' ' 0 "$N")"; fi
fi
for lvl in $LEVELS; do
    if ! [[ "$lvl" =~ ^[0-9]+$ ]] || ((lvl > N)); then
        die 2 "level '$lvl' is not in 0..$N (patches in $SERIES_DIR)"
    fi
done
if ((INSTALLED)) && [[ "$LEVELS" == *" "* ]]; then
    die 2 "--installed tests one build: give one level, not '$LEVELS'"
fi
command -v "$PY" >/dev/null 2>&1 || die 2 "interpreter $PY not found; needs --python PY"
BASE_PYTHONPATH="$(without_overlays)"
if ((INSTALLED)); then
    PYTHONPATH="$BASE_PYTHONPATH" report_torch installed
else
    PYTHONPATH="$BASE_PYTHONPATH" "$PY" "$STACK_PY" check-torch --base "$BASE" --python "$PY" >/dev/null
fi
gpus="$(PYTHONPATH="$BASE_PYTHONPATH" gpu_count)"
((gpus >= 1)) || die 3 "the GPU tier needs a CUDA GPU; $PY's torch sees none"

FILES=(test/distributed/test_symm_mem_{lowering,cudagraphs,partition,allocator}.py)
multicast_off
export PYTHONUNBUFFERED=1
mkdir -p "$LOGS"
passed=0
failed=0

# pytest's reason for a test skipped because an earlier test of its class failed
POISON='Previous test failed, skipping'

# tally LOGFILE: print pytest's last summary line of LOGFILE ("1 failed,
# 3 passed, 6 skipped in 8.04s") with the poison-pill skips (POISON, from the
# -rs lines) moved from skipped to failed, and their number on a line of its own.
tally() {
    awk -v poison="$POISON" '
        /^SKIPPED \[[0-9]+\] / && index($0, poison) {
            n = $2; gsub(/[^0-9]/, "", n); poisoned += n
        }
        /^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* in / { last = $0 }
        END {
            line = last
            sub(/^=+ /, "", line); sub(/ =+$/, "", line)
            timing = ""
            if (match(line, / in [0-9.]+s.*$/)) {
                timing = substr(line, RSTART); line = substr(line, 1, RSTART - 1)
            }
            k = split(line, items, ", ")
            out = ""; have_failed = 0
            for (i = 1; i <= k; i++) {
                split(items[i], f, " ")
                if (f[2] == "failed") { f[1] += poisoned; have_failed = 1 }
                if (f[2] == "skipped") f[1] -= poisoned
                if (f[2] == "skipped" && f[1] == 0) continue
                item = f[1] " " substr(items[i], index(items[i], " ") + 1)
                out = out (out == "" ? "" : ", ") item
            }
            if (!have_failed && poisoned > 0)
                out = poisoned " failed" (out == "" ? "" : ", " out)
            if (last == "") out = "no pytest summary"
            print out timing
            print poisoned + 0
        }' "$1"
}

# record NAME LOGFILE RC [WORLD]: count a run, print its summary line
record() {
    local name=$1 logfile=$2 rc=$3 world=${4:-} summary poisoned
    { read -r summary && read -r poisoned; } < <(tally "$logfile")
    echo "  $name${world:+ (world size $world)}: $summary"
    if ((poisoned > 0)); then
        log "$name: $poisoned test(s) skipped after an earlier failure in their class: counted as failed"
        ((rc != 0)) || rc=1
    fi
    if ((rc == 0)); then
        passed=$((passed + 1))
    else
        ((rc == 124 || rc == 137)) && log "$name timed out after ${TIMEOUT}s"
        log "$name failed (exit $rc); see $logfile"
        failed=$((failed + 1))
    fi
}

for lvl in $LEVELS; do
    path="$BASE_PYTHONPATH"
    logfile="$LOGS/L$lvl.log"
    if ((lvl > 0 && !INSTALLED)); then
        # a level whose overlay cannot be built fails; the others still run
        if ! overlay="$(PYTHONPATH="$BASE_PYTHONPATH" "$PY" "$STACK_PY" overlay \
            --base "$BASE" --python "$PY" --upto "$lvl" --series-dir "$SERIES_DIR" 2>"$logfile")"; then
            record "L$lvl" "$logfile" 1
            continue
        fi
        path="$overlay${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}"
    fi
    log "level $lvl: ${#FILES[@]} files, world size $gpus, timeout ${TIMEOUT}s, log $logfile"
    rc=0
    # timeout signals the process group: pytest and the workers it spawned
    PYTHONPATH="$path" SYMM_STACK_LEVEL="$lvl" timeout -k 30 "$TIMEOUT" \
        "$PY" -m pytest -v -rfEs -p no:cacheprovider "${FILES[@]}" "${PYTEST_EXTRA[@]}" \
        >"$logfile" 2>&1 || rc=$?
    record "L$lvl" "$logfile" "$rc" "$gpus"
done

logfile="$LOGS/cxx.log"
log "C++ runtime check (patch 5): 1 GPU, timeout ${TIMEOUT}s, log $logfile"
rc=0
PYTHONPATH="$BASE_PYTHONPATH" SYMM_STACK_BASE="$BASE" timeout -k 30 "$TIMEOUT" "$PY" -m pytest -v -rfEs -p no:cacheprovider \
    test/distributed/cxx/test_peer_alloc_info.py >"$logfile" 2>&1 || rc=$?
record cxx "$logfile" "$rc"
echo "$passed passed, $failed failed"
((failed == 0))
