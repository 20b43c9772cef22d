#!/usr/bin/env bash
# Idempotent: the tools of the IDE tests (tests/dap/test_dap_real_clients.py), never in the checkout's
# tracked files:
#   - Microsoft's DAP test client (npm @vscode/debugadapter-testsupport) and the VS Code extension
#     packager (npm @vscode/vsce), into .tdb-cache/node (ignored by git); needs node and npm (node 20 in CI);
#   - luac (Debian lua5.4, ~300 KB) to check the Lua of ide/nvim-dap.md, where apt-get is at hand.
# Without node/npm or apt-get the tests that need them are skipped, each with its reason.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.tdb-cache/node
TESTSUPPORT_VERSION=1.68.0
VSCE_VERSION=3.9.2

if command -v npm >/dev/null 2>&1; then
  if [ ! -f "$DEST/node_modules/@vscode/debugadapter-testsupport/package.json" ] || \
     [ ! -x "$DEST/node_modules/.bin/vsce" ]; then
    echo "tdb: installing @vscode/debugadapter-testsupport and @vscode/vsce (npm) into $DEST" >&2
    mkdir -p "$DEST"
    [ -f "$DEST/package.json" ] || echo '{"name": "tdb-ide-test-tools", "private": true}' > "$DEST/package.json"
    npm install --prefix "$DEST" --no-audit --no-fund --loglevel=error \
      "@vscode/debugadapter-testsupport@$TESTSUPPORT_VERSION" "@vscode/vsce@$VSCE_VERSION" >&2
  fi
else
  echo "tdb: no npm here: the real-client DAP tests and the VSIX check will be skipped (install node 20 and npm)" >&2
fi

if ! command -v luac5.4 >/dev/null 2>&1 && ! command -v luac >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO="none"; fi
  fi
  if [ "$SUDO" = none ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "tdb: no luac and no way to install lua5.4: the Lua check of ide/nvim-dap.md will be skipped" >&2
  else
    echo "tdb: installing lua5.4 (Debian package) to check the Lua of ide/nvim-dap.md" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q --no-install-recommends lua5.4 >/dev/null 2>&1 || {
      $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends lua5.4 >/dev/null; }
  fi
fi
