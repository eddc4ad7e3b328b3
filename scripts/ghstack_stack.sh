#!/usr/bin/env bash
# Prepare the patch series as a ghstack stack in a PyTorch checkout and
# submit it (one pull request per patch).  See docs/upstream_and_nightly.md.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
STACK_LOG_PREFIX="ghstack"
ROOT="$STACK_ROOT"
PROG="ghstack_stack"
TEST_SUBDIR="test/distributed/symm_mem_stack"

usage() {
    cat <<EOF
Usage: scripts/ghstack_stack.sh --source DIR [options] [-- GHSTACK_SUBMIT_ARGS...]

Turns a base's patch series (patches/VERSION/; --base VERSION, else
\$SYMM_STACK_BASE, else the newest base) into a stack of commits in the
PyTorch checkout DIR (at that base's pin, clean) and submits it with ghstack,
one pull request per patch.

  1. scripts/apply_and_build.sh --source DIR --no-build --no-tests (with this
     repository's .venv/VERSION Python, --no-venv) applies the series: one commit per
     patch on a new branch symm-mem-stack-N (it does every check).
  2. Commit n is rewritten to carry its tests in upstream form:
     $TEST_SUBDIR/ gets what
     'scripts/stack.py upstream-tests --base VERSION --level n' writes (the
     GPU-tier tests of test/distributed that hold from commit n on, without the level
     machinery, and the helpers they import), so each test arrives with the
     commit whose change it tests.  The CPU tier and the tests that pin a
     state the series later changes stay in this repository.  Each commit
     keeps its title, Summary and Test Plan; the Test Plan gains the
     commands that run that commit's tests.
  3. ghstack submit [GHSTACK_SUBMIT_ARGS...] PIN..HEAD, run inside DIR.

Options:
  --base VERSION   the base (default: \$SYMM_STACK_BASE, else the newest)
  --source DIR     PyTorch checkout at the pin (default: env PYTORCH_SRC)
  --upto N         apply patches 1..N only (passed to apply_and_build.sh)
  --series-dir DIR the series to apply (default: patches/VERSION/; passed on)
  --force          passed to apply_and_build.sh
  --dry-run        stop before any network step: build and rewrite the stack,
                   then print, for each commit, the pull request title and
                   the files it changes
  -h, --help       this text

Everything after -- goes to 'ghstack submit' unchanged (e.g. -- --draft).
The pin commit comes from patches/VERSION/PIN, or from the file named by env
SYMM_STACK_PIN_FILE (as in apply_and_build.sh).  ghstack is taken from this
repository's .venv/VERSION (else the newest .venv/*), else from PATH; env
GHSTACK overrides both.

Exit status: 0 done, 1 a step failed, 2 bad input (arguments, pin), 3 a tool
it needs (ghstack, python3) is missing.
EOF
}

# The script's report goes to stdout (the dry run's is its result); errors go
# through lib.sh's die.
say() { echo "$PROG: $*"; }

SRC="${PYTORCH_SRC:-}"
UPTO=""
SERIES_DIR=""
BASE_ARG="${SYMM_STACK_BASE:-}"
BASE_HOW="SYMM_STACK_BASE $BASE_ARG"
FORCE=0
DRY_RUN=0
GHSTACK_ARGS=()
while (($#)); do
    case "$1" in
        --source | --upto | --series-dir | --base)
            [[ $# -ge 2 && -n "$2" ]] || die 2 "$1 needs a value"
            case "$1" in
                --base) BASE_ARG="$2"; BASE_HOW="--base $2" ;;
                --source) SRC="$2" ;;
                --upto) UPTO="$2" ;;
                --series-dir) SERIES_DIR="$2" ;;
            esac
            shift 2
            ;;
        --source=*) SRC="${1#*=}"; shift ;;
        --upto=*) UPTO="${1#*=}"; shift ;;
        --series-dir=*) SERIES_DIR="${1#*=}"; shift ;;
        --base=*) BASE_ARG="${1#*=}"; BASE_HOW="--base ${1#*=}"; shift ;;
        --force) FORCE=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; GHSTACK_ARGS=("$@"); break ;;
        *) die 2 "unknown argument '$1'; see --help" ;;
    esac
done

use_base "$BASE_ARG" "$BASE_HOW" # the newest when none was asked for; loads the pin
[[ -n "$SRC" ]] || die 2 "no PyTorch checkout given (--source DIR or env PYTORCH_SRC)"
[[ -d "$SRC" ]] || die 2 "$SRC is not a directory"
SRC="$(cd "$SRC" && pwd)"
if [[ -n "$UPTO" && ! "$UPTO" =~ ^[0-9]+$ ]]; then
    die 2 "--upto wants a number, got '$UPTO'"
fi

PIN_COMMIT="$TORCH_GIT_COMMIT"
[[ "$PIN_COMMIT" =~ ^[0-9a-f]{40}$ ]] ||
    die 2 "the pin's TORCH_GIT_COMMIT is '$PIN_COMMIT'; needs a 40-hex commit"

PYTHON="$ROOT/.venv/$BASE/bin/python"
if [[ ! -x "$PYTHON" ]]; then
    PYTHON="$(printf '%s\n' "$ROOT"/.venv/*/bin/python | sort -V | tail -n1)"
    [[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)" || die 3 "python3 not found"
fi
PY="$PYTHON"  # find_tool looks beside it, then on PATH
GHSTACK_BIN="${GHSTACK:-$(find_tool ghstack || true)}"
if ((DRY_RUN == 0)); then
    [[ -n "$GHSTACK_BIN" ]] || die 3 "ghstack not found (pip install ghstack, or set GHSTACK)"
fi

g() { git -C "$SRC" "$@"; }

# 1. One commit per patch, by the one script that knows how.
# Only scripts/stack.py runs there: this repository's .venv (or python3) as it
# is, without the venv that source mode would otherwise make for a build.
apply_args=(--base "$BASE" --source "$SRC" --no-build --no-tests --python "$PYTHON" --no-venv)
[[ -n "$UPTO" ]] && apply_args+=(--upto "$UPTO")
[[ -n "$SERIES_DIR" ]] && apply_args+=(--series-dir "$SERIES_DIR")
((FORCE)) && apply_args+=(--force)
say "applying the series: scripts/apply_and_build.sh ${apply_args[*]}"
"$ROOT/scripts/apply_and_build.sh" "${apply_args[@]}"

BRANCH="$(g symbolic-ref --quiet --short HEAD)" ||
    die 1 "apply_and_build.sh left $SRC without a branch checked out"
g merge-base --is-ancestor "$PIN_COMMIT" HEAD ||
    die 1 "the pin $PIN_COMMIT is not an ancestor of $BRANCH"
mapfile -t COMMITS < <(g rev-list --reverse --first-parent "$PIN_COMMIT..HEAD")
((${#COMMITS[@]} > 0)) || die 1 "$BRANCH has no commit on top of the pin"
if [[ -n "$UPTO" ]] && ((${#COMMITS[@]} != UPTO)); then
    die 1 "$BRANCH has ${#COMMITS[@]} commits on top of the pin, expected $UPTO"
fi
say "$BRANCH: ${#COMMITS[@]} commit(s) on top of ${PIN_COMMIT:0:12}"

# 2. Give commit n its tests in upstream form.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

for ((n = 1; n <= ${#COMMITS[@]}; n++)); do
    "$PYTHON" "$ROOT/scripts/stack.py" upstream-tests --base "$BASE" --level "$n" \
        --out "$WORK/tests-$n" >"$WORK/files-$n" ||
        die 1 "scripts/stack.py upstream-tests --level $n failed"
done

# The commands that run the tests of commit n, for its Test Plan.  The GPU
# tier needs no torchrun: its classes (MultiProcContinuousTest) spawn one
# worker per visible GPU.
test_commands() { # $1: n
    local f
    while read -r f; do
        case "$f" in
            test_*.py) echo "python -m pytest $TEST_SUBDIR/$f" ;;
        esac
    done <"$WORK/files-$1"
}

rewrite_message() { # $1: n, stdin: message, stdout: new message
    test_commands "$1" >"$WORK/commands-$1"
    LEVEL="$1" COMMANDS="$WORK/commands-$1" "$PYTHON" -c '
import os
import re
import sys

level = os.environ["LEVEL"]
with open(os.environ["COMMANDS"]) as f:
    commands = [line.rstrip("\n") for line in f if line.strip()]
lines = sys.stdin.read().rstrip("\n").split("\n")

added = [
    f"Tests of this commit (commit {level} of the stack):",
    "",
    *[f"    {c}" for c in commands],
]

header = re.compile(r"^[A-Z][A-Za-z0-9 _-]*:\s*$")
trailer = re.compile(r"^[A-Za-z][A-Za-z0-9-]*(?: [A-Za-z][A-Za-z0-9-]*)?: \S")

# A closing paragraph of "Key: value" lines (Signed-off-by, ghstack-source-id,
# Pull Request resolved, ...) stays last.
end = len(lines)
last_blank = max((i for i, l in enumerate(lines) if not l.strip()), default=-1)
if 0 < last_blank < end - 1 and all(trailer.match(l) for l in lines[last_blank + 1:]):
    end = last_blank

plan = next((i for i in range(1, end) if lines[i].strip() == "Test Plan:"), None)
if plan is None:
    insert_at = end
    block = ["Test Plan:", *added]
else:
    insert_at = end
    for j in range(plan + 1, end):
        if header.match(lines[j]) and not lines[j - 1].strip():
            insert_at = j
            break
    block = added
while insert_at > 1 and not lines[insert_at - 1].strip():
    insert_at -= 1
rest = lines[insert_at:]
while rest and not rest[0].strip():
    rest.pop(0)
out = lines[:insert_at] + [""] + block + ([""] + rest if rest else [])
sys.stdout.write("\n".join(out) + "\n")
'
}

OLD_TIP="$(g rev-parse HEAD)"
parent="$PIN_COMMIT"
level=0
export GIT_INDEX_FILE="$WORK/index"
for c in "${COMMITS[@]}"; do
    level=$((level + 1))
    g read-tree "$c"
    g rm -r -q -f --cached --ignore-unmatch -- "$TEST_SUBDIR" >/dev/null
    while read -r f; do
        blob="$(g hash-object -w --path "$TEST_SUBDIR/$f" -- "$WORK/tests-$level/$f")"
        g update-index --add --cacheinfo "100644,$blob,$TEST_SUBDIR/$f"
    done <"$WORK/files-$level"
    tree="$(g write-tree)"
    g log -1 --format=%B "$c" | rewrite_message "$level" >"$WORK/msg"
    parent="$(
        GIT_AUTHOR_NAME="$(g log -1 --format=%an "$c")" \
            GIT_AUTHOR_EMAIL="$(g log -1 --format=%ae "$c")" \
            GIT_AUTHOR_DATE="$(g log -1 --format=%ad --date=raw "$c")" \
            GIT_COMMITTER_NAME="${GIT_COMMITTER_NAME:-$(g log -1 --format=%cn "$c")}" \
            GIT_COMMITTER_EMAIL="${GIT_COMMITTER_EMAIL:-$(g log -1 --format=%ce "$c")}" \
            g commit-tree "$tree" -p "$parent" -F "$WORK/msg"
    )"
done
unset GIT_INDEX_FILE

g checkout -q --detach "$OLD_TIP"
g update-ref -m "$PROG: give each commit its tests" "refs/heads/$BRANCH" "$parent" "$OLD_TIP"
g checkout -q "$BRANCH"
say "rewrote $BRANCH: commit n now carries its tests in $TEST_SUBDIR/"

RANGE="$PIN_COMMIT..HEAD"
submit=("${GHSTACK_BIN:-ghstack}" submit "${GHSTACK_ARGS[@]}" "$RANGE")

print_stack() {
    local n=0 total=${#COMMITS[@]} c
    echo "Stack of $total pull request(s) on branch $BRANCH, bottom first (base ${PIN_COMMIT:0:12}):"
    for c in $(g rev-list --reverse --first-parent "$PIN_COMMIT..HEAD"); do
        n=$((n + 1))
        echo
        echo "PR $n/$total: $(g log -1 --format=%s "$c")"
        echo "  commit ${c:0:12}; tests: $(test_commands "$n" | wc -l) file(s) in $TEST_SUBDIR"
        g show --stat=120 --format= "$c" | sed 's/^/  /'
    done
}

if ((DRY_RUN)); then
    print_stack
    echo
    say "dry run: not submitting; would run in $SRC: ${submit[*]}"
    exit 0
fi

say "running in $SRC: ${submit[*]}"
cd "$SRC"
exec "${submit[@]}"
