"""Record and replay: a recording replayed on a fresh server reproduces every stop and read bit for bit."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from tdb_client import Breakpoint, Generate, TdbClient, TdbError
from tdb_server.model import build_random_model

IDS = [[5, 17, 42, 8, 99, 5, 17, 42, 3, 61]]


def _debug_session(s):
    s.set_breakpoints(["blocks.*.attn.out", Breakpoint("blocks.1.mlp.post", condition="max > 0")])
    st = s.launch(token_ids=IDS, capture=["*"])
    s.read("blocks.0.attn.pattern")
    s.patch("blocks.0.attn.head.1", "scale", scalar=0.5)
    s.step("into")
    s.continue_()
    s.stats("blocks.1.resid_pre")
    s.evaluate("logit_lens(blocks.1.resid_pre)[0, -1].topk(3)")
    s.continue_()                              # stops at blocks.1.mlp.post (its condition holds)
    s.set_breakpoints([])
    s.continue_()
    s.patch("blocks.1.resid_pre", "add", np.full(32, 0.1, dtype=np.float32), positions=[2])   # session scope
    s.launch(token_ids=IDS, generate=Generate(3, stop_at_tokens=True))
    s.step("token")
    s.continue_(wait=False)
    s.pause()                                  # wherever it lands, the replay stops at the same place
    s.status(wait=True)
    if s.status().state == "paused":
        s.continue_()
    s.read("logits", "[0, -1]")
    return st


def test_replay_on_a_fresh_server_reproduces_stops_and_reads(gpt2_server, make_server, tmp_path):
    with TdbClient(gpt2_server) as c, c.session() as s:
        _debug_session(s)
        path = tmp_path / "session.tdbrec.json"
        text = s.export_recording(str(path))
    doc = json.loads(text)
    assert doc["format"] == "tdb-recording/1" and doc["model"]["architecture"] == "gpt2"
    rpcs = [a["rpc"] for a in doc["actions"]]
    assert {"Launch", "Patch", "ReadTensor", "Evaluate", "TensorStats", "Pause", "Step"} <= set(rpcs)
    fresh = build_random_model("gpt2", seed=0)        # same weights, a new process-level object and server
    _, addr = make_server(fresh)
    with TdbClient(addr) as c:
        report = c.replay(str(path))
    assert report.ok, report.mismatches
    assert report.actions == len(rpcs) and report.stops_checked >= 5 and report.reads_checked >= 4


def test_a_tampered_recording_reports_the_mismatch(gpt2_server, make_server):
    with TdbClient(gpt2_server) as c, c.session() as s:
        s.set_breakpoints(["blocks.1.attn.out"])
        s.launch(token_ids=IDS)
        s.read("blocks.1.attn.out")
        text = s.export_recording()
    doc = json.loads(text)
    doc["actions"][1]["outcome"]["stop"]["site"] = "blocks.0.attn.out"
    doc["actions"][2]["outcome"]["crc32"] ^= 1
    with TdbClient(gpt2_server) as c:
        report = c.replay(json.dumps(doc))
    assert not report.ok and len(report.mismatches) == 2
    assert "blocks.0.attn.out" in report.mismatches[0] and "crc32" in report.mismatches[1]
    # a recording from before 0.2 kept a SHA-256 of each read: still checked
    doc["actions"][1]["outcome"]["stop"]["site"] = "blocks.1.attn.out"
    doc["actions"][2]["outcome"]["crc32"] ^= 1
    legacy = doc["actions"][2]["outcome"]
    del legacy["crc32"]
    legacy["sha256"] = "0" * 64
    with TdbClient(gpt2_server) as c:
        report = c.replay(json.dumps(doc))
    assert len(report.mismatches) == 1 and "sha256" in report.mismatches[0]


def test_a_recording_against_another_model_is_refused(gpt2_server, make_server):
    with TdbClient(gpt2_server) as c, c.session() as s:
        s.launch(token_ids=IDS)
        text = s.export_recording()
    other = build_random_model("gpt2", seed=1)
    _, addr = make_server(other)
    with TdbClient(addr) as c:
        with pytest.raises(TdbError) as e:
            c.replay(text)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and e.value.reason == "MODEL_MISMATCH"
    assert "weights_sha256" in e.value.message
    with TdbClient(gpt2_server) as c:
        with pytest.raises(TdbError) as e:
            c.replay("{not json")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
