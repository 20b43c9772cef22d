#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with tdb installed (editable: the client
# distribution packages/tdb-client and the server, the repository root) and its dev tools, and
# .venv/wheelhouse: wheels of every runtime dependency, from which the packaging tests
# (tests/distributions) fill fresh virtual environments without the network.
# torch comes from the pin in constraints.txt (the CPU build that lies on our machines' disk); users
# with GPUs can edit constraints.txt. Re-runs only when the pyproject.toml files, constraints.txt or
# VERSION change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TDB_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "tdb: Python >= 3.10 is required (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
want="$(cat pyproject.toml packages/tdb-client/pyproject.toml constraints.txt VERSION | sha256sum | cut -d' ' -f1)"
stamp="$VENV/.tdb-setup"
if [ ! -x "$VENV/bin/python" ]; then
  echo "tdb: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "tdb: installing dependencies into $VENV (first run takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt \
    -e ./packages/tdb-client -e ".[dev]"
  "$VENV/bin/python" -m pip download -q --disable-pip-version-check -c constraints.txt \
    -d "$VENV/wheelhouse" ./packages/tdb-client .
  echo "$want" > "$stamp"
fi
