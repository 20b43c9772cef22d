"""setVariable / setExpression (and REPL assignments) as patches: the adapter's mini-syntax.

A *target* names what to patch: a site (`blocks.1.attn.out`), a unit (`blocks.1.attn.head.2`,
`blocks.0.mlp.neuron.7`), or `x`, the value shown at the current stop; optionally indexed,
`x[0][3]` or `x[0, 3]`. Each index selects along that dimension of the site's value, which must be
one the server can select: batch, pos (query_pos for attn.pattern), head (kv_head) or neuron. A
single d_model, d_head, key_pos or vocab entry cannot be selected: patch its enclosing position.
A unit selects batch and pos (`UNIT_SELECTION`).

This module is syntax only: which dims a name has is the caller's `dims_of` (the adapter asks the
model info the server sent), and whether a name is a unit at all is the server's to say.

A *value* says what to do with the selection:

    0 | zero          zero-ablate
    mean              mean-ablate (the mean over positions)
    N | =N            set every selected entry to the number N
    [..]              set to this JSON array (broadcast to the site's shape, then selected)
    *N | *=N          scale by N              /N | /=N   scale by 1/N
    +=N | -=N         add N / subtract N

In the REPL (evaluate, context "repl") an assignment is a patch too: `x[0][3] *= 2`,
`blocks.1.attn.head.2 = 0`, `blocks.0.mlp.neuron.7 = mean`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

_TARGET = re.compile(r"^\s*(?P<name>[A-Za-z_][\w.]*)\s*(?P<index>(?:\[[^\]]*\]\s*)*)$")
_ASSIGN = re.compile(r"^\s*(?P<target>[A-Za-z_][\w.]*\s*(?:\[[^\]]*\]\s*)*)"
                     r"(?P<op>\*=|/=|\+=|-=|=)(?!=)\s*(?P<value>.+?)\s*$")
UNIT_SELECTION = ("batch", "pos")      # what a unit's value (a head's write, a neuron) can be indexed by
_SELECTABLE = {"batch": "batch", "pos": "positions", "query_pos": "positions", "head": "heads",
               "kv_head": "heads", "neuron": "neurons"}


class PatchSyntaxError(ValueError):
    """A target or value the mini-syntax does not accept (the message says what would)."""


@dataclass(frozen=True)
class PatchTarget:
    name: str                          # a site or a unit, as the server takes it
    batch: tuple[int, ...] = ()
    positions: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    neurons: tuple[int, ...] = ()

    def describe(self) -> str:
        sel = [f"{k}={list(v)}" for k, v in (("batch", self.batch), ("pos", self.positions), ("heads", self.heads),
                                            ("neurons", self.neurons)) if v]
        return self.name + (f" [{', '.join(sel)}]" if sel else "")


@dataclass(frozen=True)
class PatchValue:
    op: str                            # set | add | scale | zero | mean
    value: Any = None                  # a float, or a nested list for set


def _indices(text: str) -> list[int]:
    out: list[int] = []
    for group in re.findall(r"\[([^\]]*)\]", text):
        for part in group.split(","):
            part = part.strip()
            try:
                out.append(int(part))
            except ValueError:
                raise PatchSyntaxError(f"only integer indices can be patched, not {part!r}") from None
    return out


def parse_target(text: str, dims_of: Callable[[str], Sequence[str] | None], stop_target: str | None) -> PatchTarget:
    """`x[0][3]` / `blocks.1.attn.out[0, 3]` / `blocks.1.attn.head.2` -> a PatchTarget.

    dims_of(name) gives a site's or unit's dims (None if unknown); `x` stands for stop_target."""
    m = _TARGET.match(text)
    if not m:
        raise PatchSyntaxError(f"cannot patch {text!r}: name a site, a unit or x, optionally indexed like x[0][3]")
    name = m.group("name")
    if name in ("x", "value"):
        if not stop_target:
            raise PatchSyntaxError("x is the value at a stop, and the run is not stopped at a site")
        name = stop_target
    dims = dims_of(name)
    if dims is None:
        raise PatchSyntaxError(f"{name!r} is not a site or unit of this model")
    idx = _indices(m.group("index"))
    if len(idx) > len(dims):
        raise PatchSyntaxError(f"{name} has {len(dims)} dims {list(dims)}, not {len(idx)}")
    sel: dict[str, list[int]] = {"batch": [], "positions": [], "heads": [], "neurons": []}
    for dim, i in zip(dims, idx):
        field = _SELECTABLE.get(dim)
        if field is None:
            raise PatchSyntaxError(f"cannot patch a single {dim} entry of {name} (dims {list(dims)}): "
                                   f"patch the enclosing {'position' if 'pos' in dims else 'slice'} instead")
        sel[field].append(i)
    return PatchTarget(name, *(tuple(sel[k]) for k in ("batch", "positions", "heads", "neurons")))


def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise PatchSyntaxError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise PatchSyntaxError(f"{text!r}: patch values must be finite")
    return v


def parse_value(text: str) -> PatchValue:
    """`0`, `zero`, `mean`, `3.5`, `=3.5`, `[..]`, `*2`, `*=2`, `/2`, `+=1`, `-=1` -> a PatchValue."""
    t = text.strip()
    low = t.lower()
    if low in ("zero", "0", "0.0", "=0"):
        return PatchValue("zero")
    if low == "mean":
        return PatchValue("mean")
    if t.startswith("["):
        try:
            arr = json.loads(t)
        except json.JSONDecodeError as e:
            raise PatchSyntaxError(f"bad array {t!r}: {e}") from None
        return PatchValue("set", arr)
    for prefix, op, sign in (("*=", "scale", 1), ("/=", "scale", -1), ("+=", "add", 1), ("-=", "add", -1),
                             ("*", "scale", 1), ("/", "scale", -1)):
        if t.startswith(prefix):
            n = _number(t[len(prefix):])
            if op == "scale" and sign < 0:
                if n == 0:
                    raise PatchSyntaxError("division by zero")
                return PatchValue("scale", 1.0 / n)
            return PatchValue(op, sign * n)
    if t.startswith("="):
        t = t[1:]
    n = _number(t) if t else None
    if n is None:
        raise PatchSyntaxError("empty value: use 0, mean, a number, *N, /N, +=N, -=N or a JSON array")
    return PatchValue("zero") if n == 0 else PatchValue("set", n)


def parse_assignment(text: str) -> tuple[str, str] | None:
    """`x[0] *= 2` -> ("x[0]", "*=2"); `blocks.1.attn.head.2 = 0` -> (..., "0"); else None."""
    m = _ASSIGN.match(text)
    if not m:
        return None
    op = m.group("op")
    return m.group("target").strip(), (m.group("value") if op == "=" else op + m.group("value"))
