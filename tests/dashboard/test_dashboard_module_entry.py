"""`python -m streamlit_app --server HOST:PORT`: the dashboard of a client-only install (no `tdb` command
there), with the flags of `tdb dashboard` but --model, started, answering and stopped cleanly."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request

from dash_helpers import ROOT


def _options(parser) -> dict[str, str]:
    return {", ".join(a.option_strings): a.help for a in parser._actions if a.option_strings and a.dest != "help"}


def test_the_module_takes_the_flags_of_tdb_dashboard_but_model():
    from streamlit_app.__main__ import build_parser
    from tdb_server.cli import build_parser as tdb_parser

    sub = next(a for a in tdb_parser()._actions if a.dest == "command").choices["dashboard"]
    theirs = {k: v for k, v in _options(sub).items() if k not in ("--model", "--server")}
    ours = _options(build_parser())
    assert set(ours) == set(theirs) | {"--server"}
    assert {k: v for k, v in ours.items() if k != "--server"} == theirs


def test_the_module_serves_the_dashboard_of_a_running_server(dash):
    proc = subprocess.Popen([sys.executable, "-m", "streamlit_app", "--server", dash.address, "--port", "0"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
        line = lines.get(timeout=120)
        m = re.match(r"tdb: dashboard at (http://\S+)/\?server=(\S+)$", line.strip())
        assert m and m.group(2) == dash.address, line
        with urllib.request.urlopen(m.group(1) + "/_stcore/health", timeout=10) as r:
            assert r.status == 200
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, proc.stderr.read()[-2000:]
