"""Record and replay of debugging sessions.

A recording ("tdb-recording/1", JSON) holds the model's identity (architecture, config and weights
hashes, tokenizer hash, dtype) and the session's actions in order — SetBreakpoints, Launch, Continue,
Step, Pause, Terminate, Patch, ClearPatches, and the reads (ReadTensor, TensorStats, Evaluate) — each
with its request (protobuf JSON) and its outcome: where the run stopped, or the SHA-256 of the bytes a
read returned. Replaying it on a server with the same model re-issues the requests through the same
servicer code in a fresh session and checks every stop and every read bit for bit. A pause (a timing
accident in the original) is replayed as a stop at the place the pause landed.

A recording is bounded: at most MAX_ACTIONS actions, and patch values are kept whole only up to
RECORDED_VALUE_BYTES each and RECORDING_VALUE_BUDGET in all (a session that patched in eight 128 MiB
values used to hold them all again here, after ClearPatches too, and could no longer export). A larger
value is kept as its size and CRC-32 (`value_dropped` in the action's outcome); replay reports such a
patch as not replayable. A recording sent to ReplayRecording is checked for its shape before anything
runs: anything that is not a recording is INVALID_ARGUMENT (BAD_RECORDING), never INTERNAL.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from typing import Any

import grpc
import torch
from google.protobuf import json_format

from tdb.v1 import debugger_pb2 as pb

from . import __version__, wire
from .errors import FailedPrecondition, InvalidArgument
from .model.fingerprint import fingerprint

FORMAT = "tdb-recording/1"
CONTROL = ("Launch", "Continue", "Step", "Pause", "Terminate")
READS = ("ReadTensor", "TensorStats", "Evaluate")
SETUP = ("SetBreakpoints", "Patch", "ClearPatches")
_REQUESTS = {"SetBreakpoints": pb.SetBreakpointsRequest, "Launch": pb.LaunchRequest, "Continue": pb.ContinueRequest,
             "Step": pb.StepRequest, "Pause": pb.PauseRequest, "Terminate": pb.TerminateRequest,
             "Patch": pb.PatchRequest, "ClearPatches": pb.ClearPatchesRequest, "ReadTensor": pb.ReadTensorRequest,
             "TensorStats": pb.TensorStatsRequest, "Evaluate": pb.EvaluateRequest}


def read_digest(t: torch.Tensor, crc32: int) -> dict[str, Any]:
    """What a read returned: dtype, shape and the CRC-32 of its bytes (the one sent with the last chunk).
    Recordings before 0.2 kept a SHA-256 instead; replay checks whichever the recording has."""
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "crc32": crc32}


def outcome(status: pb.RunStatus) -> dict[str, Any]:
    out: dict[str, Any] = {"state": pb.RunState.Name(status.state), "run_id": status.run_id}
    if status.HasField("stop"):
        st = status.stop
        out["stop"] = {"site": st.site, "when": pb.BreakWhen.Name(st.when), "reason": st.reason,
                       "token": st.token, "hits": list(st.hit_breakpoint_ids)}
    if status.HasField("result") and status.result.top:
        out["top"] = [t.tokens[0].token_id for t in status.result.top if t.tokens]
    return out


MAX_ACTIONS = 200_000
RECORDED_VALUE_BYTES = 1 << 20      # a patch value kept whole in the recording
RECORDING_VALUE_BUDGET = 32 << 20   # patch values one session's recording keeps in all


def _without_value(request: pb.PatchRequest) -> pb.PatchRequest:
    """The request with its value's bytes left out (dtype and shape kept), copied field by field so that
    the large bytes are never copied."""
    slim = pb.PatchRequest()
    for fd, v in request.ListFields():
        if fd.name == "value":
            slim.value.dtype = v.dtype
            slim.value.shape.extend(v.shape)
        elif isinstance(v, (str, bytes, int, float, bool)):
            setattr(slim, fd.name, v)
        elif fd.type == fd.TYPE_MESSAGE:       # the selector (PatchRequest has no repeated message field)
            getattr(slim, fd.name).CopyFrom(v)
        else:                                  # repeated scalars (tokens)
            getattr(slim, fd.name).extend(v)
    return slim


def _bounded_patch(session: Any, request: pb.PatchRequest, result: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    n = len(request.value.data)
    kept = getattr(session, "recording_value_bytes", 0)
    if n <= RECORDED_VALUE_BYTES and kept + n <= RECORDING_VALUE_BUDGET:
        session.recording_value_bytes = kept + n
        return request, result
    return _without_value(request), {**result, "value_dropped": {"bytes": n, "crc32": zlib.crc32(request.value.data)}}


def record(session: Any, rpc: str, request: Any, result: dict[str, Any]) -> None:
    """Append one action to the session's recording. Requests are kept as wire bytes (compact) and turned
    into JSON only when the recording is exported; a large patch value is kept as its size and checksum."""
    if len(session.recording) >= MAX_ACTIONS:
        session.recording_truncated = True
        return
    if rpc == "Patch" and request.HasField("value"):
        request, result = _bounded_patch(session, request, result)
    session.recording.append((rpc, request.SerializeToString(), result))


def export(session: Any) -> str:
    if getattr(session, "recording_truncated", False):
        raise FailedPrecondition(f"this session did more than {MAX_ACTIONS} recorded actions; its recording is "
                                 "incomplete and would not replay", reason="RECORDING_TRUNCATED")
    actions = []
    for rpc, raw, result in list(session.recording):
        req = json_format.MessageToDict(_REQUESTS[rpc].FromString(raw), preserving_proto_field_name=True)
        req.pop("session_id", None)
        actions.append({"rpc": rpc, "request": req, "outcome": result})
    doc = {"format": FORMAT, "tdb_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "model": fingerprint(session.adapter), "actions": actions}
    return json.dumps(doc, indent=1)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _ReplayContext:
    """A stand-in for grpc.ServicerContext when the replay calls servicer methods in-process (as the owner
    of the replay's session: its secret goes with every call)."""

    def __init__(self, secret: str = ""):
        self.secret = secret

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("tdb-session-secret", self.secret),)

    def is_active(self) -> bool:
        return True

    def time_remaining(self) -> float | None:
        return None

    def set_trailing_metadata(self, md: Any) -> None:
        pass

    def add_callback(self, cb: Any) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Abort(code, details)


def _forced_pauses(actions: list[dict]) -> dict[int, tuple[str, int]]:
    """For each resume followed (before the next resume) by a Pause that landed somewhere: where it landed."""
    forced: dict[int, tuple[str, int]] = {}
    last_resume = None
    for i, a in enumerate(actions):
        if a["rpc"] in ("Launch", "Continue", "Step"):
            last_resume = i
        elif a["rpc"] == "Pause" and last_resume is not None:
            stop = a["outcome"].get("stop")
            if isinstance(stop, dict) and stop.get("reason") == "pause":
                site, token = stop.get("site"), stop.get("token", 0)
                if not isinstance(site, str) or not isinstance(token, int):
                    raise InvalidArgument(f"action {i}: a pause stop needs a site and a token number",
                                          reason="BAD_RECORDING")
                forced[last_resume] = (site, token)
    return forced


def _checked(doc: Any) -> list[dict]:
    """The actions of a recording, each with an rpc name, a request and an outcome (dicts); BAD_RECORDING
    for anything else."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("actions"), list):
        raise InvalidArgument(f"not a {FORMAT} recording", reason="BAD_RECORDING")
    if not isinstance(doc.get("model") or {}, dict):
        raise InvalidArgument("the recording's model is not an object", reason="BAD_RECORDING")
    actions = doc["actions"]
    if len(actions) > MAX_ACTIONS:
        raise InvalidArgument(f"{len(actions)} actions; a recording holds at most {MAX_ACTIONS}", reason="BAD_RECORDING")
    out = []
    for i, a in enumerate(actions):
        if not isinstance(a, dict) or not isinstance(a.get("rpc"), str) or a["rpc"] not in _REQUESTS:
            rpc = a.get("rpc") if isinstance(a, dict) else a
            raise InvalidArgument(f"action {i}: unknown rpc {str(rpc)[:64]!r}", reason="BAD_RECORDING")
        request, outcome_ = a.get("request") or {}, a.get("outcome") or {}
        if not isinstance(request, dict) or not isinstance(outcome_, dict):
            raise InvalidArgument(f"action {i}: its request and outcome must be objects", reason="BAD_RECORDING")
        out.append({"rpc": a["rpc"], "request": request, "outcome": outcome_})
    return out


def _request(i: int, action: dict) -> Any:
    try:
        return json_format.ParseDict(action["request"], _REQUESTS[action["rpc"]](), ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as e:
        raise InvalidArgument(f"action {i} ({action['rpc']}): {str(e)[:300]}", reason="BAD_RECORDING") from None


def replay(servicer: Any, text: str, stop_on_mismatch: bool = False, keep_session: bool = False,
           owner: str = "") -> pb.ReplayReport:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:     # JSONDecodeError is a ValueError; absurd nesting recurses
        raise InvalidArgument(f"the recording is not JSON: {type(e).__name__}: {str(e)[:200]}",
                              reason="BAD_RECORDING") from None
    actions = _checked(doc)
    mine, theirs = fingerprint(servicer.adapter), doc.get("model") or {}
    for key in ("architecture", "config_sha256", "weights_sha256", "tokenizer_sha256", "dtype"):
        if theirs.get(key) != mine.get(key):
            raise FailedPrecondition(
                f"the recording was made on another model: {key} is {theirs.get(key)!r} there and {mine.get(key)!r} "
                f"here (recorded on {theirs.get('name')!r}, this server holds {mine.get('name')!r})",
                reason="MODEL_MISMATCH")
    requests = [_request(i, a) for i, a in enumerate(actions)]    # every request parses, before anything runs
    forced = _forced_pauses(actions)
    session = servicer.sessions.create("replay", owner=owner)
    try:
        return _replay_into(servicer, session, actions, requests, forced, stop_on_mismatch)
    finally:
        if not keep_session:
            servicer.sessions.close(session.id, reason="replay finished")


def _replay_into(servicer: Any, session: Any, actions: list[dict], requests: list[Any],
                 forced: dict[int, tuple[str, int]], stop_on_mismatch: bool) -> pb.ReplayReport:
    report = pb.ReplayReport(session_id=session.id, session_secret=session.secret)
    ctx = _ReplayContext(session.secret)
    for i, (action, req) in enumerate(zip(actions, requests)):
        rpc = action["rpc"]
        dropped = action["outcome"].get("value_dropped")
        if rpc == "Patch" and dropped:
            report.actions += 1
            report.mismatches.append(f"action {i} (Patch): its value ({dropped.get('bytes') if isinstance(dropped, dict) else '?'} "
                                     f"bytes) was not kept in the recording (patch values are kept up to "
                                     f"{RECORDED_VALUE_BYTES >> 20} MiB each, {RECORDING_VALUE_BUDGET >> 20} MiB in all): "
                                     "not replayed")
            if stop_on_mismatch:
                break
            continue
        req.session_id = session.id
        if rpc in ("Launch", "Continue", "Step", "Pause", "Terminate"):
            req.wait = True
        if i in forced:
            session.force_stop(*forced[i])
        want = action["outcome"]
        try:
            if rpc == "ReadTensor":
                req.shared_memory = False                 # the replay checks the bytes themselves
                chunks = list(servicer.ReadTensor(req, ctx))
                if not chunks:
                    raise _Abort(grpc.StatusCode.INTERNAL, "the read returned nothing")
                first = chunks[0]
                data = b"".join(c.data for c in chunks)
                dtype = str(wire.torch_dtype(first.dtype)).replace("torch.", "")
                got: dict[str, Any] = {"dtype": dtype, "shape": list(first.shape), "crc32": chunks[-1].crc32}
                if "sha256" in want:
                    got["sha256"] = hashlib.sha256(data).hexdigest()
            else:
                resp = getattr(servicer, rpc)(req, ctx)
                got = outcome_of(rpc, resp)
        except _Abort as e:
            got = {"error": e.code.name, "message": e.details}
        report.actions += 1
        problems = _compare(rpc, want, got)
        if rpc in CONTROL and "stop" in want:
            report.stops_checked += 1
        if rpc in READS:
            report.reads_checked += 1
        for p in problems:
            report.mismatches.append(f"action {i} ({rpc}): {p}")
        if problems and stop_on_mismatch:
            break
    report.ok = not report.mismatches
    return report


def outcome_of(rpc: str, resp: Any) -> dict[str, Any]:
    if rpc in CONTROL:
        return outcome(resp)
    if rpc == "TensorStats":
        return {"summary": json_format.MessageToDict(resp)}
    if rpc == "Evaluate":
        out = {"result": resp.result, "tokens": list(resp.tokens)}
        if resp.HasField("value"):
            out["sha256"] = hashlib.sha256(resp.value.data).hexdigest()
        return out
    return {}


def _compare(rpc: str, want: dict[str, Any], got: dict[str, Any]) -> list[str]:
    if rpc in CONTROL and want.get("state") == "RUNNING":
        return []       # recorded without waiting: the next action's outcome says where it went
    if rpc in SETUP:
        return [f"failed on replay: {got['message']}"] if "error" in got else []
    keys = [k for k in want if k != "run_id"]
    return [f"{k}: recorded {want[k]!r}, replayed {got.get(k)!r}" for k in keys if got.get(k) != want[k]]
