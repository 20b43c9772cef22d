"""A DAP client for the tests (Content-Length framed JSON over two byte streams): every response and
event is checked against the fields the DAP specification requires, and seq / request_seq are checked.
Used by tests/dap (the adapter's own tests) and tests/test_docs_shell.py (the docs' `tdb dap` lines)."""

from __future__ import annotations

import json
import re
import threading

TIMEOUT = 30.0


# -- the fields DAP requires (body key -> type; "items" checks each element of a list) ----------------

_REQUIRED_BODY = {
    "threads": {"threads": list}, "stackTrace": {"stackFrames": list}, "scopes": {"scopes": list},
    "variables": {"variables": list}, "evaluate": {"result": str, "variablesReference": int},
    "setVariable": {"value": str}, "setExpression": {"value": str}, "source": {"content": str},
    "setFunctionBreakpoints": {"breakpoints": list}, "setBreakpoints": {"breakpoints": list},
    "setDataBreakpoints": {"breakpoints": list},
    "dataBreakpointInfo": {"dataId": (str, type(None)), "description": str},
    "continue": {}, "breakpointLocations": {"breakpoints": list},
}
_REQUIRED_ITEMS = {
    "threads": {"id": int, "name": str}, "stackFrames": {"id": int, "name": str, "line": int, "column": int},
    "scopes": {"name": str, "variablesReference": int, "expensive": bool},
    "variables": {"name": str, "value": str, "variablesReference": int}, "breakpoints": {"verified": bool},
    "breakpointLocations.breakpoints": {"line": int},
}
_REQUIRED_EVENT = {
    "stopped": {"reason": str}, "continued": {"threadId": int}, "exited": {"exitCode": int},
    "thread": {"reason": str, "threadId": int}, "output": {"output": str},
    "breakpoint": {"reason": str, "breakpoint": dict}, "progressStart": {"progressId": str, "title": str},
    "progressEnd": {"progressId": str}, "invalidated": {},
}


def _check_fields(where: str, obj: dict, spec: dict) -> None:
    for key, typ in spec.items():
        assert key in obj, f"{where}: missing required field {key!r} in {obj}"
        assert isinstance(obj[key], typ), f"{where}: {key!r} should be {typ}, is {obj[key]!r}"
        items = _REQUIRED_ITEMS.get(f"{where}.{key}", _REQUIRED_ITEMS.get(key))
        if items is not None and isinstance(obj[key], list):
            for item in obj[key]:
                _check_fields(f"{where}.{key}[]", item, items)


class DapClient:
    """A minimal DAP client: framed JSON over two byte streams, a reader thread, and waits."""

    def __init__(self, rfile, wfile):
        self._w = wfile
        self._seq = 0
        self._last_in = 0
        self._responses: dict[int, dict] = {}
        self.events: list[dict] = []
        self._used: set[int] = set()
        self._cv = threading.Condition()
        self.errors: list[str] = []
        threading.Thread(target=self._read, args=(rfile,), daemon=True).start()

    def _read(self, r) -> None:
        try:
            while True:
                header = b""
                while not header.endswith(b"\r\n\r\n"):
                    c = r.read(1)
                    if not c:
                        return
                    header += c
                m = re.search(rb"Content-Length: (\d+)", header)
                body = r.read(int(m.group(1)))
                msg = json.loads(body)
                with self._cv:
                    if not (isinstance(msg.get("seq"), int) and msg["seq"] > self._last_in):
                        self.errors.append(f"seq not increasing: {msg.get('seq')} after {self._last_in}")
                    self._last_in = msg.get("seq", self._last_in)
                    if msg["type"] == "response":
                        self._responses[msg["request_seq"]] = msg
                    elif msg["type"] == "event":
                        _check_fields(f"event {msg['event']}", msg.get("body", {}),
                                      _REQUIRED_EVENT.get(msg["event"], {}))
                        self.events.append(msg)
                    else:
                        self.errors.append(f"unexpected message {msg}")
                    self._cv.notify_all()
        except Exception as e:  # noqa: BLE001 - surfaced by the assertions on self.errors
            self.errors.append(f"reader: {type(e).__name__}: {e}")

    def send(self, command: str, arguments: dict | None = None) -> int:
        self._seq += 1
        msg = {"seq": self._seq, "type": "request", "command": command}
        if arguments is not None:
            msg["arguments"] = arguments
        body = json.dumps(msg).encode()
        self._w.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self._w.flush()
        return self._seq

    def response(self, seq: int, timeout: float = TIMEOUT) -> dict:
        with self._cv:
            assert self._cv.wait_for(lambda: seq in self._responses, timeout), f"no response to request {seq}"
            resp = self._responses.pop(seq)
        assert resp["type"] == "response" and resp["request_seq"] == seq
        assert isinstance(resp["success"], bool) and isinstance(resp["command"], str)
        if not resp["success"]:
            assert isinstance(resp.get("message"), str) and resp["message"], resp
        return resp

    def request(self, command: str, arguments: dict | None = None, *, ok: bool = True) -> dict:
        seq = self.send(command, arguments)
        resp = self.response(seq)
        assert resp["command"] == command
        if ok:
            assert resp["success"], f"{command} failed: {resp.get('message')}"
            _check_fields(command, resp.get("body", {}), _REQUIRED_BODY.get(command, {}))
        return resp

    def body(self, command: str, arguments: dict | None = None) -> dict:
        return self.request(command, arguments).get("body", {})

    def event(self, name: str, timeout: float = TIMEOUT) -> dict:
        """The next event called `name` not returned before."""
        def find():
            for i, e in enumerate(self.events):
                if e["event"] == name and i not in self._used:
                    return i
            return None
        with self._cv:
            assert self._cv.wait_for(lambda: find() is not None, timeout), \
                f"no {name!r} event; got {[e['event'] for e in self.events]}"
            i = find()
            self._used.add(i)
            return self.events[i]

    def wait_for(self, predicate, timeout: float = TIMEOUT) -> None:
        with self._cv:
            assert self._cv.wait_for(predicate, timeout), f"timed out; events: {[e['event'] for e in self.events]}"

    def seen(self, name: str) -> list[dict]:
        with self._cv:
            return [e for e in self.events if e["event"] == name]
