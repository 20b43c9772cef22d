#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up (if needed), generated-code drift check, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_browser.sh
bash scripts/install_grpcurl.sh
bash scripts/install_dap_client.sh
VENV="${TDB_VENV:-.venv}"
"$VENV/bin/python" scripts/gen_proto.py --check
exec "$VENV/bin/python" -m pytest tests "$@"
