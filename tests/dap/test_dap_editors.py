"""`tdb dap` driven the way VS Code and nvim-dap really drive it (issue 20): one setBreakpoints per
source, the listing named by a path with no reference, generation stepped token by token, hover over a
dotted name, a launch answered before the model loads; and the bridge's own security (issue 21): the
token goes only to its server, a listener beyond loopback needs its own credential, model folders obey
the allow-list. Numbers are checked against a plain HF forward or `generate`."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
from concurrent import futures

import grpc
import pytest
import torch
from dap_client import TIMEOUT, DapClient
from test_dap_adapter import IDS, ROOT, _adapter_cmd, _env, _kill
from test_dap_adapter import model_dir, stdio_dap  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(90)
LISTING = "random-gpt2.tdbsites"      # the site listing of the tests' random GPT-2


def _start(dap: DapClient, **caps) -> None:
    dap.body("initialize", {"clientID": "pytest", "adapterID": "tdb", "linesStartAt1": True, **caps})


def _launch(dap: DapClient, **args) -> None:
    dap.request("launch", args)
    dap.event("initialized")


def _lines(dap: DapClient) -> dict[str, int]:
    listing = dap.body("source", {"sourceReference": 1})["content"].splitlines()
    return {text.split()[0]: i + 1 for i, text in enumerate(listing)}


def _top_frame(dap: DapClient, tid: int) -> dict:
    return dap.body("stackTrace", {"threadId": tid, "levels": 1})["stackFrames"][0]


def _finish(proc, dap: DapClient) -> None:
    dap.request("disconnect", {})
    assert not dap.errors, dap.errors


# -- item 1: one book per source ------------------------------------------------------------------------

def test_breakpoints_of_another_file_leave_the_listing_alone(stdio_dap, gpt2_server):
    proc, dap = stdio_dap
    _start(dap)
    _launch(dap, server=gpt2_server, tokens=IDS)
    line = _lines(dap)
    listing = {"name": LISTING, "sourceReference": 1}
    [mine] = dap.body("setBreakpoints", {"source": listing, "breakpoints": [
        {"line": line["blocks.1.mlp.out"]}]})["breakpoints"]
    assert mine["verified"]
    # VS Code sends one request per file with breakpoints: train.py's must not wipe the listing's
    train = {"name": "train.py", "path": "/work/train.py"}
    [other] = dap.body("setBreakpoints", {"source": train, "breakpoints": [{"line": 3}]})["breakpoints"]
    assert other["verified"] is False and other["source"]["path"] == "/work/train.py"
    assert "site listing" in other["message"]
    fn = dap.body("setFunctionBreakpoints", {"breakpoints": [{"name": "blocks.0.attn.out"}]})["breakpoints"]
    assert fn[0]["verified"]
    dap.request("configurationDone")

    stop = dap.event("stopped")["body"]
    assert stop["hitBreakpointIds"] == [fn[0]["id"]]
    tid = stop["threadId"]
    dap.body("setFunctionBreakpoints", {"breakpoints": []})      # function breakpoints apart from sources
    dap.request("continue", {"threadId": tid})
    stop = dap.event("stopped")["body"]
    assert stop["hitBreakpointIds"] == [mine["id"]] and _top_frame(dap, tid)["name"] == "blocks.1.mlp.out"
    _finish(proc, dap)


# -- item 2: the listing as nvim-dap sees it -------------------------------------------------------------

def test_neovim_shaped_listing_requests(stdio_dap, gpt2_server):
    proc, dap = stdio_dap
    _start(dap)
    _launch(dap, server=gpt2_server, tokens=IDS, stopOnEntry=True)
    dap.request("configurationDone")
    tid = dap.event("stopped")["body"]["threadId"]
    dap.request("stepIn", {"threadId": tid})
    dap.event("stopped")
    src = _top_frame(dap, tid)["source"]
    assert src["path"] == LISTING and src["name"] == LISTING     # nvim-dap names the buffer so
    line = _lines(dap)

    # toggle_breakpoint in that buffer: a path (made absolute by the editor), no sourceReference
    path_only = {"name": LISTING, "path": "/home/me/project/" + LISTING}
    [bp] = dap.body("setBreakpoints", {"source": path_only, "breakpoints": [
        {"line": line["blocks.1.attn.out"]}]})["breakpoints"]
    assert bp["verified"], bp
    assert dap.body("breakpointLocations", {"source": path_only, "line": 1, "endLine": 2})["breakpoints"]
    # another model's listing: refused, whatever its line numbers would say
    [foreign] = dap.body("setBreakpoints", {"source": {"path": "/tmp/austen.tdbsites"}, "breakpoints": [
        {"line": line["blocks.1.attn.out"]}]})["breakpoints"]
    assert foreign["verified"] is False and "another model" in foreign["message"]
    assert LISTING in foreign["message"]

    # a source request by path works; one with neither reference nor path says what exists
    assert dap.body("source", {"source": path_only})["content"].startswith("embed")
    resp = dap.request("source", {}, ok=False)
    assert "no source" in resp["message"] and "sourceReference 1" in resp["message"], resp["message"]
    assert "None" not in resp["message"]

    dap.request("continue", {"threadId": tid})
    stop = dap.event("stopped")["body"]
    assert stop["hitBreakpointIds"] == [bp["id"]]
    # item 5: hover over what Neovim's <cexpr> reads of `blocks.1.attn.out`, and over a listing line
    said = dap.body("evaluate", {"expression": "blocks", "context": "hover"})["result"]
    assert "blocks.0.attn.out" in said and "unknown name" not in said
    hovered = dap.body("evaluate", {"expression": "attn", "context": "hover", "source": path_only,
                                    "line": line["blocks.1.attn.out"]})
    assert hovered["result"].startswith("[1, 10, 32] mean=")
    assert dap.body("evaluate", {"expression": "blocks.1.attn.out", "context": "hover"})["result"] == \
        hovered["result"]
    _finish(proc, dap)


# -- item 3: generation ---------------------------------------------------------------------------------

def _hf_greedy(adapter, ids, n) -> list[int]:
    with torch.no_grad():
        out = adapter.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_generation_stepped_token_by_token(stdio_dap, gpt2_server, gpt2_adapter):
    proc, dap = stdio_dap
    _start(dap)
    _launch(dap, server=gpt2_server, tokens=IDS, generate={"maxNewTokens": 4, "stopAtTokens": True})
    dap.request("configurationDone")
    stop = dap.event("stopped")["body"]
    tid = stop["threadId"]
    assert stop["reason"] == "step" and "token 0" in stop["description"]
    want = _hf_greedy(gpt2_adapter, IDS, 4)

    frame = _top_frame(dap, tid)
    scopes = dap.body("scopes", {"frameId": frame["id"]})["scopes"]
    gen = [s for s in scopes if s["name"] == "Generated"][0]
    text, tokens = dap.body("variables", {"variablesReference": gen["variablesReference"]})["variables"]
    assert text["name"] == "text" and text["value"] == repr(f"<{want[0]}>") and tokens["value"] == str(want[:1])
    assert any("tdb: token 0" in e["body"]["output"] for e in dap.seen("output"))

    dap.request("next", {"threadId": tid})                     # Step Over at a boundary: the next token
    stop = dap.event("stopped")["body"]
    assert "token 1" in stop["description"]
    dap.request("stepIn", {"threadId": tid})                   # Step Into: into the next token's forward
    dap.event("stopped")
    assert _top_frame(dap, tid)["name"].startswith("embed")
    dap.request("continue", {"threadId": tid})
    dap.event("stopped")                                       # stopAtTokens: token 2
    dap.request("continue", {"threadId": tid})
    assert dap.event("exited")["body"]["exitCode"] == 0
    said = "".join(e["body"]["output"] for e in dap.seen("output"))
    assert "generated: " in said and f"-> {repr(' '.join(f'<{t}>' for t in want[:2]))}" in said
    _finish(proc, dap)


# -- item 4: hit counts and malformed conditions ----------------------------------------------------------

def test_hit_counts_survive_a_change_after_a_malformed_condition(stdio_dap, gpt2_server):
    proc, dap = stdio_dap
    _start(dap)
    _launch(dap, server=gpt2_server, tokens=IDS)
    line = _lines(dap)
    listing = {"name": LISTING, "sourceReference": 1}
    fns = dap.body("setFunctionBreakpoints", {"breakpoints": [
        {"name": "blocks.*.resid_post", "hitCondition": "2"}, {"name": "blocks.1.attn.out"}]})["breakpoints"]
    bad = dap.body("setBreakpoints", {"source": listing, "breakpoints": [
        {"line": line["blocks.0.mlp.out"], "condition": "norm >"}]})["breakpoints"]
    assert bad[0]["verified"] is False and bad[0]["message"]
    dap.request("configurationDone")
    stop = dap.event("stopped")["body"]                         # blocks.1.attn.out; resid_post counted once
    tid = stop["threadId"]
    assert stop["hitBreakpointIds"] == [fns[1]["id"]]
    # an editor changes one breakpoint: every set goes to the server again, the malformed one included
    again = dap.body("setBreakpoints", {"source": listing, "breakpoints": [
        {"line": line["blocks.0.mlp.out"], "condition": "norm >"}, {"line": line["logits"]}]})["breakpoints"]
    assert [b["verified"] for b in again] == [False, True]
    dap.request("continue", {"threadId": tid})
    stop = dap.event("stopped")["body"]
    assert stop["hitBreakpointIds"] == [fns[0]["id"]]
    assert _top_frame(dap, tid)["name"] == "blocks.1.resid_post"     # the 2nd hit, not a count started over
    _finish(proc, dap)


# -- item 6: launch answered before the model loads --------------------------------------------------------

def test_launch_is_answered_before_the_model_loads(stdio_dap, model_dir):
    proc, dap = stdio_dap
    _start(dap, supportsProgressReporting=True)
    resp = dap.request("launch", {"model": model_dir, "tokens": IDS})
    start, end = dap.event("progressStart"), dap.event("progressEnd")
    init = dap.event("initialized")
    assert resp["seq"] < start["seq"] < end["seq"] < init["seq"]
    assert "loading" in start["body"]["title"]
    dap.request("configurationDone")
    assert dap.event("exited")["body"]["exitCode"] == 0
    _finish(proc, dap)


def test_without_progress_support_loading_is_told_in_the_console(stdio_dap, model_dir):
    proc, dap = stdio_dap
    _start(dap)
    dap.request("launch", {"model": model_dir, "tokens": IDS})
    dap.event("initialized")
    assert not dap.seen("progressStart")
    assert any("loading" in e["body"]["output"] for e in dap.seen("output"))
    _finish(proc, dap)


def test_a_model_that_fails_to_load_is_told_before_terminated(stdio_dap, tmp_path):
    """The launch is answered before loading: a model that then fails to load says why in the console."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    proc, dap = stdio_dap
    _start(dap, supportsProgressReporting=True)
    dap.request("launch", {"model": str(broken), "tokens": IDS})
    dap.event("progressEnd")
    dap.event("terminated")
    [said] = [e["body"] for e in dap.seen("output") if "launch failed" in e["body"]["output"]]
    assert said["category"] == "stderr" and "broken-model" in said["output"]
    assert not dap.seen("initialized")
    _finish(proc, dap)


# -- items 7, 8 ---------------------------------------------------------------------------------------

def test_unit_value_topk_tokens_and_no_debug(stdio_dap, gpt2_server):
    proc, dap = stdio_dap
    _start(dap)
    _launch(dap, server=gpt2_server, tokens=IDS, breakpoints=["blocks.1.attn.head.1"])
    dap.request("configurationDone")
    tid = dap.event("stopped")["body"]["threadId"]
    frame = _top_frame(dap, tid)
    value_scope = dap.body("scopes", {"frameId": frame["id"]})["scopes"][0]
    [value] = dap.body("variables", {"variablesReference": value_scope["variablesReference"]})["variables"]
    assert value["name"] == "blocks.1.attn.head.1"                     # the head's write, named for it
    head = dap.body("evaluate", {"expression": "x", "context": "watch"})["result"]
    assert head == value["value"]
    dap.request("continue", {"threadId": tid})
    dap.event("exited")
    top = dap.body("evaluate", {"expression": "logits[0, -1].topk(3)", "context": "repl"})
    assert top["result"].count("(id ") == 3 and "'<" in top["result"], top["result"]
    _finish(proc, dap)


def test_no_debug_does_not_stop_on_entry(stdio_dap, gpt2_server):
    proc, dap = stdio_dap
    _start(dap)
    _launch(dap, server=gpt2_server, tokens=IDS, stopOnEntry=True, noDebug=True, breakpoints=["blocks.0.mlp.out"])
    dap.request("configurationDone")
    assert dap.event("exited")["body"]["exitCode"] == 0
    assert not dap.seen("stopped")
    _finish(proc, dap)


def test_a_bad_model_is_told_in_tdbs_words(stdio_dap, tmp_path):
    proc, dap = stdio_dap
    _start(dap)
    for model, words in ((str(tmp_path / "nope"), "nor a model folder"), ("no/such-model", "not a bundled model"),
                         ("/etc", "tdb dap --data-dir")):
        resp = dap.request("launch", {"model": model, "tokens": IDS}, ok=False)
        assert words in resp["message"], resp["message"]
        assert "huggingface" not in resp["message"].lower() and "repo" not in resp["message"].lower()
    _finish(proc, dap)


# -- issue 21 item 4: the token, the listener, the model folder ----------------------------------------------

class _Recorder(grpc.GenericRpcHandler):
    """A gRPC server that answers nothing and notes the metadata every call brings."""

    def __init__(self) -> None:
        self.metadata: list[dict] = []

    def service(self, details):
        self.metadata.append(dict(details.invocation_metadata))
        return None


def test_the_token_goes_only_to_its_server(gpt2_adapter, make_server):
    _, protected = make_server(gpt2_adapter, token="s3cret")
    recorder = _Recorder()
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[recorder])
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    env = {**_env(), "TDB_TOKEN": "s3cret", "TDB_SERVER": protected}
    proc = subprocess.Popen(_adapter_cmd(), cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        dap = DapClient(proc.stdout, proc.stdin)
        _start(dap)
        resp = dap.request("launch", {"server": f"127.0.0.1:{port}", "tokens": IDS}, ok=False)
        assert recorder.metadata, resp                 # the launch reached the other server ...
        assert all("authorization" not in md for md in recorder.metadata)      # ... without the token
        _launch(dap, tokens=IDS)                          # no "server": the configured one, with its token
        dap.request("configurationDone")
        assert dap.event("exited")["body"]["exitCode"] == 0
        _finish(proc, dap)
    finally:
        _kill(proc)
        other.stop(None)


def _listen(*extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(_adapter_cmd("--listen", "0", "--once", *extra), cwd=ROOT, env=env or _env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_listener_beyond_loopback_needs_its_own_credential():
    proc = _listen("--host", "0.0.0.0")
    try:
        assert proc.wait(timeout=TIMEOUT) == 2
        assert "--listen-token" in proc.stderr.read().decode()
    finally:
        _kill(proc)


def test_a_listener_with_a_credential_serves_only_who_presents_it(gpt2_server):
    proc = _listen("--listen-token", "open-sesame")
    sock = None
    try:
        first = proc.stdout.readline().decode()
        port = int(first.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        dap = DapClient(sock.makefile("rb"), sock.makefile("wb"))
        _start(dap)
        assert "credential" in dap.request("threads", {}, ok=False)["message"]
        resp = dap.request("launch", {"server": gpt2_server, "tokens": IDS, "adapterToken": "guess"}, ok=False)
        assert "adapterToken" in resp["message"]
        assert proc.wait(timeout=TIMEOUT) == 0          # the connection is closed: --once exits
    finally:
        if sock is not None:
            sock.close()
        _kill(proc)
    proc = _listen("--listen-token", "open-sesame")
    try:
        port = int(proc.stdout.readline().decode().rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        dap = DapClient(sock.makefile("rb"), sock.makefile("wb"))
        _start(dap)
        _launch(dap, server=gpt2_server, tokens=IDS, adapterToken="open-sesame")
        dap.request("configurationDone")
        assert dap.event("exited")["body"]["exitCode"] == 0
        _finish(proc, dap)
    finally:
        sock.close()
        _kill(proc)


def test_a_model_folder_outside_the_allow_list_is_refused(model_dir):
    """The tests' adapter may load from the temporary folder (--data-dir); one without it may not."""
    proc = subprocess.Popen([*_adapter_cmd()[:4]], cwd=ROOT, env={**_env(), "TDB_DATA_DIRS": ""},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        dap = DapClient(proc.stdout, proc.stdin)
        _start(dap)
        resp = dap.request("launch", {"model": model_dir, "tokens": IDS}, ok=False)
        assert "--data-dir" in resp["message"] and model_dir.startswith(tempfile.gettempdir())
        assert tempfile.gettempdir() not in resp["message"].replace(model_dir, "")   # no folders of the host told
        _finish(proc, dap)
    finally:
        _kill(proc)


def test_the_listener_credential_does_not_apply_to_stdio(gpt2_server):
    """TDB_DAP_TOKEN guards --listen; the IDE's own stdio pipe needs no adapterToken."""
    proc = subprocess.Popen(_adapter_cmd(), cwd=ROOT, env={**_env(), "TDB_DAP_TOKEN": "open-sesame"},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        dap = DapClient(proc.stdout, proc.stdin)
        _start(dap)
        _launch(dap, server=gpt2_server, tokens=IDS)
        dap.request("configurationDone")
        assert dap.event("exited")["body"]["exitCode"] == 0
        _finish(proc, dap)
    finally:
        _kill(proc)


def test_without_the_server_package_a_model_launch_says_to_name_a_server(monkeypatch):
    """The tdb-client distribution has no tdb_server: a launch that needs an embedded server says so."""
    from tdb_client.dap import backend
    from tdb_client.dap.protocol import DapError

    monkeypatch.setitem(sys.modules, "tdb_server.files", None)        # as if not installed
    with pytest.raises(DapError, match='name a running one with "server"'):
        backend.model_path(None)
