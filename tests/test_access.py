"""Access control and limits: bearer tokens on every RPC (streams included), TLS, budgets."""

from __future__ import annotations

import subprocess

import grpc
import numpy as np
import pytest

from tdb_client import Target, TdbClient, TdbError
from tdb_server.limits import Limits

IDS = [[5, 17, 42, 8, 99, 5, 17, 42, 3, 61]]


def test_token_required_on_every_rpc_including_streams(make_server, gpt2_adapter):
    _, addr = make_server(gpt2_adapter, token="s3cret")
    for bad in (None, "wrong"):
        with TdbClient(addr, token=bad or "", timeout=10) as c:
            with pytest.raises(TdbError) as e:
                c.initialize()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert e.value.message in ("missing bearer token", "invalid bearer token")
    with TdbClient(addr, token="s3cret") as good, good.session() as s:
        assert good.model_info().n_layers == 2
        s.launch(token_ids=IDS)
        with TdbClient(addr, token="nope") as bad:
            from tdb_client.client import Session

            intruder = Session(bad, s.id, 0)
            for call in (lambda: intruder.read("logits"), lambda: list(intruder.events())[:1], intruder.status):
                with pytest.raises(TdbError) as e:
                    call()
                assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert s.read("logits").shape[:2] == (1, 10)
    # health stays open for probes (when the optional grpc-extras are installed: they are in dev)
    pytest.importorskip("grpc_health")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    for name in ("a", "b"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.crt"),
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True)
    return d


def test_tls_connects_only_with_the_right_root_certificate(make_server, gpt2_adapter, tls_files):
    _, addr = make_server(gpt2_adapter, tls_cert=str(tls_files / "a.crt"), tls_key=str(tls_files / "a.key"))
    addr = addr.replace("127.0.0.1", "localhost")
    with TdbClient(addr, root_certificates=(tls_files / "a.crt").read_bytes(), timeout=10) as c:
        assert c.model_info().architecture == "gpt2"
    with TdbClient(addr, root_certificates=(tls_files / "b.crt").read_bytes(), timeout=5) as c:
        with pytest.raises(TdbError) as e:
            c.initialize()
        assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    with TdbClient(addr, timeout=5) as c:                    # plaintext to a TLS port
        with pytest.raises(TdbError):
            c.initialize()


def test_limits_are_reported_and_enforced(make_server, gpt2_adapter):
    limits = Limits(max_sessions=2, max_batch=2, max_prompt_tokens=12, max_read_bytes=1000,
                    session_capture_bytes=20_000)
    _, addr = make_server(gpt2_adapter, limits=limits)
    with TdbClient(addr) as c:
        reported = c.initialize().limits
        assert reported["max_sessions"] == 2 and reported["max_read_bytes"] == 1000
        with c.session() as s, c.session():
            with pytest.raises(TdbError) as e:
                c.session()
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 sessions" in e.value.message
            with pytest.raises(TdbError) as e:
                s.launch(token_ids=IDS * 3)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == "BATCH_TOO_LARGE"
            with pytest.raises(TdbError) as e:
                s.launch(token_ids=[list(range(13))])
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == "TOO_LONG"
            for analysis in (lambda: c.node_table(list(range(13)), Target([1], [2])),       # analyses too
                             lambda: c.logit_lens(list(range(13))),
                             lambda: c.patch_sweep(list(range(13)), list(range(1, 14)), Target([1], [2]))):
                with pytest.raises(TdbError) as e:
                    analysis()
                assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == "TOO_LONG"
                assert "--max-prompt-tokens" in e.value.message
            # the capture budget: every site of a 10-token run does not fit in 20 kB ...
            with pytest.raises(TdbError) as e:
                s.launch(token_ids=IDS)
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.reason == "CAPTURE_BUDGET"
            # ... and the next, smaller request succeeds
            assert s.launch(token_ids=IDS, capture=["logits", "blocks.*.resid_post"]).state == "exited"
            with pytest.raises(TdbError) as e:
                s.read("logits")
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.reason == "READ_TOO_LARGE"
            assert np.isfinite(s.read("logits", "[0, -1, :8]")).all()


def test_every_limit_is_a_serve_flag():
    """Each limit the server enforces can be set on the command line (and reaches the server's Limits)."""
    import dataclasses

    from tdb_server.cli import LIMIT_FLAGS, build_parser, limits_from_args

    assert {field for _, field, _, _ in LIMIT_FLAGS} == {f.name for f in dataclasses.fields(Limits)}
    args = build_parser().parse_args(["serve", "--max-sessions", "3", "--max-read-mib", "1.5", "--idle-timeout", "7"])
    limits = limits_from_args(args)
    assert limits.max_sessions == 3 and limits.max_read_bytes == int(1.5 * 2**20) and limits.idle_timeout_s == 7.0
    assert limits_from_args(build_parser().parse_args(["serve"])) == Limits()
