# shellcheck shell=bash disable=SC2034  # its variables are for the scripts sourcing it
# Helpers shared by scripts/apply_and_build.sh, test.sh and gpu_tier.sh.
# Source it; it defines functions and STACK_ROOT, and runs nothing else.

STACK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK_PY="$STACK_ROOT/scripts/stack.py"
: "${STACK_LOG_PREFIX:=stack}"

# The series of every base live in $PATCHES_ROOT/<VERSION>/ (PIN, series,
# the patches); SYMM_STACK_PATCHES_ROOT names another root (the toolchain's
# tests use it for a made-up second base).
PATCHES_ROOT="${SYMM_STACK_PATCHES_ROOT:-$STACK_ROOT/patches}"
# Filled by use_base: the base (e.g. 2.11.0) and its directory under PATCHES_ROOT.
BASE="" BASE_DIR=""
# Filled by load_pin.
TORCH_VERSION="" TORCH_GIT_TAG="" TORCH_GIT_COMMIT="" TORCH_WHEEL=""
PYTHON_VERSION="" SERIES_LENGTH=""
# Filled by select_python: the interpreter every later step uses.
PY=""
# Filled by check_python: the interpreter that runs (--no-venv) or makes the venv.
CHECK_PY=""

log() { printf '[%s] %s\n' "$STACK_LOG_PREFIX" "$*" >&2; }

# die CODE MESSAGE: one line on stderr, then exit CODE (2: bad input).
die() {
    local code=$1
    shift
    log "error: $*"
    exit "$code"
}

# supported_bases: the supported bases, oldest first (compared as versions):
# the directories $PATCHES_ROOT/*/ holding both a PIN and a series file.
supported_bases() {
    local dir
    for dir in "$PATCHES_ROOT"/*/; do
        dir="${dir%/}"
        if [[ -f "$dir/PIN" && -f "$dir/series" ]]; then
            echo "${dir##*/}"
        fi
    done | sort -V
}

# newest_base: the highest supported base (empty when there is none).
newest_base() {
    supported_bases | tail -n1
}

# bases_line: the supported bases as "2.11.0, 2.14.1" ("none" when none), and
# the bases whose series is not there yet (a PIN only), for one-line refusals.
bases_line() {
    local line pending=() dir
    line="$(supported_bases | paste -sd, - | sed 's/,/, /g')"
    for dir in "$PATCHES_ROOT"/*/; do
        dir="${dir%/}"
        [[ -f "$dir/PIN" && ! -f "$dir/series" ]] && pending+=("${dir##*/}")
    done
    printf '%s' "${line:-none}"
    ((${#pending[@]} == 0)) || printf ' (no series yet: %s)' "${pending[*]}"
}

# use_base VERSION WHAT: select base VERSION (empty: the newest) and load its
# pin, or die 2 with one line that says WHAT was asked (e.g. "--base 2.12.0",
# "torch 2.12.0") and names the supported bases.
use_base() {
    local version=$1 what=${2:-"--base $1"}
    if [[ -z "$version" ]]; then
        version="$(newest_base)"
        [[ -n "$version" ]] ||
            die 2 "no supported base in $PATCHES_ROOT; needs a directory <VERSION>/ with PIN and series"
    fi
    if ! supported_bases | grep -qxF -- "$version"; then
        die 2 "$what is not a supported base; supported: $(bases_line)"
    fi
    BASE="$version"
    BASE_DIR="$PATCHES_ROOT/$version"
    load_pin
}

# load_pin: read $BASE_DIR/PIN (or $SYMM_STACK_PIN_FILE) as KEY=VALUE lines,
# without executing it, into the variables above.
load_pin() {
    local file="${SYMM_STACK_PIN_FILE:-$BASE_DIR/PIN}" line key
    [[ -f "$file" ]] || die 2 "pin file $file not found; needs KEY=VALUE lines"
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line%$'\r'}"
        [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
        [[ "$line" =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]] ||
            die 2 "$file: found '$line'; needs KEY=VALUE"
        case "${BASH_REMATCH[1]}" in
            TORCH_VERSION) TORCH_VERSION="${BASH_REMATCH[2]}" ;;
            TORCH_GIT_TAG) TORCH_GIT_TAG="${BASH_REMATCH[2]}" ;;
            TORCH_GIT_COMMIT) TORCH_GIT_COMMIT="${BASH_REMATCH[2]}" ;;
            TORCH_WHEEL) TORCH_WHEEL="${BASH_REMATCH[2]}" ;;
            PYTHON_VERSION) PYTHON_VERSION="${BASH_REMATCH[2]}" ;;
            SERIES_LENGTH) SERIES_LENGTH="${BASH_REMATCH[2]}" ;;
        esac
    done <"$file"
    for key in TORCH_VERSION TORCH_GIT_TAG TORCH_GIT_COMMIT TORCH_WHEEL \
        PYTHON_VERSION SERIES_LENGTH; do
        [[ -n "${!key}" ]] || die 2 "$file lacks $key; needs it set"
    done
    [[ "$SERIES_LENGTH" =~ ^[0-9]+$ ]] ||
        die 2 "$file: SERIES_LENGTH is '$SERIES_LENGTH'; needs a number"
    if [[ -z "${SYMM_STACK_PIN_FILE:-}" && -n "$BASE" && "$TORCH_VERSION" != "$BASE" ]]; then
        die 2 "$file: TORCH_VERSION is $TORCH_VERSION; needs $BASE, its directory's name"
    fi
}

# base_of_torch PY: print the supported base whose TORCH_VERSION is the
# release of the torch PY has installed (found without importing it, overlays
# ignored), or die 2 with one line naming the supported bases.
base_of_torch() {
    local err rc=0 found
    found="$("$1" "$STACK_PY" bases --python "$1" --installed 2>&1)" || rc=$?
    if ((rc != 0)); then
        err="$(tail -n1 <<<"$found")"
        die 2 "${err#stack.py bases: error: }"
    fi
    echo "$found"
}

# venv_dir: the venv of the selected base, .venv/<BASE>.
venv_dir() {
    echo "$STACK_ROOT/.venv/$BASE"
}

# python_minor PY: print "3.11" for a Python 3.11 interpreter.
python_minor() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'
}

# now_us: microseconds since the epoch.
now_us() {
    if [[ -n "${EPOCHREALTIME:-}" ]]; then
        echo "${EPOCHREALTIME//[.,]/}"
    else
        echo $(($(date +%s%N) / 1000))
    fi
}

# seconds_since START_US: "12.3" seconds since now_us printed START_US.
seconds_since() {
    local us=$(($(now_us) - $1))
    printf '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000))
}

# check_python PY_ARG NO_VENV: set CHECK_PY, or die 2 with one line.  With
# NO_VENV=1 it is PY_ARG (default python3), used as it is; else the Python a
# venv is made from: PY_ARG, else python$PYTHON_VERSION, else python3 if it is
# that version.  Runs nothing but `PY -c` to see that it is a Python.
check_python() {
    local arg=$1 no_venv=$2 need="needs --python PY naming a Python $PYTHON_VERSION"
    if [[ "$no_venv" == 1 ]]; then
        CHECK_PY="${arg:-python3}"
        need="needs --python PY naming a Python with torch $TORCH_VERSION installed"
    elif [[ -n "$arg" ]]; then
        CHECK_PY="$arg"
    elif command -v "python$PYTHON_VERSION" >/dev/null 2>&1; then
        CHECK_PY="python$PYTHON_VERSION"
    elif command -v python3 >/dev/null 2>&1 &&
        [[ "$(python_minor python3 2>/dev/null)" == "$PYTHON_VERSION" ]]; then
        CHECK_PY=python3
    else
        die 2 "no python$PYTHON_VERSION on PATH, and python3 is not $PYTHON_VERSION; $need"
    fi
    command -v "$CHECK_PY" >/dev/null 2>&1 || die 2 "interpreter $CHECK_PY not found; $need"
    python_minor "$CHECK_PY" >/dev/null 2>&1 || die 2 "$CHECK_PY does not run as Python; $need"
}

# check_free_space DIR WITH_TORCH: stop before pip when the file system that
# holds DIR has too little room, rather than let pip fail part-way with
# "No space left on device".  A venv with a torch wheel of a supported base
# takes 4.8 GiB (2.11.0) to 5.6 GiB (2.14.1); one without torch, well under 1.
check_free_space() {
    local dir=$1 with_torch=$2 need_gib=1 free_kib
    [[ "$with_torch" == 1 ]] && need_gib=6
    free_kib="$(df -Pk "$dir" | awk 'NR == 2 { print $4 }')"
    if ((free_kib < need_gib * 1024 * 1024)); then
        die 2 "$dir: $((free_kib / 1024)) MiB free on its file system; installing into it needs about $need_gib GiB. Free some space (old clones and their .venv/ folders), or use --no-venv with a Python that has what it needs"
    fi
}

# ensure_venv DIR WITH_TORCH BASE_PY: create DIR as a venv from BASE_PY (see
# check_python) and pip install requirements-dev.txt, plus $TORCH_WHEEL when
# WITH_TORCH is 1.  A stamp file skips pip while the Python version and
# requirements are unchanged.
ensure_venv() {
    local dir=$1 with_torch=$2 base=$3 version have stamp
    version="$(python_minor "$base")"
    have=""
    if [[ -x "$dir/bin/python" ]]; then
        have="$(python_minor "$dir/bin/python" 2>/dev/null || true)"
    fi
    if [[ "$have" != "$version" ]]; then
        log "creating $dir with $base (Python $version)"
        "$base" -m venv --clear "$dir"
    fi
    local reqs=(-r "$STACK_ROOT/requirements-dev.txt")
    if [[ "$with_torch" == 1 ]]; then
        reqs=("$TORCH_WHEEL" "${reqs[@]}")
    fi
    stamp="$( (echo "$version ${reqs[*]}" && cat "$STACK_ROOT/requirements-dev.txt") |
        sha256sum | cut -d' ' -f1)"
    if [[ "$(cat "$dir/.stack-stamp" 2>/dev/null || true)" != "$stamp" ]]; then
        check_free_space "$dir" "$with_torch"
        log "pip install ${reqs[*]} into $dir (this can take a while)"
        "$dir/bin/python" -m pip install --disable-pip-version-check "${reqs[@]}"
        echo "$stamp" >"$dir/.stack-stamp"
    else
        log "$dir is up to date (Python $version, ${reqs[*]})"
    fi
    PY="$dir/bin/python"
}

# select_python PY_ARG NO_VENV VENV_DIR WITH_TORCH: set PY.  With NO_VENV=1 use
# PY_ARG (default python3) as it is, installing nothing; else ensure_venv.
select_python() {
    local arg=$1 no_venv=$2 dir=$3 with_torch=$4
    check_python "$arg" "$no_venv"
    if [[ "$no_venv" == 1 ]]; then
        PY="$CHECK_PY"
        log "using $PY (Python $(python_minor "$PY")) as it is: no venv, no pip"
    else
        ensure_venv "$dir" "$with_torch" "$CHECK_PY"
    fi
}

# find_tool NAME: print the path of NAME beside $PY, else on PATH; fail if none.
find_tool() {
    local beside
    beside="$(dirname "$PY")/$1"
    if [[ -x "$beside" ]]; then
        echo "$beside"
    else
        command -v "$1"
    fi
}

# without_overlays: print $PYTHONPATH minus entries that hold an OVERLAY.json.
without_overlays() {
    local entry parts=() kept=() IFS=:
    read -r -a parts <<<"${PYTHONPATH:-}"
    for entry in "${parts[@]}"; do
        if [[ -n "$entry" && ! -f "$entry/OVERLAY.json" ]]; then
            kept+=("$entry")
        fi
    done
    echo "${kept[*]}"
}

# series_count SERIES_DIR: how many patches `series` lists (0 without a series).
series_count() {
    local file="$1/series"
    if [[ -f "$file" ]]; then
        grep -cvE '^[[:space:]]*(#|$)' "$file" || true
    else
        echo 0
    fi
}

# gpu_count: CUDA GPUs visible to $PY's torch (0 when it cannot tell).
gpu_count() {
    local n
    n="$(timeout 300 "$PY" -c 'import torch; print(torch.cuda.device_count())' \
        2>/dev/null | tail -n1 || true)"
    [[ "$n" =~ ^[0-9]+$ ]] && echo "$n" || echo 0
}

# multicast_off: export the settings that keep NVLink multicast off, unless set
# (shared machines; the multimem ops are covered by the CPU tier only).
multicast_off() {
    export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
    export TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
    export NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"
}

# report_torch WHAT: one line on stderr naming the torch $PY imports from the
# repository root (version, git commit, location).
report_torch() {
    (cd "$STACK_ROOT" && "$PY" -c 'import sys, torch; print("[%s] %s torch %s git %s at %s" % (sys.argv[1], sys.argv[2], torch.__version__, torch.version.git_version, torch.__file__))' "$STACK_LOG_PREFIX" "$1" >&2)
}
