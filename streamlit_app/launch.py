"""`tdb dashboard`: start (or find) a tdb server, run the Streamlit app against it, stop both cleanly.

Without `--server`, an embedded server runs as a child process (`python -m tdb_server serve --port 0`,
whose line `tdb: listening on HOST:PORT` gives its address), so the dashboard process itself never
imports the server. Then `streamlit run streamlit_app/app.py` runs headless with $TDB_SERVER set; once
it answers its health check this prints one line,

    tdb: dashboard at http://127.0.0.1:8501/?server=127.0.0.1:PORT

and waits. Ctrl-C / SIGTERM (or either child dying) stops the dashboard, then the embedded server.

The dashboard uses the server with its token ($TDB_TOKEN), so whoever reaches the dashboard's port
uses the server: bound beyond loopback it needs a password of its own (--dashboard-password or
$TDB_DASHBOARD_PASSWORD), which it asks of every browser session, and is refused without one.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

APP = Path(__file__).resolve().parent / "app.py"
LISTENING = re.compile(r"^tdb: listening on (\S+)\s*$")
SERVER_START_TIMEOUT_S = 600.0     # loading a big model from disk can take minutes
DASHBOARD_START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
ENV_PASSWORD = "TDB_DASHBOARD_PASSWORD"


def _say(text: str) -> None:
    print(f"tdb: {text}", file=sys.stderr, flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pump(stream: IO[str], lines: "queue.Queue[str | None]") -> None:
    """Forward a child's stdout to ours, and hand each line to `lines` (None at the end)."""
    for line in stream:
        lines.put(line)
        if not LISTENING.match(line):
            sys.stdout.write(line)
    lines.put(None)


def start_server(model: str | None, stop: threading.Event) -> tuple[subprocess.Popen, str] | None:
    """Start `python -m tdb_server serve --port 0` and return (process, "HOST:PORT"), or None."""
    cmd = [sys.executable, "-m", "tdb_server", "serve", "--host", "127.0.0.1", "--port", "0"]
    if model:
        cmd += ["--model", model]
    _say("starting an embedded server" + (f" on {model}" if model else " on the bundled model") + "…")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1, cwd=_repo_root())
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline and not stop.is_set():
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            break
        m = LISTENING.match(line)
        if m:
            return proc, m.group(1)
    _stop(proc, "the embedded server")
    if not stop.is_set():
        _say(f"the embedded server did not start (exit code {proc.returncode}); see the messages above")
    return None


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def start_streamlit(server: str, host: str, port: int, password: str = "") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP),
           "--server.address", host, "--server.port", str(port), "--server.headless", "true",
           "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "viewer", "--theme.base", "light"]
    env = {**os.environ, "TDB_SERVER": server}
    if password:
        env[ENV_PASSWORD] = password
    root = _repo_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Streamlit's own banner (several URLs) would bury our one line: drop its stdout, keep its stderr
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env, cwd=root)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen | None, what: str) -> None:
    """SIGTERM, wait, then SIGKILL if it will not go."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _say(f"{what} did not stop in {STOP_TIMEOUT_S:g} s: killing it")
        proc.kill()
        proc.wait()


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _password(host: str, given: str | None) -> str | None:
    """The dashboard's password ("" for none); None (said why) when it would listen beyond loopback without."""
    password = given if given is not None else os.environ.get(ENV_PASSWORD, "")
    if not is_loopback(host) and not password:
        _say(f"refusing to listen on {host} without a password: anyone who reaches the dashboard would use the "
             "tdb server with its token. Give --dashboard-password (or set TDB_DASHBOARD_PASSWORD), or keep "
             "--host 127.0.0.1")
        return None
    return password


def run_dashboard(server: str | None = None, port: int = 8501, model: str | None = None,
                  host: str = "127.0.0.1", password: str | None = None) -> int:
    """The `tdb dashboard` command. Returns the exit code."""
    password = _password(host, password)
    if password is None:
        return 2
    stop = threading.Event()
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    embedded = dashboard = None
    code = 0
    try:
        if server is None:
            started = start_server(model, stop)
            if started is None:
                return 0 if stop.is_set() else 1
            embedded, server = started
        elif model:
            _say("--model is ignored with --server (the server already has its model)")
        port = port or free_port(host if host not in ("", "0.0.0.0") else "127.0.0.1")
        dashboard = start_streamlit(server, host, port, password)
        base = f"http://{_url_host(host)}:{port}"
        deadline = time.monotonic() + DASHBOARD_START_TIMEOUT_S
        while not _healthy(f"{base}/_stcore/health"):
            if stop.is_set():
                return 0
            if dashboard.poll() is not None or time.monotonic() > deadline:
                _say(f"the dashboard did not start (is port {port} free?)")
                return 1
            time.sleep(0.2)
        print(f"tdb: dashboard at {base}/?server={server}", flush=True)
        while not stop.wait(0.5):
            for proc, what in ((dashboard, "the dashboard"), (embedded, "the embedded server")):
                if proc is not None and proc.poll() is not None:
                    _say(f"{what} exited (code {proc.returncode}): stopping")
                    code = 1
                    stop.set()
        return code
    finally:
        _stop(dashboard, "the dashboard")
        _stop(embedded, "the embedded server")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stop.is_set():
            _say("dashboard stopped")
