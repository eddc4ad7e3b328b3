#!/usr/bin/env bash
# The GPU tier of every patch, level by level, on 2 CUDA GPUs.  `--help` says more.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
STACK_LOG_PREFIX="gpu-tier"
ROOT="$STACK_ROOT"

usage() {
    cat <<'EOF'
Usage: scripts/gpu_tier.sh [--python PY] [--levels "L ..."] [--timeout S]
                           [--logs DIR] [--series-dir DIR] [-- PYTEST_ARGS...]

For each level L (default: 0 1 .. N, N = patches in the series), runs
  torchrun --standalone --nproc-per-node 2 -m pytest -v -rs \
      test/distributed/test_symm_mem_{lowering,cudagraphs,partition,allocator}.py
on `PY` (default python3, used as it is: nothing is installed) with the
overlay of patches 1..L (`stack.py overlay`, under build/overlay) on
PYTHONPATH and SYMM_STACK_LEVEL=L, under `timeout S` (default 300) per level,
with NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
NVSHMEM_DISABLE_NVLS=1.  Each level's full log goes to DIR/L<L>.log (default
build/gpu-tier); the pytest summary line of each rank is printed.  The last
line is "P passed, F failed", counting levels; the exit status is 1 if any
level failed or timed out, 3 with fewer than 2 CUDA GPUs.

PY needs torch 2.11.0 (checked) and unidiff importable (stack.py uses it);
pytest and expecttest for the tests.
EOF
}

PY=python3
LEVELS=""
TIMEOUT=300
LOGS="$ROOT/build/gpu-tier"
SERIES_DIR="$ROOT/patches"
PYTEST_EXTRA=()
while (($#)); do
    case "$1" in
        --python | --levels | --timeout | --logs | --series-dir)
            [[ $# -ge 2 && -n "$2" ]] || die 2 "$1 needs a value"
            case "$1" in
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

load_pin
cd "$ROOT"
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die 2 "--timeout is '$TIMEOUT'; needs seconds"
N="$(series_count "$SERIES_DIR")"
if [[ -z "$LEVELS" ]]; then
    LEVELS="$(seq -s ' ' 0 "$N")"
fi
for lvl in $LEVELS; do
    if ! [[ "$lvl" =~ ^[0-9]+$ ]] || ((lvl > N)); then
        die 2 "level '$lvl' is not in 0..$N (patches in $SERIES_DIR)"
    fi
done
command -v "$PY" >/dev/null 2>&1 || die 2 "interpreter $PY not found; needs --python PY"
BASE_PYTHONPATH="$(without_overlays)"
PYTHONPATH="$BASE_PYTHONPATH" "$PY" "$STACK_PY" check-torch --python "$PY" >/dev/null
gpus="$(timeout 300 "$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null |
    tail -n1 || true)"
[[ "$gpus" =~ ^[0-9]+$ ]] || gpus=0
((gpus >= 2)) || die 3 "the GPU tier needs 2 CUDA GPUs; $PY's torch sees $gpus"

FILES=(test/distributed/test_symm_mem_{lowering,cudagraphs,partition,allocator}.py)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
mkdir -p "$LOGS"
passed=0
failed=0
for lvl in $LEVELS; do
    path="$BASE_PYTHONPATH"
    if ((lvl > 0)); then
        overlay="$(PYTHONPATH="$BASE_PYTHONPATH" "$PY" "$STACK_PY" overlay --python "$PY" \
            --upto "$lvl" --series-dir "$SERIES_DIR" | tail -n1)"
        path="$overlay${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}"
    fi
    logfile="$LOGS/L$lvl.log"
    log "level $lvl: ${#FILES[@]} files on 2 ranks, timeout ${TIMEOUT}s, log $logfile"
    rc=0
    PYTHONPATH="$path" SYMM_STACK_LEVEL="$lvl" timeout "$TIMEOUT" \
        "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
        -m pytest -v -rs -p no:cacheprovider "${FILES[@]}" "${PYTEST_EXTRA[@]}" \
        >"$logfile" 2>&1 || rc=$?
    grep -E '^=+ .*(passed|failed|error).* in ' "$logfile" | sed "s/^/  L$lvl: /" || true
    if ((rc == 0)); then
        passed=$((passed + 1))
    else
        ((rc == 124)) && log "level $lvl timed out after ${TIMEOUT}s"
        log "level $lvl failed (exit $rc); see $logfile"
        failed=$((failed + 1))
    fi
done
echo "$passed passed, $failed failed"
((failed == 0))
