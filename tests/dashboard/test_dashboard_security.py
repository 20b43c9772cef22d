"""The dashboard's token goes only to the server it was configured for, and a dashboard reachable from
other machines asks for a password of its own (issue 21, item 4)."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from dash_helpers import run_page


class Listener:
    """A loopback TCP port that counts the connections it gets (and the bytes of the first)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener():
    ln = Listener()
    yield ln
    ln.close()


def test_a_server_named_in_the_url_gets_nothing(dash, listener):
    at = run_page(dash.address, "explore", prompt=dash.prompt, server=f"127.0.0.1:{listener.port}")
    assert not at.exception and not at.error
    [warning] = [w for w in at.warning if "talks only to the tdb server it was started with" in w.value]
    assert f"127.0.0.1:{listener.port}" in warning.value and dash.address in warning.value
    assert "server" not in at.query_params                       # dropped from the link
    assert any(dash.address in s.value for s in at.sidebar.success)  # the page works on its own server
    assert listener.connections == 0


def test_a_url_naming_the_configured_server_is_fine(dash):
    at = run_page(dash.address, "explore", prompt=dash.prompt, server=dash.address)
    assert not at.exception and not at.error
    assert not [w for w in at.warning if "talks only to" in w.value]


@pytest.fixture
def password():
    os.environ["TDB_DASHBOARD_PASSWORD"] = "correct horse"
    yield "correct horse"
    del os.environ["TDB_DASHBOARD_PASSWORD"]


def test_a_dashboard_with_a_password_shows_nothing_before_it_is_given(dash, password):
    at = run_page(dash.address, "explore", prompt=dash.prompt)
    assert not at.exception
    assert not at.sidebar.success and not at.metric and not at.dataframe     # no server call drew anything
    box = at.text_input(key="tdb.password")
    box.input("wrong").run()
    assert [e for e in at.error if "wrong password" in e.value] and not at.metric
    at.text_input(key="tdb.password").input(password).run()
    assert not at.exception and not at.error
    assert any(dash.address in s.value for s in at.sidebar.success) and at.metric


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_tdb_dashboard_refuses_to_listen_beyond_loopback_without_a_password(host, capsys, monkeypatch):
    from streamlit_app.launch import run_dashboard

    monkeypatch.delenv("TDB_DASHBOARD_PASSWORD", raising=False)
    assert run_dashboard(server="127.0.0.1:1", port=0, host=host) == 2
    err = capsys.readouterr().err
    assert "--dashboard-password" in err and host in err


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                           ("127.0.0.2", True), ("0.0.0.0", False), ("10.0.0.1", False),
                                           ("example.org", False)])
def test_loopback_addresses(host, loopback):
    from streamlit_app.launch import is_loopback

    assert is_loopback(host) is loopback
