#!/usr/bin/env bash
# The main job: a tdb server on the bundled model plus the dashboard, printing the URL to open.
# Extra arguments go to `tdb dashboard` (e.g. --port 8502, --model DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${TDB_VENV:-.venv}"
exec "$VENV/bin/tdb" dashboard "$@"
