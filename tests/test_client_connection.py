"""A client pointed at a port where nothing listens says so, names the address and suggests `tdb serve`."""

from __future__ import annotations

import socket

import grpc
import pytest

from tdb_client import TdbClient, TdbError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_call_to_a_port_where_nothing_listens_suggests_tdb_serve():
    port = _free_port()
    with TdbClient(f"127.0.0.1:{port}", timeout=5) as c, pytest.raises(TdbError) as e:
        c.initialize()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert "tdb serve" in e.value.message and str(port) in e.value.message, e.value.message


def test_waiting_for_a_server_that_is_not_there_suggests_tdb_serve():
    port = _free_port()
    with TdbClient(f"127.0.0.1:{port}", timeout=5) as c, pytest.raises(TdbError) as e:
        c.wait_ready(timeout=0.5)
    assert "tdb serve" in e.value.message and f"127.0.0.1:{port}" in e.value.message, e.value.message


def test_a_server_error_keeps_its_own_message(client):
    with pytest.raises(TdbError) as e:
        client.session().patch("blocks.0.attn.head.99", "zero")
    assert "tdb serve" not in e.value.message
