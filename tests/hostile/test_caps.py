"""Caps and quotas, each a `tdb serve` flag reported in Initialize's limits: the activation-records disk
cache (it grew to 749 MB from 40 calls) keeps at most --records-cache-mib, least recently used files
first; one client holds at most --max-sessions-per-client sessions, for at most --max-idle-timeout idle
seconds each (it could hold all 64 for 7 days); one analysis runs at most --max-analysis-s (a sweep ran
2.4 h)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from tdb.v1 import debugger_pb2 as pb, debugger_pb2_grpc
from tdb_client import Target, TdbClient, TdbError
from tdb_server.cli import LIMIT_FLAGS, build_parser
from tdb_server.limits import Limits

NEW = {"max_sessions_per_client": "--max-sessions-per-client", "max_idle_timeout_s": "--max-idle-timeout",
       "max_analysis_s": "--max-analysis-s", "records_cache_bytes": "--records-cache-mib",
       "max_expr_bytes": "--max-expr-mib"}


def test_each_cap_is_a_serve_flag_and_reported_in_initialize(client):
    flags = {field: flag for flag, field, _, _ in LIMIT_FLAGS}
    assert {k: flags.get(k) for k in NEW} == NEW
    args = build_parser().parse_args(["serve", "--max-sessions-per-client", "3", "--records-cache-mib", "8"])
    from tdb_server.cli import limits_from_args

    lim = limits_from_args(args)
    assert lim.max_sessions_per_client == 3 and lim.records_cache_bytes == 8 << 20
    reported = client.initialize().limits
    assert all(reported[k] == float(getattr(Limits(), k)) for k in NEW)


def test_one_client_holds_at_most_its_quota_of_sessions(make_server, gpt2_adapter):
    _, addr = make_server(gpt2_adapter, limits=Limits(max_sessions_per_client=3, max_idle_timeout_s=60))
    with TdbClient(addr) as c:
        held = [c.session() for _ in range(3)]
        with pytest.raises(TdbError) as e:
            c.session()
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.reason == "TOO_MANY_SESSIONS"
        assert "--max-sessions-per-client" in e.value.message
        with pytest.raises(TdbError) as e:            # and none of them for a week
            c.session(idle_timeout_s=7 * 86400)
        assert e.value.reason == "BAD_TIMEOUT" and "60" in e.value.message
        # another client (its own connection) is not held back by this one
        with grpc.insecure_channel(addr, options=[("tdb.test.another_client", 1)]) as ch:
            r = debugger_pb2_grpc.DebuggerStub(ch).CreateSession(pb.CreateSessionRequest(), timeout=10)
            assert r.session_id
        held[0].close()
        c.session().close()                           # room again once one is closed
        for s in held[1:]:
            s.close()


def test_an_analysis_stops_at_the_time_limit(make_server, bundled_adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("TDB_CACHE", str(tmp_path))       # no cached corpus pass: the records are computed
    _, addr = make_server(bundled_adapter, limits=Limits(max_analysis_s=0.0))
    with TdbClient(addr, timeout=60) as c:
        t0 = time.monotonic()
        with pytest.raises(TdbError) as e:
            c.patch_sweep([1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 5, 6], Target([7], [8]),
                          kind="head_out")
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and e.value.reason == "ANALYSIS_TOO_LONG"
        assert "--max-analysis-s" in e.value.message
        with pytest.raises(TdbError) as e:
            c.activation_records("blocks.1.attn.head.0", window=16)
        assert e.value.reason == "ANALYSIS_TOO_LONG"
        assert time.monotonic() - t0 < 30


def _cache_files(root: Path) -> list[Path]:
    return sorted((root / "records").rglob("*.npz"))


def test_the_records_cache_keeps_its_cap_least_recently_used_first(make_server, bundled_adapter, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("TDB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Mr Darcy and Mr Bingley walked to the house. " * 200)
    units = ["blocks.0.attn.head.0", "blocks.0.mlp.neuron.0", "blocks.1.attn.head.0", "blocks.1.mlp.neuron.0"]

    _, addr = make_server(bundled_adapter)                 # the default cap: every file stays
    with TdbClient(addr, timeout=120) as c:
        c.activation_records(units[0], corpus_path=str(corpus), window=16, n_top=2, n_random=0)
    one = sum(p.stat().st_size for p in _cache_files(tmp_path / "cache"))
    assert one > 0

    _, addr = make_server(bundled_adapter, limits=Limits(records_cache_bytes=int(2.5 * one)))
    with TdbClient(addr, timeout=120) as c:
        for unit in units[1:]:
            c.activation_records(unit, corpus_path=str(corpus), window=16, n_top=2, n_random=0)
        c.activation_records(units[2], corpus_path=str(corpus), window=16, n_top=2, n_random=0)  # a hit: used last
        c.activation_records(units[0], corpus_path=str(corpus), window=16, n_top=2, n_random=0)  # computed again
    files = _cache_files(tmp_path / "cache")
    assert sum(p.stat().st_size for p in files) <= 2.5 * one and len(files) == 2
    assert {p.stem for p in files} == {"blocks.0.attn.z.head", "blocks.1.attn.z.head"}
