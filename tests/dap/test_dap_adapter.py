"""`tdb dap` driven as a subprocess by a DAP client written here (Content-Length framed JSON), over
stdio and over `--listen` TCP. The conversations read like an IDE's transcript; every response and
event is checked against the fields the DAP specification requires, and seq / request_seq are checked.

Numbers after a patch are checked against a plain HF forward with a plain torch hook written here."""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from dap_client import TIMEOUT, DapClient

ROOT = Path(__file__).resolve().parents[2]
IDS = [5, 17, 42, 8, 99, 5, 17, 42, 3, 61]
POS = len(IDS) - 1          # the position patched (the last: its logits are the ones compared)

pytestmark = pytest.mark.timeout(60)


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gpt2_adapter):
    """The tiny random GPT-2 of the test suite, saved as a model directory (no tokenizer)."""
    path = tmp_path_factory.mktemp("dap-model")
    gpt2_adapter.model.save_pretrained(path)
    return str(path)


def _adapter_cmd(*extra: str) -> list[str]:
    """`tdb dap`, allowed to load models from the temporary folder (where the tests save theirs)."""
    return [sys.executable, "-m", "tdb_server", "dap", "--data-dir", tempfile.gettempdir(), *extra]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return env


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.fixture
def stdio_dap():
    proc = subprocess.Popen(_adapter_cmd(), cwd=ROOT, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        yield proc, DapClient(proc.stdout, proc.stdin)
    finally:
        _kill(proc)


@pytest.fixture
def tcp_dap():
    proc = subprocess.Popen(_adapter_cmd("--listen", "0", "--once"), cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sock = None
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        first = lines.get(timeout=TIMEOUT).decode()
        m = re.match(r"tdb dap: listening on 127\.0\.0\.1:(\d+)", first)
        assert m, f"unexpected first line {first!r}"
        sock = socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=TIMEOUT)
        sock.settimeout(None)
        yield proc, DapClient(sock.makefile("rb"), sock.makefile("wb"))
    finally:
        if sock is not None:
            sock.close()
        _kill(proc)


# -- the reference ---------------------------------------------------------------------------------

def hf_last_logits(adapter, ids, zero_attn_out_pos: tuple[int, int] | None = None) -> np.ndarray:
    """Plain HF forward; optionally block `layer`'s attention write zeroed at one position."""
    handles = []
    if zero_attn_out_pos is not None:
        layer, pos = zero_attn_out_pos

        def hook(module, args, out):
            x = out[0].clone()
            x[:, pos] = 0
            return (x, *out[1:])

        handles.append(adapter.model.transformer.h[layer].attn.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return adapter.model(torch.tensor([ids])).logits[0, -1].float().numpy()
    finally:
        for h in handles:
            h.remove()


# -- the conversation ------------------------------------------------------------------------------

def conversation(dap: DapClient, launch: dict, adapter) -> None:
    caps = dap.body("initialize", {"clientID": "pytest", "adapterID": "tdb", "linesStartAt1": True,
                                   "columnsStartAt1": True, "supportsVariableType": True,
                                   "supportsProgressReporting": True, "supportsInvalidatedEvent": True})
    for flag in ("supportsConfigurationDoneRequest", "supportsFunctionBreakpoints", "supportsSetVariable",
                 "supportsDataBreakpoints", "supportsTerminateRequest", "supportsSteppingGranularity"):
        assert caps[flag] is True

    dap.request("launch", {"name": "transcript", **launch})
    dap.event("initialized")
    if "model" in launch:                   # the embedded server's model load is reported as progress
        assert "loading" in dap.event("progressStart")["body"]["title"]
        dap.event("progressEnd")

    bps = dap.body("setFunctionBreakpoints", {"breakpoints": [{"name": "blocks.1.attn.out"},
                                                              {"name": "blocks.1.atn.out"}]})["breakpoints"]
    assert bps[0]["verified"] is True
    assert bps[1]["verified"] is False and "did you mean blocks.1.attn.out" in bps[1]["message"]
    dap.request("configurationDone")

    stopped = dap.event("stopped")["body"]
    assert stopped["reason"] == "function breakpoint" and stopped["hitBreakpointIds"] == [bps[0]["id"]]
    tid = stopped["threadId"]
    [thread] = dap.body("threads")["threads"]
    assert thread["id"] == tid

    trace = dap.body("stackTrace", {"threadId": tid})
    frames = trace["stackFrames"]
    assert [f["name"] for f in frames] == ["blocks.1.attn.out", "blocks.1.attn", "blocks.1", "model"]
    assert trace["totalFrames"] == 4
    src = frames[0]["source"]
    listing = dap.body("source", {"source": src, "sourceReference": src["sourceReference"]})["content"].splitlines()
    assert listing[frames[0]["line"] - 1].startswith("blocks.1.attn.out ")

    scopes = dap.body("scopes", {"frameId": frames[0]["id"]})["scopes"]
    assert [s["name"] for s in scopes][:2] == ["Value", "Captured"]
    [value] = dap.body("variables", {"variablesReference": scopes[0]["variablesReference"]})["variables"]
    d = adapter.info.d_model
    assert value["name"] == "blocks.1.attn.out" and value["type"] == f"tensor float32 [1, {len(IDS)}, {d}]"
    assert value["variablesReference"] > 0 and value["indexedVariables"] == 1
    [batch0] = dap.body("variables", {"variablesReference": value["variablesReference"], "filter": "indexed",
                                      "start": 0, "count": 1})["variables"]
    assert batch0["name"] == "[0]" and batch0["indexedVariables"] == len(IDS)
    positions = dap.body("variables", {"variablesReference": batch0["variablesReference"]})["variables"]
    assert [p["name"] for p in positions] == [f"[{i}]" for i in range(len(IDS))]
    assert positions[POS]["evaluateName"] == f"x[0][{POS}]"

    ev = dap.body("evaluate", {"expression": f"blocks.1.attn.out[0, {POS}]", "frameId": frames[0]["id"],
                               "context": "repl"})
    assert ev["variablesReference"] > 0 and ev["indexedVariables"] == d
    elems = dap.body("variables", {"variablesReference": ev["variablesReference"]})["variables"]
    assert len(elems) == d and all(e["variablesReference"] == 0 for e in elems)
    norm = float(dap.body("evaluate", {"expression": f"norm(x[0, {POS}])", "context": "watch"})["result"])
    assert norm == pytest.approx(np.linalg.norm([float(e["value"]) for e in elems]), rel=1e-4)
    assert norm > 0

    # setVariable = patch: zero the last position of this stop's value
    patched = dap.body("setVariable", {"variablesReference": batch0["variablesReference"], "name": f"[{POS}]",
                                       "value": "0"})
    assert "norm=0 " in patched["value"]
    dap.event("invalidated")
    assert float(dap.body("evaluate", {"expression": f"norm(x[0, {POS}])"})["result"]) == 0.0

    # an invalid request fails with a message; the adapter keeps going
    assert dap.request("frobnicate", {}, ok=False)["success"] is False
    stale = dap.request("variables", {"variablesReference": 2 ** 30}, ok=False)
    assert "stale" in stale["message"]
    assert dap.request("scopes", {}, ok=False)["success"] is False
    bad = dap.request("setVariable", {"variablesReference": batch0["variablesReference"], "name": f"[{POS}]",
                                      "value": "sideways"}, ok=False)
    assert "not a number" in bad["message"]
    assert dap.body("threads")["threads"] == [thread]

    dap.request("next", {"threadId": tid})
    step = dap.event("stopped")["body"]
    assert step["reason"] == "step"
    top = dap.body("stackTrace", {"threadId": tid, "levels": 1})["stackFrames"][0]
    assert not top["name"].startswith("blocks.1")           # stepped over the rest of block 1
    assert dap.request("scopes", {"frameId": frames[0]["id"]}, ok=False)["success"] is False   # stale frame

    cont = dap.request("continue", {"threadId": tid})
    assert cont["body"]["allThreadsContinued"] is True
    assert dap.event("exited")["body"]["exitCode"] == 0
    dap.event("terminated")
    assert any("tdb: run" in e["body"]["output"] for e in dap.seen("output"))
    assert dap.body("threads")["threads"] == []

    # the finished run is still readable: its logits match HF with the same position zeroed
    logits = dap.body("evaluate", {"expression": "logits[0, -1]", "context": "repl"})
    got = np.array([float(v["value"]) for v in dap.body("variables", {
        "variablesReference": logits["variablesReference"]})["variables"]])
    want = hf_last_logits(adapter, IDS, zero_attn_out_pos=(1, POS))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want - hf_last_logits(adapter, IDS)).max() > 1e-4        # the patch mattered

    dap.request("disconnect", {"terminateDebuggee": True})
    assert not dap.errors, dap.errors


def test_stdio_conversation(stdio_dap, model_dir, gpt2_adapter):
    proc, dap = stdio_dap
    conversation(dap, {"model": model_dir, "tokens": IDS}, gpt2_adapter)
    proc.stdin.close()
    rc = proc.wait(timeout=15)
    assert rc == 0, proc.stderr.read().decode()[-3000:]


def test_tcp_conversation(tcp_dap, model_dir, gpt2_adapter):
    proc, dap = tcp_dap
    conversation(dap, {"model": model_dir, "tokens": IDS}, gpt2_adapter)
    rc = proc.wait(timeout=15)                 # --once: exits after its client disconnects
    assert rc == 0, proc.stderr.read().decode()[-3000:]


# -- a running server, line breakpoints, log points, conditions, watches, patches by expression ------

def hf_patched_logits(adapter, ids, head: tuple[int, int], mlp_scale: tuple[int, float]) -> np.ndarray:
    """Plain HF forward with one head's input to c_proj zeroed and one block's MLP write scaled."""
    layer, h = head
    dh = adapter.info.d_head
    blocks = adapter.model.transformer.h

    def zero_head(module, args):
        x = args[0].clone()
        x[..., h * dh:(h + 1) * dh] = 0
        return (x,)

    def scale_mlp(module, args, out):
        return out * mlp_scale[1]

    handles = [blocks[layer].attn.c_proj.register_forward_pre_hook(zero_head),
               blocks[mlp_scale[0]].mlp.register_forward_hook(scale_mlp)]
    try:
        with torch.no_grad():
            return adapter.model(torch.tensor([ids])).logits[0, -1].float().numpy()
    finally:
        for x in handles:
            x.remove()


def test_server_mode_breakpoints_watches_and_patches(stdio_dap, gpt2_server, gpt2_adapter):
    proc, dap = stdio_dap
    dap.body("initialize", {"clientID": "pytest", "adapterID": "tdb", "linesStartAt1": True})

    # launch errors are clear, and leave the adapter ready for a good launch
    for bad, words in (({"tokens": IDS, "generate": {"maxNewTokens": 2, "topP": 0.9}}, "no option 'topP'"),
                       ({"tokens": IDS, "generate": "5"}, "'generate' must be a number"),
                       ({"prompt": "Mr. Darcy"}, "no tokenizer"),
                       ({"tokens": [1, 2, 10 ** 6]}, "outside the vocabulary"),
                       ({}, "exactly one of 'prompt'")):
        resp = dap.request("launch", {"server": gpt2_server, **bad}, ok=False)
        assert resp["success"] is False and words in resp["message"], resp["message"]
    dap.request("launch", {"server": gpt2_server, "tokens": IDS})
    dap.event("initialized")

    # the virtual source: one site a line; line breakpoints, a log point, a condition that never holds
    listing = dap.body("source", {"sourceReference": 1})["content"].splitlines()
    line = {text.split()[0]: i + 1 for i, text in enumerate(listing)}
    src = {"name": "sites", "sourceReference": 1}
    assert len(dap.body("breakpointLocations", {"source": src, "line": 1, "endLine": 3})["breakpoints"]) == 3
    bps = dap.body("setBreakpoints", {"source": src, "breakpoints": [
        {"line": line["blocks.0.mlp.out"], "logMessage": "mlp0 norm={norm}"},
        {"line": line["blocks.0.attn.out"], "condition": "norm > 1e9"},
        {"line": line["blocks.0.resid_mid"], "condition": "norm >"},
        {"line": 9999}]})["breakpoints"]
    assert [b["verified"] for b in bps] == [True, True, False, False]
    assert "parse" in bps[2]["message"] and "not a site" in bps[3]["message"]
    assert bps[0]["line"] == line["blocks.0.mlp.out"]

    [fn] = dap.body("setFunctionBreakpoints", {"breakpoints": [{"name": "blocks.*.attn.out", "hitCondition": "2"}]})[
        "breakpoints"]
    assert fn["verified"]
    info = dap.body("dataBreakpointInfo", {"name": "blocks.1.mlp.out"})
    assert info["dataId"] == "blocks.1.mlp.out" and info["accessTypes"] == ["write"]
    assert dap.body("dataBreakpointInfo", {"name": "blocks.1.mlp.out[0]"})["dataId"] is None
    watches = dap.body("setDataBreakpoints", {"breakpoints": [
        {"dataId": "blocks.1.mlp.out", "accessType": "write", "condition": "norm > 0"},
        {"dataId": "blocks.0.mlp.out", "accessType": "write"}]})["breakpoints"]     # default: NaN/Inf
    assert all(w["verified"] for w in watches)
    dap.request("configurationDone")

    stop = dap.event("stopped")["body"]                     # hit 2 of blocks.*.attn.out
    assert stop["reason"] == "function breakpoint" and stop["hitBreakpointIds"] == [fn["id"]]
    # the description names the breakpoint by the IDE's id, not the server's numbering
    assert stop["description"] == f"breakpoint [{fn['id']}] at blocks.1.attn.out", stop["description"]
    tid = stop["threadId"]
    [log_line] = [e["body"] for e in dap.seen("output") if "mlp0 norm=" in e["body"]["output"]]
    assert log_line["line"] == line["blocks.0.mlp.out"] and log_line["category"] == "console"
    frames = dap.body("stackTrace", {"threadId": tid})["stackFrames"]
    assert frames[0]["name"] == "blocks.1.attn.out" and frames[0]["line"] == line["blocks.1.attn.out"]

    # patches by REPL assignment (a head, now) and by setExpression (a later site: registered)
    said = dap.body("evaluate", {"expression": "blocks.1.attn.head.2 = 0", "context": "repl"})["result"]
    assert "applied" in said
    later = dap.body("setExpression", {"expression": "blocks.1.mlp.out", "value": "*2"})
    assert "registered" in later["value"]
    bad = dap.request("setExpression", {"expression": "blocks.1.attn.out[0][0][5]", "value": "0"}, ok=False)
    assert "d_model" in bad["message"]

    dap.request("continue", {"threadId": tid})
    watch = dap.event("stopped")["body"]
    assert watch["reason"] == "data breakpoint" and watch["hitBreakpointIds"] == [watches[0]["id"]]
    top = dap.body("stackTrace", {"threadId": tid, "levels": 1})["stackFrames"][0]
    assert top["name"] == "blocks.1.mlp.out"

    dap.request("stepIn", {"threadId": tid})
    assert dap.event("stopped")["body"]["reason"] == "step"
    top = dap.body("stackTrace", {"threadId": tid, "levels": 1})["stackFrames"][0]
    assert top["name"] == "blocks.1.resid_post"
    dap.request("stepOut", {"threadId": tid})
    assert dap.event("stopped")["body"]["reason"] == "step"

    # cancel: a request still queued behind another is answered "cancelled" (or, if the adapter was
    # quicker than the cancel, normally); either way the adapter answers everything and goes on
    first = dap.send("evaluate", {"expression": "blocks.1.attn.v", "context": "repl"})
    second = dap.send("evaluate", {"expression": "x.shape", "context": "repl"})
    assert dap.request("cancel", {"requestId": second})["success"]
    assert dap.response(first)["success"]
    late = dap.response(second)
    assert late["success"] or late["message"] == "cancelled"

    dap.request("continue", {"threadId": tid})
    assert dap.event("exited")["body"]["exitCode"] == 0
    dap.event("terminated")
    logits = dap.body("evaluate", {"expression": "logits[0, -1]", "context": "repl"})
    got = np.array([float(v["value"]) for v in dap.body("variables", {
        "variablesReference": logits["variablesReference"]})["variables"]])
    np.testing.assert_allclose(got, hf_patched_logits(gpt2_adapter, IDS, (1, 2), (1, 2.0)), atol=1e-4)

    dap.request("disconnect", {})
    assert not dap.errors, dap.errors
    proc.stdin.close()
    rc = proc.wait(timeout=15)
    assert rc == 0, proc.stderr.read().decode()[-3000:]


def test_stop_on_entry_launch_breakpoints_then_terminate(stdio_dap, gpt2_server):
    proc, dap = stdio_dap
    dap.body("initialize", {"clientID": "pytest", "adapterID": "tdb"})
    dap.request("launch", {"server": gpt2_server, "tokens": IDS, "stopOnEntry": True,
                           "breakpoints": ["blocks.0.mlp.out", "bogus.site"]})
    dap.event("initialized")
    [warning] = [e for e in dap.seen("output") if "bogus.site" in e["body"]["output"]]
    assert warning["body"]["category"] == "stderr"

    # a malformed message is reported and skipped
    proc.stdin.write(b"Content-Length: 5\r\n\r\n{bad}")
    proc.stdin.flush()
    dap.wait_for(lambda: any("malformed" in e["body"]["output"] for e in dap.seen("output")))

    dap.request("configurationDone")
    stop = dap.event("stopped")["body"]
    assert stop["reason"] == "entry"
    frames = dap.body("stackTrace", {"threadId": stop["threadId"]})["stackFrames"]
    assert frames[0]["name"] == "embed (before)"
    dap.request("continue", {"threadId": stop["threadId"]})
    stop = dap.event("stopped")["body"]
    assert stop["reason"] == "function breakpoint"
    assert dap.body("stackTrace", {"threadId": stop["threadId"], "levels": 1})["stackFrames"][0]["name"] == \
        "blocks.0.mlp.out"
    dap.request("terminate", {})
    assert dap.event("exited")["body"]["exitCode"] == 2
    dap.event("terminated")
    dap.request("disconnect", {})
    assert not dap.errors, dap.errors


def test_without_an_event_stream_the_bridge_polls(stdio_dap, gpt2_adapter, make_server):
    """A server at its ceiling of event streams refuses the bridge's stream: the IDE is told, and the
    session goes on by polling (stops, output and exit still arrive)."""
    from tdb_server.limits import Limits

    _, address = make_server(gpt2_adapter, limits=Limits(max_streams=0))
    proc, dap = stdio_dap
    dap.body("initialize", {"clientID": "pytest", "adapterID": "tdb"})
    dap.request("launch", {"server": address, "tokens": IDS, "breakpoints": ["blocks.0.mlp.out"]})
    dap.event("initialized")
    dap.request("configurationDone")
    stop = dap.event("stopped")["body"]
    assert stop["reason"] == "function breakpoint"
    assert any("polling for events" in e["body"]["output"] for e in dap.seen("output"))
    dap.request("continue", {"threadId": stop["threadId"]})
    assert dap.event("exited")["body"]["exitCode"] == 0
    dap.request("disconnect", {})
    assert not dap.errors, dap.errors


def test_prompt_words_the_model_does_not_know_are_printed_in_the_console(stdio_dap, bundled_server):
    """The induction model is word-level: 'Pemberley' becomes its unknown token; the run's warning (an
    Output event of the server) reaches the IDE's console."""
    _, dap = stdio_dap
    dap.body("initialize", {"clientID": "pytest", "adapterID": "tdb"})
    dap.request("launch", {"server": bundled_server, "prompt": "the lady saw Mr Darcy at Pemberley and Mr"})
    dap.event("initialized")
    dap.request("configurationDone")
    dap.event("terminated")
    [line] = [e["body"]["output"] for e in dap.seen("output") if "not in the model's vocabulary" in e["body"]["output"]]
    assert "'Pemberley' is not in the model's vocabulary" in line
    dap.request("disconnect", {})
    assert not dap.errors, dap.errors
