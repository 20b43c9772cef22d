"""A session belongs to its creator: another client that knows only the session's id (ids have 64 random
bits; a log line or a screen share leaks one) can neither read, patch, export, stream nor close it. Each
session has a secret that only CreateSession's reply carries; the client sends it with every call naming
the session. Without it the answer is NOT_FOUND with the message a closed session gets, word for word, so
that nobody learns the session exists."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tdb.v1 import debugger_pb2 as pb, debugger_pb2_grpc
from tdb_client import TdbClient, TdbError
from tdb_client.client import Session

IDS = [[5, 17, 42, 8, 99]]


def _attempts(stranger: Session):
    return {
        "read": lambda: stranger.read("logits"),
        "evaluate": lambda: stranger.evaluate("logits.norm()"),
        "status": lambda: stranger.status(),
        "patch": lambda: stranger.patch("blocks.0.attn.out", "zero"),
        "clear": lambda: stranger.clear_patches(),
        "export": lambda: stranger.export_recording(),
        "launch": lambda: stranger.launch(token_ids=IDS),
        "events": lambda: stranger.poll_events(),
        "close": lambda: stranger._rpc("CloseSession", pb.CloseSessionRequest(session_id=stranger.id)),
    }


def _refusal(call) -> str:
    with pytest.raises(TdbError) as e:
        call()
    assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.reason == "UNKNOWN_SESSION"
    return e.value.message


@pytest.mark.parametrize("secret", ["", "not-the-secret", "x" * 1000])
def test_another_client_with_only_the_id_is_told_the_session_does_not_exist(client, gpt2_server, secret):
    with client.session() as mine:
        mine.launch(token_ids=IDS)
        with TdbClient(gpt2_server) as other:
            stranger = Session(other, mine.id, 0.0, secret)
            ghost = Session(other, "0123456789abcdef", 0.0, secret)      # an id that names nothing
            for what, call in _attempts(stranger).items():
                told = _refusal(call)
                assert told == _refusal(_attempts(ghost)[what]).replace("0123456789abcdef", mine.id), what
        assert mine.status().state == "exited" and mine.read("logits").shape[-1] > 0   # untouched, still mine
        assert mine.export_recording()


def test_a_raw_event_stream_needs_the_secret_too(client, gpt2_server):
    with client.session() as mine:
        channel = grpc.insecure_channel(gpt2_server)
        stub = debugger_pb2_grpc.DebuggerStub(channel)
        try:
            with pytest.raises(grpc.RpcError) as e:
                next(stub.Events(pb.EventsRequest(session_id=mine.id), timeout=10))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            mine.launch(token_ids=IDS)
            first = next(stub.Events(pb.EventsRequest(session_id=mine.id), metadata=mine.metadata, timeout=10))
            assert first.seq == 1
        finally:
            channel.close()


def test_the_secret_is_the_capability_and_the_creator_sees_no_difference(client, gpt2_server):
    with client.session() as mine:
        st = mine.launch(token_ids=IDS)
        mine.patch("blocks.0.attn.out", "add", np.zeros(client.model_info().d_model, np.float32))
        with TdbClient(gpt2_server) as other:       # handed the secret on purpose: a second window of one user
            shared = Session(other, mine.id, 0.0, dict(mine.metadata)["tdb-session-secret"])
            assert shared.status().run_id == st.run_id
        assert len(dict(mine.metadata)["tdb-session-secret"]) >= 32
