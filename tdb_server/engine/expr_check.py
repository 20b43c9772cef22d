"""Static checks of expressions (breakpoint conditions): refuse, before a run, what could never evaluate —
an unknown name, function, method or attribute, a literal or an operator the language does not have —
with the nearest valid names. The interpreter (expr.py) stays the one definition of what each allowed
construct means; this module reads its tables. `check_size` dry-runs a condition on shape-only copies of the
model's weights, so that one whose operations on weights alone exceed the expression budget is refused
before a run too."""

from __future__ import annotations

import ast
import difflib
from typing import Callable

import torch

from ..errors import InvalidArgument, ResourceExhausted, TdbServerError
from .expr import _BINOPS, _CMPOPS, _METHODS, _VALUE_STATS, _WEIGHT_NAMES, FUNCTION_NAMES, Env, _Interpreter, evaluate
from .expr_budget import _meta

_ATTRIBUTES = {"shape", "T", "values", "indices"}
_UNARY = (ast.USub, ast.UAdd, ast.Not)
_GRAMMAR = (ast.expr_context, ast.operator, ast.cmpop, ast.unaryop, ast.boolop, ast.keyword)
_SPECIAL_NAMES = {"x", "value", "site", "True", "False", "embed", "final_norm", "logits"} | _WEIGHT_NAMES


def _refuse(message: str, name: str = "", known: set[str] | frozenset[str] = frozenset()) -> InvalidArgument:
    near = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6) if name else []
    return InvalidArgument(message + (f"; did you mean {', '.join(near)}?" if near else ""), reason="BAD_EXPRESSION")


def _check_construct(node: ast.AST) -> None:
    kind = type(node).__name__
    if not isinstance(node, _GRAMMAR) and not hasattr(_Interpreter, "_" + kind):
        raise _refuse(f"'{kind}' is not allowed in tdb expressions")
    if isinstance(node, ast.Constant) and not (isinstance(node.value, (int, float, bool)) or node.value in (None, ...)):
        raise _refuse(f"literal {node.value!r} is not allowed")


def _check_operator(node: ast.AST) -> None:
    bad = (isinstance(node, ast.BinOp) and type(node.op) not in _BINOPS
           or isinstance(node, ast.UnaryOp) and not isinstance(node.op, _UNARY)
           or isinstance(node, ast.Compare) and any(type(op) not in _CMPOPS for op in node.ops))
    if bad:
        raise _refuse(f"operator not allowed in {ast.unparse(node)!r}")


def _check_call(node: ast.Call) -> None:
    if isinstance(node.func, ast.Name) and node.func.id not in FUNCTION_NAMES:
        raise _refuse(f"unknown function '{node.func.id}'", node.func.id, set(FUNCTION_NAMES))
    if isinstance(node.func, ast.Attribute) and node.func.attr not in _METHODS:
        raise _refuse(f"method '.{node.func.attr}()' is not allowed", node.func.attr, _METHODS)


def _check_name(node: ast.Name, ph: dict[str, str], check_name: Callable[[str], None]) -> None:
    if node.id in ph:
        check_name(ph[node.id])
        return
    known = _SPECIAL_NAMES | set(_VALUE_STATS)
    if node.id not in known:
        raise _refuse(f"unknown name '{node.id}'", node.id, known | set(FUNCTION_NAMES))


def check(parsed: tuple[ast.Expression, dict[str, str]], check_name: Callable[[str], None]) -> None:
    """Refuse (InvalidArgument, with the nearest valid names) an expression `expr.parse` returned that could
    never evaluate. `check_name` checks a dotted site, unit or weight name (raising for an unknown one)."""
    tree, ph = parsed
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        _check_construct(node)
        _check_operator(node)
        if isinstance(node, ast.Call):
            _check_call(node)
        elif isinstance(node, ast.Attribute) and id(node) not in called and node.attr not in _ATTRIBUTES:
            raise _refuse(f"attribute '.{node.attr}' is not allowed", node.attr, _ATTRIBUTES)
        elif isinstance(node, ast.Name) and id(node) not in called:
            _check_name(node, ph, check_name)


def _unsized(name: str) -> torch.Tensor:
    raise InvalidArgument(f"{name} has no value before a run", reason="NO_VALUE")


def check_size(parsed: tuple[ast.Expression, dict[str, str]], weight: Callable[[str], torch.Tensor],
               budget_bytes: int) -> None:
    """Refuse (ResourceExhausted, EXPR_TOO_LARGE, with the estimate) an expression whose operations over the
    model's weights exceed the budget, found by evaluating it on meta copies of the weights (no storage). The
    dry run stops quietly at the first site or stop value it meets: those are sized when the run evaluates."""
    env = Env(site=_unsized, weight=lambda n: _meta(weight(n)), value=None, budget_bytes=budget_bytes)
    try:
        evaluate(parsed, env)
    except ResourceExhausted as e:
        if e.reason == "EXPR_TOO_LARGE":
            raise
    except TdbServerError:
        pass
