"""`python -m tdb_client.dap`: the bridge of a client-only install (no `tdb` command there), with the
flags of `tdb dap`, serving a DAP client against a running server."""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

from dap_client import TIMEOUT, DapClient

ROOT = Path(__file__).resolve().parents[2]


def _options(parser) -> dict[str, str]:
    return {", ".join(a.option_strings): a.help for a in parser._actions if a.option_strings and a.dest != "help"}


def test_the_module_takes_the_flags_of_tdb_dap():
    from tdb_client.dap.__main__ import build_parser
    from tdb_server.cli import build_parser as tdb_parser

    sub = next(a for a in tdb_parser()._actions if a.dest == "command").choices["dap"]
    assert _options(build_parser()) == _options(sub)


def test_the_module_serves_a_dap_client_against_a_running_server(bundled_server):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "tdb_client.dap", "--listen", "0", "--once",
                             "--server", bundled_server], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sock = None
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        first = lines.get(timeout=TIMEOUT).decode()
        m = re.match(r"tdb dap: listening on 127\.0\.0\.1:(\d+)", first)
        assert m, (first, proc.stderr.read1().decode() if proc.poll() is not None else "")
        sock = socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=TIMEOUT)
        sock.settimeout(None)
        dap = DapClient(sock.makefile("rb"), sock.makefile("wb"))
        assert dap.body("initialize", {"adapterID": "tdb", "linesStartAt1": True})["supportsConfigurationDoneRequest"]
        dap.request("launch", {"tokens": [1, 2, 3, 4], "stopOnEntry": True})   # --server: no "server" needed
        dap.event("initialized")
        dap.request("configurationDone")
        stop = dap.event("stopped")
        frames = dap.body("stackTrace", {"threadId": stop["body"]["threadId"]})["stackFrames"]
        assert frames[0]["name"].startswith("embed")
        dap.request("disconnect", {"terminateDebuggee": True})
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if sock is not None:
            sock.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_without_the_server_distribution_a_launch_says_how_to_name_a_server(monkeypatch):
    import pytest

    from tdb_client.dap.backend import model_path
    from tdb_client.dap.protocol import DapError

    monkeypatch.setitem(sys.modules, "tdb_server.errors", None)     # as in a client-only install
    with pytest.raises(DapError, match=r"python -m tdb_client\.dap --server HOST:PORT"):
        model_path(None)
