"""Sizing an expression's operations before they allocate (the `Budget` of expr.py's interpreter).

Each operation is sized before it runs: elementwise ones and reductions by the broadcast of their operands'
shapes, the others by applying them first to shape-only "meta" copies of the operands. One whose output
would exceed the budget (the server's --max-expr-mib) is refused with RESOURCE_EXHAUSTED (EXPR_TOO_LARGE)
and the estimate, before any memory is taken; so are evaluations whose operations together would allocate
more than four budgets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import InvalidArgument, ResourceExhausted, TdbServerError


@dataclass
class TopK:
    values: torch.Tensor
    indices: torch.Tensor
    over: int = 0           # the size of the dimension it was taken over (token ids only when it is the vocabulary's)


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, TopK):
        return x.values
    if isinstance(x, (int, float, bool)):
        return torch.tensor(x)
    raise InvalidArgument(f"expected a tensor, got {type(x).__name__}", reason="BAD_EXPRESSION")


def _meta(v: Any) -> Any:
    """A shape-only copy of an operand: tensors become meta tensors (no storage), containers are copied."""
    if isinstance(v, torch.Tensor):
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    if isinstance(v, TopK):
        return TopK(_meta(v.values), _meta(v.indices), v.over)
    if isinstance(v, (list, tuple)):
        return type(v)(_meta(x) for x in v)
    return v


def _nbytes(v: Any, inputs: set[int]) -> tuple[int, list[int]]:
    """The bytes a result allocates (views and operands returned as they are take none), and its shape."""
    if isinstance(v, torch.Tensor):
        fresh = not v._is_view() and id(v) not in inputs
        return (v.numel() * v.element_size() if fresh else 0), list(v.shape)
    if isinstance(v, TopK):
        (a, shape), (b, _) = _nbytes(v.values, inputs), _nbytes(v.indices, inputs)
        return a + b, shape
    if isinstance(v, (list, tuple)):
        sized = [_nbytes(x, inputs) for x in v]
        return sum(n for n, _ in sized), max(sized, default=(0, []))[1]
    return 0, []


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


class Budget:
    """Sizes each operation before it runs — elementwise ones and reductions by the broadcast of their
    operands' shapes, the others by applying them first to meta copies of their operands (shapes and dtypes,
    no storage) — and refuses it with RESOURCE_EXHAUSTED when its output would exceed `limit` bytes, or when
    the evaluation's outputs together would exceed four times that. An operation whose size depends on the data
    (a boolean mask) cannot be sized on shapes; its output is never larger than its input."""

    def __init__(self, limit: int):
        self.limit, self.spent = limit, 0

    def charge(self, what: str, n: int, shape: list[int]) -> None:
        if n > self.limit:
            raise ResourceExhausted(
                f"{what} would allocate up to {_mib(n)} (a result of shape {shape}); one operation of an expression may "
                f"allocate at most {_mib(self.limit)} (tdb serve --max-expr-mib): reduce or slice first",
                reason="EXPR_TOO_LARGE")
        self.spent += n
        if self.spent > 4 * self.limit:
            raise ResourceExhausted(
                f"{what} brings the expression's allocations to {_mib(self.spent)}; an expression may allocate at "
                f"most {_mib(4 * self.limit)} in all (tdb serve --max-expr-mib): split it", reason="EXPR_TOO_LARGE")

    def run(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` for an elementwise operation, a reduction or a broadcast, once its output is
        known to fit: at most the broadcast of its operands' shapes, in 4-byte (or wider) elements."""
        tensors = [_as_tensor(a) for a in (*args, *kwargs.values()) if isinstance(a, (torch.Tensor, TopK))]
        if tensors:
            try:
                shape = list(torch.broadcast_shapes(*(t.shape for t in tensors)))
            except RuntimeError:
                shape = None     # operands that do not broadcast: the real call says so
            if shape is not None:
                self.charge(what, math.prod(shape) * max(4, *(t.element_size() for t in tensors)), shape)
        return fn(*args, **kwargs)

    def run_sized(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` for any operation (a matrix product, indexing, a reshape, top-k), once its
        output, found by running it on meta copies of the operands, is known to fit."""
        if any(isinstance(a, (torch.Tensor, TopK)) for a in (*args, *kwargs.values())):
            margs, mkwargs = [_meta(a) for a in args], {k: _meta(v) for k, v in kwargs.items()}
            try:
                out = fn(*margs, **mkwargs)
            except (TdbServerError, RuntimeError, TypeError, ValueError, IndexError, NotImplementedError):
                out = None   # not sizeable on shapes alone: the real call reports its own error, or is data-sized
            if out is not None:
                self.charge(what, *_nbytes(out, {id(m) for m in (*margs, *mkwargs.values())}))
        return fn(*args, **kwargs)
