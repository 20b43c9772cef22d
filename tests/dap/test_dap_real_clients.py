"""The real-client suite: tests/dap/real_client.test.js drives `tdb dap` with Microsoft's DebugClient
(npm @vscode/debugadapter-testsupport) over stdio (spawned through the VS Code extension's own launcher,
ide/vscode/bin/tdb-dap, with TDB_COMMAND) and over `--listen`. scripts/install_dap_client.sh installs
the npm packages into .tdb-cache/node (scripts/test.sh runs it; this test runs it too when they are
missing). Skipped only where node is missing."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_dap_adapter import ROOT, TIMEOUT, _adapter_cmd, _env, _kill

NODE_DIR = ROOT / ".tdb-cache" / "node"
TESTSUPPORT = NODE_DIR / "node_modules" / "@vscode" / "debugadapter-testsupport" / "package.json"
JS_TEST = Path(__file__).with_name("real_client.test.js")
LISTING = "random-gpt2.tdbsites"

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (CI has node 20)")]


@pytest.fixture(scope="module")
def node_modules() -> Path:
    if not TESTSUPPORT.is_file():
        subprocess.run(["bash", str(ROOT / "scripts" / "install_dap_client.sh")], cwd=ROOT, check=True, timeout=600)
    assert TESTSUPPORT.is_file(), "scripts/install_dap_client.sh did not install @vscode/debugadapter-testsupport"
    return NODE_DIR / "node_modules"


def run_js(node_modules: Path, server: str, mode: str, port: int = 0, transcript: Path | None = None) -> str:
    env = {**_env(), "NODE_PATH": str(node_modules), "TDB_DAP_MODE": mode, "TDB_TEST_SERVER": server,
           "TDB_TEST_LISTING": LISTING, "TDB_COMMAND": str(Path(sys.executable).with_name("tdb"))}
    if port:
        env["TDB_DAP_PORT"] = str(port)
    if transcript is not None:
        env["TDB_DAP_TRANSCRIPT"] = str(transcript)
    done = subprocess.run(["node", "--test", "--test-reporter=spec", str(JS_TEST)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert re.search(r"pass 3\b", out) and re.search(r"fail 0\b", out), out[-3000:]
    return out


def test_debug_client_over_stdio(node_modules, gpt2_server, tmp_path):
    run_js(node_modules, gpt2_server, "stdio", transcript=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stdio-generate.jsonl", "stdio-neovim.jsonl",
                                                          "stdio-vscode.jsonl"]


def test_debug_client_over_listen(node_modules, gpt2_server):
    proc = subprocess.Popen(_adapter_cmd("--listen", "0"), cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        first = lines.get(timeout=TIMEOUT).decode()
        m = re.match(r"tdb dap: listening on 127\.0\.0\.1:(\d+)", first)
        assert m, first
        run_js(node_modules, gpt2_server, "listen", int(m.group(1)))
        assert proc.poll() is None               # one adapter per connection; the listener goes on
    finally:
        _kill(proc)


def test_vscode_extension_packages_without_warnings(node_modules, tmp_path):
    """`vsce package` (npm @vscode/vsce) builds the VSIX into a temporary folder, with no warning (LICENSE and
    .vscodeignore are in ide/vscode)."""
    before = subprocess.run(["git", "status", "--porcelain", "--", "ide/vscode"], cwd=ROOT, capture_output=True,
                            text=True).stdout
    vsix = tmp_path / "tdb-debug.vsix"
    # The project has no public repository address yet: the flag says so instead of a made-up URL (with
    # a "repository" in package.json, vsce would need no flag).
    flags = [] if "repository" in json.loads((ROOT / "ide" / "vscode" / "package.json").read_text()) \
        else ["--allow-missing-repository"]
    done = subprocess.run([str(node_modules / ".bin" / "vsce"), "package", *flags, "--out", str(vsix)],
                          cwd=ROOT / "ide" / "vscode", capture_output=True, text=True, timeout=240,
                          env={**os.environ, "NO_UPDATE_NOTIFIER": "1"})
    out = done.stdout + done.stderr
    assert done.returncode == 0 and vsix.is_file(), out
    assert "WARNING" not in out, out
    listed = subprocess.run([str(node_modules / ".bin" / "vsce"), "ls"], cwd=ROOT / "ide" / "vscode",
                            capture_output=True, text=True, timeout=120).stdout.split()
    assert {"package.json", "LICENSE", "bin/tdb-dap", "bin/tdb_dap.py"} <= set(listed), listed
    assert not [f for f in listed if f.startswith("test") or f.endswith(".vsix")], listed
    after = subprocess.run(["git", "status", "--porcelain", "--", "ide/vscode"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    assert after == before                       # the checkout stays clean
