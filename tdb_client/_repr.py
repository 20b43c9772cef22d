"""Compact reprs for the client's result dataclasses: printing a result in a notebook or a REPL shows
its scalars and short sequences, and only the dtype and shape of arrays (a logit lens result would
otherwise print tens of thousands of numbers)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

MAX_ITEMS = 4          # sequences longer than this show their first MAX_ITEMS - 1 items and a count
MAX_ARRAY = 8          # arrays up to this many elements show their values
MAX_TEXT = 120


def short(value: Any) -> str:
    if isinstance(value, np.ndarray):
        if value.size <= MAX_ARRAY:
            return f"array({short(value.tolist())})"
        return f"<{value.dtype} array {tuple(value.shape)}>"
    if type(value).__module__.startswith("torch") and hasattr(value, "shape"):
        return f"<{str(value.dtype).replace('torch.', '')} tensor {tuple(value.shape)}>"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return repr(value if len(value) <= MAX_TEXT else value[:MAX_TEXT - 1] + "…")
    if isinstance(value, (list, tuple)):
        items = [short(v) for v in value[:MAX_ITEMS - 1 if len(value) > MAX_ITEMS else MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            items.append(f"… {len(value)} in all")
        open_, close = ("[", "]") if isinstance(value, list) else ("(", ",)" if len(value) == 1 else ")")
        return open_ + ", ".join(items) + close
    if isinstance(value, dict):
        keys = list(value)
        items = [f"{k!r}: {short(value[k])}" for k in keys[:MAX_ITEMS]]
        if len(keys) > MAX_ITEMS:
            items.append(f"… {len(keys)} in all")
        return "{" + ", ".join(items) + "}"
    return repr(value)


def compact_repr(self: Any) -> str:
    fields = ", ".join(f"{f.name}={short(getattr(self, f.name))}" for f in dataclasses.fields(self) if f.repr)
    return f"{type(self).__name__}({fields})"


def install(classes: list[type]) -> None:
    """Give these dataclasses the compact repr (equality, hashing and fields are unchanged)."""
    for cls in classes:
        if dataclasses.is_dataclass(cls):
            cls.__repr__ = compact_repr
