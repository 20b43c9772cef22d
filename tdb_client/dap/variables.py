"""Variable handles: frames, scopes and variables as the IDE sees them.

Server frame ids and variables references (stop_id << 20 | index) never reach the IDE: `Handles`
hands out small integers standing for them and forgets them whenever the run resumes. Tensors
expand lazily by their first dimension: server variables through the server, evaluate results
through their value when the server sent it (else by evaluating `expr[i]`). Every variable the IDE
has seen with an evaluate name is remembered as a `Child`, so setVariable and dataBreakpointInfo
can find what it names.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import EvalResult, Frame
from ..client import Session
from .listing import SiteListing
from .protocol import DapError

_SIMPLE_EXPR = re.compile(r"^[A-Za-z_][\w.]*(\[[^\]]*\])*$")


class Handles:
    """Small integers for the IDE standing for server references; never reused, cleared on resume."""

    def __init__(self) -> None:
        self._next = itertools.count(1)
        self._items: dict[int, tuple] = {}

    def add(self, payload: tuple) -> int:
        h = next(self._next)
        self._items[h] = payload
        return h

    def get(self, handle: Any, kind: str | tuple[str, ...]) -> tuple:
        item = self._items.get(handle) if isinstance(handle, int) else None
        kinds = (kind,) if isinstance(kind, str) else kind
        if item is None or item[0] not in kinds:
            raise DapError(f"unknown or stale reference {handle!r}: the run has moved on since, refresh the view")
        return item

    def clear(self) -> None:
        self._items.clear()


@dataclass
class Child:
    """A variable the IDE has seen, so setVariable / dataBreakpointInfo can find what it names."""

    evaluate_name: str
    handle: int
    indexed: int


def summary_text(shape: tuple[int, ...], mean: float, norm: float, lo: float, hi: float, nans: int = 0) -> str:
    text = f"{list(shape)} mean={mean:.4g} norm={norm:.4g} min={lo:.4g} max={hi:.4g}"
    return text + (f" nan={nans}" if nans else "")


def _np_summary(a: np.ndarray) -> str:
    f = a.astype(np.float64)
    finite = f[np.isfinite(f)]
    nans = int(np.isnan(f).sum())
    if finite.size == 0:
        return f"{list(a.shape)} (no finite values) nan={nans}"
    return summary_text(a.shape, float(finite.mean()), float(np.sqrt((finite ** 2).sum())), float(finite.min()),
                        float(finite.max()), nans)


def _child_expr(expr: str, i: int) -> str:
    return f"{expr}[{i}]" if _SIMPLE_EXPR.match(expr) else f"({expr})[{i}]"


def _copy_keys(dst: dict[str, Any], src: dict[str, Any], keys: tuple[str, ...] = ("type", "indexedVariables")) -> None:
    for k in keys:
        if k in src:
            dst[k] = src[k]


class Variables:
    """The handles and remembered children of the current stop (`forget` when the run resumes)."""

    def __init__(self) -> None:
        self.handles = Handles()
        self.children: dict[tuple[int, str], Child] = {}

    def forget(self) -> None:
        self.handles.clear()
        self.children.clear()

    def child(self, ref: Any, name: str) -> Child | None:
        return self.children.get((ref, name))

    def frame_id(self, handle: Any) -> int:
        """The server frame id of a frame handle."""
        return self.handles.get(handle, "frame")[1]

    # -- stackTrace, scopes, variables ----------------------------------------------------------------

    def stack_frames(self, frames: list[Frame], listing: SiteListing, line: int, columns_at1: bool) -> list[dict]:
        """DAP StackFrames for `frames`, all pointing at `line` of the listing (0: no source)."""
        out = []
        for f in frames:
            column = 1 if line and columns_at1 else 0
            fr: dict[str, Any] = {"id": self.handles.add(("frame", f.id, f.site)), "name": f.name,
                                  "line": line, "column": column}
            if line:
                fr["source"] = listing.source()
            out.append(fr)
        return out

    def scopes(self, session: Session, fid: int) -> list[dict[str, Any]]:
        """The scopes of server frame `fid`."""
        out = []
        for s in session.scopes(fid):
            h = self.handles.add(("server", s.variables_reference, "value" if s.name == "Value" else "scope"))
            scope: dict[str, Any] = {"name": s.name, "variablesReference": h, "namedVariables": s.named_variables,
                                     "expensive": False}
            if s.name == "Value":
                scope["presentationHint"] = "locals"
            out.append(scope)
        return out

    def generated_scope(self, texts: list[str], ids: list[list[int]]) -> dict[str, Any]:
        """The Generated scope: the text and token ids generated so far, per batch item."""
        rows = texts or [""]
        variables = []
        for b, text in enumerate(rows):
            suffix = f"[{b}]" if len(rows) > 1 else ""
            row_ids = ids[b] if b < len(ids) else []
            variables.append({"name": f"text{suffix}", "value": repr(text), "type": "str", "variablesReference": 0})
            variables.append({"name": f"tokens{suffix}", "value": str(row_ids), "type": f"{len(row_ids)} token ids",
                              "variablesReference": 0})
        h = self.handles.add(("local", tuple(variables)))
        return {"name": "Generated", "variablesReference": h, "namedVariables": len(variables), "expensive": False}

    def variables(self, session: Session, args: dict[str, Any], stop_target: str = "") -> list[dict[str, Any]]:
        """The variables of a handle. The Value scope's one variable is named for what it holds: the unit
        of a unit breakpoint (`blocks.1.attn.head.1`, the head's write) rather than the site it is in."""
        ref = args["variablesReference"]
        item = self.handles.get(ref, ("server", "eval", "local"))
        filt = args.get("filter")
        start, count = int(args.get("start") or 0), int(args.get("count") or 0)
        if item[0] == "local":
            return [] if filt == "indexed" else [dict(v) for v in item[1]]
        if item[0] == "eval":
            return [] if filt == "named" else self._eval_children(session, ref, item, start, count)
        _, sref, kind = item
        if (kind == "tensor" and filt == "named") or (kind in ("scope", "value") and filt == "indexed"):
            return []
        out = []
        for v in session.variables(sref, start, count):
            h = self.handles.add(("server", v.variables_reference, "tensor")) if v.variables_reference else 0
            name = stop_target if kind == "value" and stop_target else v.name
            var: dict[str, Any] = {"name": name, "value": v.value, "variablesReference": h}
            if v.type:
                var["type"] = v.type
            if v.evaluate_name:
                var["evaluateName"] = v.evaluate_name
                self.children[(ref, name)] = Child(v.evaluate_name, h, v.indexed_variables)
            if h and v.indexed_variables:
                var["indexedVariables"] = v.indexed_variables
            out.append(var)
        return out

    # -- evaluate results ---------------------------------------------------------------------------

    def eval_var(self, expr: str, r: EvalResult) -> dict[str, Any]:
        """An evaluate result as a DAP value: summaries for tensors, expandable by the first dim; a top-k
        of logits as its tokens (the server decodes them), values and ids."""
        s = r.summary
        if r.tokens:
            return self._topk_var(expr, r)
        if s is None or s.numel <= 1 or not s.shape:
            return {"result": r.text, "variablesReference": 0}
        text = r.text if s.numel <= 8 else summary_text(s.shape, s.mean, s.norm, s.min, s.max, s.nan_count)
        h = self.handles.add(("eval", expr, tuple(s.shape), r.value))
        return {"result": text, "type": f"tensor {s.dtype} {list(s.shape)}", "variablesReference": h,
                "indexedVariables": s.shape[0]}

    def _topk_var(self, expr: str, r: EvalResult) -> dict[str, Any]:
        """`topk` over the vocabulary: `' Darcy' 9.12 (id 312), ...`; expands to [values, indices]."""
        value = np.asarray(r.value) if r.value is not None else None
        if value is None or value.ndim != 2 or value.shape[0] != 2 or value.shape[1] != len(r.tokens):
            return {"result": r.text + "\n" + " ".join(repr(t) for t in r.tokens), "variablesReference": 0}
        shown = ", ".join(f"{t!r} {v:.4g} (id {int(i)})" for t, v, i in zip(r.tokens, value[0], value[1]))
        h = self.handles.add(("eval", expr, tuple(value.shape), value))
        return {"result": shown, "type": f"topk {list(value.shape)} (values, indices)", "variablesReference": h,
                "indexedVariables": 2}

    def _array_child(self, name: str, cexpr: str, a: np.ndarray) -> dict[str, Any]:
        if a.ndim == 0:
            return {"name": name, "value": f"{a.item():.6g}", "variablesReference": 0}
        h = self.handles.add(("eval", cexpr, tuple(a.shape), a))
        return {"name": name, "value": _np_summary(a) if a.size > 8 else np.array2string(a, precision=4),
                "type": f"tensor {a.dtype} {list(a.shape)}", "variablesReference": h, "indexedVariables": a.shape[0]}

    def _evaluated_child(self, session: Session, name: str, cexpr: str) -> dict[str, Any]:
        ev = self.eval_var(cexpr, session.evaluate(cexpr))
        var = {"name": name, "value": ev["result"], "variablesReference": ev["variablesReference"]}
        _copy_keys(var, ev)
        return var

    def _eval_children(self, session: Session, ref: int, item: tuple, start: int, count: int) -> list[dict[str, Any]]:
        _, expr, shape, value = item
        n = shape[0]
        end = min(n, start + count) if count else n
        out = []
        for i in range(max(start, 0), end):
            name, cexpr = f"[{i}]", _child_expr(expr, i)
            if value is not None:
                var = self._array_child(name, cexpr, np.asarray(value[i]))
            else:
                var = self._evaluated_child(session, name, cexpr)
            var["evaluateName"] = cexpr
            self.children[(ref, name)] = Child(cexpr, var["variablesReference"], var.get("indexedVariables", 0))
            out.append(var)
        return out

    # -- after a patch ------------------------------------------------------------------------------

    def changed_value(self, new: dict[str, Any], child: Child | None = None) -> dict[str, Any]:
        """A setVariable / setExpression body from the re-evaluated value `new` (and the child patched)."""
        if child is None:
            body = {"value": new["result"], "variablesReference": new["variablesReference"]}
            _copy_keys(body, new)
            return body
        body = {"value": new["result"], "variablesReference": child.handle or new["variablesReference"]}
        if child.handle and child.indexed:
            body["indexedVariables"] = child.indexed
        elif "indexedVariables" in new:
            body["indexedVariables"] = new["indexedVariables"]
        _copy_keys(body, new, ("type",))
        return body
