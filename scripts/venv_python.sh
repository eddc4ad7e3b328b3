#!/bin/sh
# venv_python.sh SCRIPT ARGS...: run SCRIPT under the newest of the
# repository's venvs, .venv/<VERSION>/bin/python3 (versions compared as
# versions), else python3 on PATH.  scripts/stack.py's shebang runs it.
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$(printf '%s\n' "$root"/.venv/*/bin/python3 | sort -V | tail -n1)"
[ -x "$py" ] || py=python3
exec "$py" "$@"
