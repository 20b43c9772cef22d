#!/usr/bin/env bash
# Idempotent: Debian's Chromium and its WebDriver, for the dashboard's real-browser test
# (tests/dashboard/test_dashboard_browser.py). Never downloads a browser build of its own.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "tdb: no apt-get here: install chromium and chromium-driver yourself for the browser test" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "tdb: not root and no sudo: the browser test will be skipped (install chromium chromium-driver)" >&2
    exit 0
  fi
fi
echo "tdb: installing chromium and chromium-driver (Debian packages) for the browser test" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
