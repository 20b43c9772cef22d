"""Event streams and long polls wait on the server's event loop and hold no thread: hundreds of them open
leave Initialize, health and control calls answering promptly, every stream still gets its events, and
one stream past the configured ceiling (`max_streams`) gets RESOURCE_EXHAUSTED at once, never a hang.
Stopping a server with streams open ends them and leaves no thread behind."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tdb.v1 import debugger_pb2 as pb, debugger_pb2_grpc
from tdb_client import TdbClient, TdbError
from tdb_server.engine.scheduler import scheduler_for
from tdb_server.limits import Limits
from tdb_server.server import create_server

IDS = [3, 14, 15, 92, 65]
SESSIONS = 30
PER_SESSION = 10
STREAMS = SESSIONS * PER_SESSION          # the old server held 48 at most, each on a thread
CHANNELS = 4                              # clients (connections) the streams are spread over
RPC_THREADS = 8                           # far fewer threads than streams: a stream must not need one


def _open_streams(sessions) -> list:
    """PER_SESSION Events streams on each session; each session has had a run, so every stream's first
    event (the replayed RunStarted) shows that the server admitted it."""
    streams = [s.events(timeout=120) for s in sessions for _ in range(PER_SESSION)]
    for stream in streams:
        assert next(stream).kind == "run_started"
    return streams


def _refused_at_once(session) -> TdbError:
    t0 = time.perf_counter()
    with pytest.raises(TdbError) as e:
        next(iter(session.events(timeout=10)))
    assert e.value.reason == "TOO_MANY_STREAMS"
    assert time.perf_counter() - t0 < 2.0, "the refusal was not prompt"
    return e.value


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def test_hundreds_of_open_streams_leave_initialize_health_and_runs_answering(gpt2_adapter, make_server):
    _, address = make_server(gpt2_adapter, limits=Limits(max_streams=STREAMS, max_sessions=SESSIONS + 8),
                             max_workers=RPC_THREADS)
    clients = [TdbClient(address, timeout=20) for _ in range(CHANNELS)]     # the streams over a few connections
    try:
        sessions = [clients[i % CHANNELS].session() for i in range(SESSIONS + 1)]
        for s in sessions[:SESSIONS]:
            assert s.launch(token_ids=[IDS]).state == "exited"
        streams = _open_streams(sessions[:SESSIONS])
        try:
            refused = _refused_at_once(sessions[SESSIONS])
            assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(TdbError) as e:
                sessions[SESSIONS].poll_events(timeout=5.0)            # a long poll needs a slot too
            assert e.value.reason == "TOO_MANY_STREAMS"
            assert sessions[SESSIONS].poll_events() == ([], 0, False)  # a poll that does not wait does not

            with grpc.insecure_channel(address) as ch:
                stub = debugger_pb2_grpc.DebuggerStub(ch)
                health = health_pb2_grpc.HealthStub(ch)
                init = [_ms(lambda: stub.Initialize(pb.InitializeRequest(), timeout=5)) for _ in range(40)]
                checks = [_ms(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5)) for _ in range(40)]
            init.sort(), checks.sort()
            assert init[len(init) // 2] < 100 and checks[len(checks) // 2] < 100, (init, checks)

            # a run on a session with PER_SESSION streams open: every one of them sees it start and end
            run = sessions[0].launch(token_ids=[IDS])
            assert run.state == "exited"
            for stream in streams[:PER_SESSION]:
                kinds = []
                for ev in stream:
                    if ev.run_id == run.run_id:
                        kinds.append(ev.kind)
                    if kinds and kinds[-1] == "run_exited":
                        break
                assert kinds[0] == "run_started" and kinds[-1] == "run_exited", kinds
        finally:
            for stream in streams:
                stream.close()
        deadline = time.monotonic() + 20   # the slots come back once the server sees the streams closed
        while True:
            try:
                sessions[SESSIONS].poll_events(timeout=0.01)
                break
            except TdbError:
                assert time.monotonic() < deadline, "closed streams did not give their slots back"
                time.sleep(0.1)
        for s in sessions:
            s.close()
    finally:
        for c in clients:
            c.close()


def test_forty_long_polls_on_four_threads_leave_calls_answering(gpt2_adapter, make_server):
    """Issue 21 saw 40 long polls hang the server; each is a waiter now, and a run's events end them."""
    _, address = make_server(gpt2_adapter, limits=Limits(max_streams=64), max_workers=4)
    with TdbClient(address, timeout=30) as c:
        sessions = [c.session() for _ in range(10)]
        results: list = []

        def long_poll(s) -> None:
            results.append(s.poll_events(timeout=20.0))

        polls = [threading.Thread(target=long_poll, args=(s,), daemon=True) for s in sessions for _ in range(4)]
        for t in polls:
            t.start()
        time.sleep(1.0)                                       # the polls reach the server and wait
        assert not results, "a long poll answered before any event"
        t0 = time.perf_counter()
        assert c.model_info().n_layers == gpt2_adapter.info.n_layers
        for s in sessions:                                     # four threads, 40 polls: runs still go
            assert s.launch(token_ids=[IDS]).state == "exited"
        assert time.perf_counter() - t0 < 15
        for t in polls:
            t.join(10)
        assert len(results) == 40 and all(events and events[0].kind == "run_started" for events, _, _ in results)
        for s in sessions:
            s.close()


def test_a_client_connects_and_opens_a_session_while_every_rpc_thread_waits(gpt2_adapter, make_server):
    """Launches that wait for the device hold both RPC threads; Initialize and CreateSession have their own."""
    _, address = make_server(gpt2_adapter, max_workers=2)
    with TdbClient(address, timeout=60) as c:
        sessions = [c.session() for _ in range(4)]
        done: list[str] = []
        with scheduler_for(gpt2_adapter).turn():              # the device is busy: every run waits for it
            def launch(s) -> None:
                done.append(s.launch(token_ids=[IDS], timeout=30).state)

            launches = [threading.Thread(target=launch, args=(s,), daemon=True) for s in sessions]
            for t in launches:
                t.start()
            time.sleep(1.0)                                   # both RPC threads wait in Launch
            assert not done
            with grpc.insecure_channel(address) as ch:
                stub = debugger_pb2_grpc.DebuggerStub(ch)
                t0 = time.perf_counter()
                stub.Initialize(pb.InitializeRequest(), timeout=5)
                stub.CreateSession(pb.CreateSessionRequest(name="newcomer"), timeout=5)
                assert time.perf_counter() - t0 < 2.0
        for t in launches:
            t.join(30)
        assert done == ["exited"] * 4
        for s in sessions:
            s.close()


def test_a_long_poll_ends_when_its_client_leaves(gpt2_adapter, make_server):
    """A long poll whose client goes away gives its slot back at once (with a ceiling of one)."""
    _, address = make_server(gpt2_adapter, limits=Limits(max_streams=1))
    with TdbClient(address, timeout=20) as c, c.session() as s:
        leaving = TdbClient(address, timeout=30)
        polled = leaving.session()

        def poll_until_refused_or_cut() -> None:
            try:
                polled.poll_events(timeout=20.0)
            except TdbError:
                pass

        def long_poll() -> threading.Thread:
            t = threading.Thread(target=poll_until_refused_or_cut, daemon=True)
            t.start()
            return t

        poll = long_poll()
        deadline = time.monotonic() + 10
        while True:     # until the long poll holds the one slot (a probe may take it first: then poll again)
            assert time.monotonic() < deadline, "the long poll never took its slot"
            time.sleep(0.05)
            if not poll.is_alive():
                poll = long_poll()
                continue
            try:
                s.poll_events(timeout=0.01)
            except TdbError as e:
                assert e.reason == "TOO_MANY_STREAMS"
                break
        leaving.close()              # the client goes away mid-poll
        poll.join(5)
        deadline = time.monotonic() + 5
        while True:
            try:
                t0 = time.perf_counter()
                assert s.poll_events(timeout=0.2) == ([], 0, False)     # the slot is free again: this one waits
                assert time.perf_counter() - t0 >= 0.15
                break
            except TdbError as e:
                assert e.reason == "TOO_MANY_STREAMS" and time.monotonic() < deadline, "the cancelled poll kept its slot"
                time.sleep(0.05)


def test_stopping_a_server_with_open_streams_ends_them_and_leaves_no_thread(gpt2_adapter):
    before = {t.ident for t in threading.enumerate()}
    handle, port = create_server("127.0.0.1:0", gpt2_adapter, limits=Limits(max_streams=64))
    with TdbClient(f"127.0.0.1:{port}", timeout=20) as c:
        s = c.session()
        assert s.launch(token_ids=[IDS]).state == "exited"
        streams = _open_streams([s])
        t0 = time.perf_counter()
        handle.stop(grace=1.0)
        assert time.perf_counter() - t0 < 10, "stop hung with streams open"
        for stream in streams:     # each ends: with its session's Terminated event, or cancelled by the stop
            kinds = []
            try:
                kinds += [ev.kind for ev in stream]
                assert kinds[-1] == "terminated", kinds
            except TdbError as e:
                assert e.code != grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.perf_counter() - t0 < 20, "the streams did not end with the server"
    deadline = time.monotonic() + 10
    while True:
        left = [t for t in threading.enumerate() if t.ident not in before and t.name != "tdb-aio" and t.is_alive()]
        if not left:
            break
        assert time.monotonic() < deadline, f"threads left after stop: {[t.name for t in left]}"
        time.sleep(0.1)
