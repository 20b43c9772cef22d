"""Event streams and long polls hold a server thread each: the server admits at most `max_streams` of
them and keeps threads for every other call, so open streams never starve Initialize, health or control
calls; one stream past the ceiling gets RESOURCE_EXHAUSTED at once, never a hang."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from tdb_client import TdbClient, TdbError
from tdb_server.limits import Limits

IDS = [3, 14, 15, 92, 65]
STREAMS = 6


def test_streams_past_the_ceiling_are_refused_and_other_calls_still_answer(gpt2_adapter, make_server):
    _, address = make_server(gpt2_adapter, limits=Limits(max_streams=STREAMS))
    with TdbClient(address, timeout=20) as c:
        sessions = [c.session() for _ in range(STREAMS + 1)]
        streams = [s.events() for s in sessions[:STREAMS]]
        opened = threading.Barrier(STREAMS + 1)

        def drain(stream) -> None:
            opened.wait()
            try:
                for _ in stream:
                    pass
            except TdbError:
                pass          # cancelled at the end

        threads = [threading.Thread(target=drain, args=(st,), daemon=True) for st in streams]
        for t in threads:
            t.start()
        opened.wait()
        try:
            refused = None
            for _ in range(50):           # until every stream holds its slot
                try:
                    next(iter(sessions[STREAMS].events(timeout=5)))
                except TdbError as e:
                    if e.reason == "TOO_MANY_STREAMS":
                        refused = e
                        break
            assert refused is not None, "the stream past the ceiling was admitted"
            assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(TdbError) as e:
                sessions[STREAMS].poll_events(timeout=5.0)            # a long poll needs a slot too
            assert e.value.reason == "TOO_MANY_STREAMS"
            assert sessions[STREAMS].poll_events() == ([], 0, False)  # a poll that does not wait does not
            with TdbClient(address, timeout=5) as other:             # the reserved threads answer
                assert other.model_info().n_layers == gpt2_adapter.info.n_layers
                with other.session() as s:
                    assert s.launch(token_ids=[IDS]).state == "exited"
        finally:
            for st in streams:
                st.close()
            for t in threads:
                t.join(10)
        for _ in range(100):              # the slots come back once the server sees the streams closed
            try:
                sessions[0].poll_events(timeout=0.01)
                break
            except TdbError:
                time.sleep(0.1)
        else:
            pytest.fail("closed streams did not give their slots back")
        for s in sessions:
            s.close()
