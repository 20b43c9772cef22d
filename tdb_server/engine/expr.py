"""A small, safe tensor expression language for Evaluate, ReadTensor, conditions and log points.

Expressions are parsed with Python's `ast` module and interpreted node by node over a whitelist;
nothing is ever passed to `eval`, no attribute of a Python object is reachable except the tensor
methods listed below, and no pickle is involved.

    blocks.1.attn.pattern[0, 2, -1]          a site of the run, indexed/sliced (negative ok, None ok)
    x / value                               the value at the current stop (the site, or the unit)
    logits[0, -1].topk(5)                   top-k (values, indices, and decoded tokens)
    logit_lens(blocks.0.resid_post)[0, -1]  final norm + unembedding of a residual stream
    blocks.1.attn.z[0, -1, 2] @ blocks.1.attn.W_O[2]   `@` with a named weight
    norm > 40 and not any_nan               condition over the value (breakpoints)

Functions: abs, sum, mean, norm, max, min, argmax, argmin, topk, softmax, log_softmax, logit_lens,
unembed, tokens, std, var, exp, log, sqrt, cumsum, float.
Methods on tensors: the same names plus .T, .shape, .flatten(), .reshape(...), .transpose(a, b).
Names over the current value: norm, max, min, mean, std, abs_max, numel, any_nan, any_inf,
nan_count, argmax. Weights: W_U, b_U, W_E, blocks.{L}.attn.W_O / b_O, blocks.{L}.mlp.W_out /
b_out.

Every operation is sized before it runs (`Budget`: by the broadcast of its operands' shapes, or by applying
it to shape-only "meta" copies of them), and one whose output would exceed the budget (`Env.budget_bytes`, the server's
--max-expr-mib) is refused with RESOURCE_EXHAUSTED (EXPR_TOO_LARGE) and the estimate, before any memory
is taken; so are evaluations whose operations together would allocate more than four budgets.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any, Callable

import torch

from ..errors import InvalidArgument, ResourceExhausted, TdbServerError, is_allocation_failure
from . import weights
from .expr_budget import Budget, TopK, _as_tensor

MAX_EXPR_LEN = 2000
DEFAULT_BUDGET_BYTES = 1 << 30      # one operation's output (Limits.max_expr_bytes on a server)
MAX_DECODED_TOKENS = 65_536         # tokens(...) decodes at most this many ids

# Dotted names that are not valid Python (blocks.1...) are swapped for placeholders before parsing.
_DOTTED = re.compile(
    r"(?<![\w.])(blocks\.\d+\.(?:attn|mlp)\.(?:W_O|b_O|W_out|b_out|W_in)"
    r"|blocks\.\d+(?:\.[A-Za-z_][A-Za-z_0-9]*(?![A-Za-z_0-9]|\s*\()|\.\d+)*)"   # a trailing .name( is a method
)


class Env:
    """What names resolve to. `site` looks up a captured site; `weight` a named weight; `budget_bytes` is the
    largest output one operation may allocate."""

    def __init__(self, *, site: Callable[[str], torch.Tensor], weight: Callable[[str], torch.Tensor],
                 value: torch.Tensor | None = None, logit_lens: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 unembed: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 decode: Callable[[list[int]], list[str]] | None = None, extra: dict[str, Any] | None = None,
                 budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.site, self.weight, self.value = site, weight, value
        self.logit_lens_fn, self.unembed_fn, self.decode = logit_lens, unembed, decode
        self.extra = extra or {}
        self.budget_bytes = budget_bytes


_VALUE_STATS: dict[str, Callable[[torch.Tensor], Any]] = {
    "norm": lambda x: float(x.float().norm()),
    "max": lambda x: float(x.float().max()),
    "min": lambda x: float(x.float().min()),
    "mean": lambda x: float(x.float().mean()),
    "std": lambda x: float(x.float().std()) if x.numel() > 1 else 0.0,
    "abs_max": lambda x: float(x.float().abs().max()),
    "numel": lambda x: x.numel(),
    "any_nan": lambda x: bool(torch.isnan(x).any()),
    "any_inf": lambda x: bool(torch.isinf(x).any()),
    "nan_count": lambda x: int(torch.isnan(x).sum()),
    "argmax": lambda x: int(x.float().argmax()),
}

_WEIGHT_NAMES = {"W_U", "b_U", "W_E"}


def _dim_kw(args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    if args:
        out["dim"] = args[0]
    if "dim" in kwargs:
        out["dim"] = kwargs["dim"]
    if "keepdim" in kwargs:
        out["keepdim"] = bool(kwargs["keepdim"])
    return out


def _reduce(name: str) -> Callable[..., Any]:
    def fn(x: Any, *args: Any, **kwargs: Any) -> Any:
        x = _as_tensor(x)
        kw = _dim_kw(list(args), kwargs)
        if name in ("max", "min") and "dim" in kw:
            return getattr(x.float(), name)(**kw).values
        if name == "norm":
            return x.float().norm(dim=kw.get("dim"), keepdim=kw.get("keepdim", False))
        if name in ("argmax", "argmin"):
            return getattr(x.float(), name)(**kw)
        return getattr(x.float(), name)(**kw)
    return fn


def _softmax(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def f(x: Any, dim: int = -1) -> torch.Tensor:
        return fn(_as_tensor(x).float(), dim=int(dim))
    return f


def _topk(x: Any, k: int = 10, dim: int = -1, largest: bool = True) -> TopK:
    x = _as_tensor(x).float()
    k = int(k)
    if k < 1 or k > x.shape[int(dim)]:
        raise InvalidArgument(f"topk: k={k} out of range for a dimension of size {x.shape[int(dim)]}",
                              reason="BAD_EXPRESSION")
    r = torch.topk(x, k, dim=int(dim), largest=bool(largest))
    return TopK(r.values, r.indices, x.shape[int(dim)])


_SIMPLE_FUNCS: dict[str, Callable[..., Any]] = {
    "abs": lambda x: _as_tensor(x).abs(),
    "exp": lambda x: _as_tensor(x).float().exp(),
    "log": lambda x: _as_tensor(x).float().log(),
    "sqrt": lambda x: _as_tensor(x).float().sqrt(),
    "float": lambda x: _as_tensor(x).float(),
    "cumsum": lambda x, dim=-1: _as_tensor(x).float().cumsum(int(dim)),
    "sum": _reduce("sum"), "mean": _reduce("mean"), "norm": _reduce("norm"), "max": _reduce("max"),
    "min": _reduce("min"), "argmax": _reduce("argmax"), "argmin": _reduce("argmin"),
    "std": _reduce("std"), "var": _reduce("var"),
    "softmax": _softmax(torch.softmax), "log_softmax": _softmax(torch.log_softmax),
    "topk": _topk,
}
FUNCTION_NAMES = sorted([*_SIMPLE_FUNCS, "logit_lens", "unembed", "tokens"])

_METHODS = set(_SIMPLE_FUNCS) | {"flatten", "reshape", "transpose", "squeeze", "unsqueeze"}

_BINOPS = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b, ast.Mod: lambda a, b: a % b,
    ast.MatMult: lambda a, b: _matmul(a, b), ast.FloorDiv: lambda a, b: a // b,
}
_OP_SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.Mod: "%",
               ast.MatMult: "@", ast.FloorDiv: "//"}
_CMPOPS = {
    ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b, ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b, ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b,
}


def _matmul(a: Any, b: Any) -> torch.Tensor:
    a, b = _as_tensor(a), _as_tensor(b)
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    try:
        return a @ b
    except RuntimeError as e:
        if is_allocation_failure(e):
            raise
        raise InvalidArgument(f"@: shapes {list(a.shape)} and {list(b.shape)} do not match ({e})",
                              reason="BAD_EXPRESSION") from None


def _truth(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise InvalidArgument(
                f"a condition needs one true/false value, got a tensor of shape {list(x.shape)}; "
                "reduce it first, e.g. with .max() or any_nan", reason="BAD_EXPRESSION")
        return bool(x.item())
    return bool(x)


class _Interpreter:
    def __init__(self, env: Env, placeholders: dict[str, str]):
        self.env, self.ph = env, placeholders
        self.budget = Budget(env.budget_bytes)

    def run(self, node: ast.AST) -> Any:
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            raise InvalidArgument(f"'{type(node).__name__}' is not allowed in tdb expressions",
                                  reason="BAD_EXPRESSION")
        return method(node)

    def _Expression(self, n: ast.Expression) -> Any:
        return self.run(n.body)

    def _Constant(self, n: ast.Constant) -> Any:
        if isinstance(n.value, (int, float, bool)) or n.value is None or n.value is Ellipsis:
            return n.value
        raise InvalidArgument(f"literal {n.value!r} is not allowed", reason="BAD_EXPRESSION")

    def _Name(self, n: ast.Name) -> Any:
        name = self.ph.get(n.id, n.id)
        env = self.env
        if n.id in self.ph or name in ("embed", "final_norm", "logits"):
            if weights.layer_weight(name) is not None:
                return env.weight(name)
            return env.site(name)
        if name in ("x", "value"):
            if env.value is None:
                raise InvalidArgument(f"'{name}' is the value at the current stop; there is none here",
                                      reason="NO_VALUE")
            return env.value
        if name in _WEIGHT_NAMES:
            return env.weight(name)
        if name in env.extra:
            return env.extra[name]
        if name in _VALUE_STATS:
            if env.value is None:
                raise InvalidArgument(f"'{name}' refers to the value at the current stop; there is none here",
                                      reason="NO_VALUE")
            return _VALUE_STATS[name](env.value)
        if name in ("True", "False"):
            return name == "True"
        raise InvalidArgument(f"unknown name '{name}'", reason="BAD_EXPRESSION")

    def _Tuple(self, n: ast.Tuple) -> tuple:
        return tuple(self.run(e) for e in n.elts)

    def _List(self, n: ast.List) -> list:
        return [self.run(e) for e in n.elts]

    def _Slice(self, n: ast.Slice) -> slice:
        return slice(*(None if v is None else int(self.run(v)) for v in (n.lower, n.upper, n.step)))

    def _UnaryOp(self, n: ast.UnaryOp) -> Any:
        v = self.run(n.operand)
        if isinstance(n.op, ast.USub):
            return self.budget.run("-", lambda t: -t, v)
        if isinstance(n.op, ast.UAdd):
            return v
        if isinstance(n.op, ast.Not):
            return not _truth(v)
        raise InvalidArgument("operator not allowed", reason="BAD_EXPRESSION")

    def _BinOp(self, n: ast.BinOp) -> Any:
        op = _BINOPS.get(type(n.op))
        if op is None:
            raise InvalidArgument("operator not allowed", reason="BAD_EXPRESSION")
        a, b = self.run(n.left), self.run(n.right)
        a = a.values if isinstance(a, TopK) else a
        b = b.values if isinstance(b, TopK) else b
        if not all(isinstance(v, (torch.Tensor, int, float, bool)) for v in (a, b)):
            raise InvalidArgument(f"'{_OP_SYMBOLS[type(n.op)]}' combines tensors and numbers, not "
                                  f"{type(a).__name__} and {type(b).__name__}", reason="BAD_EXPRESSION")
        if isinstance(a, int) and isinstance(b, int) and not isinstance(n.op, (ast.Add, ast.Sub)):
            a = float(a)   # no unbounded Python integers (9**9**9 would never finish)
        run = self.budget.run_sized if isinstance(n.op, ast.MatMult) else self.budget.run
        try:
            return run(f"'{_OP_SYMBOLS[type(n.op)]}'", op, a, b)
        except RuntimeError as e:
            if is_allocation_failure(e):
                raise
            raise InvalidArgument(f"cannot combine these values: {e}", reason="BAD_EXPRESSION") from None

    def _BoolOp(self, n: ast.BoolOp) -> bool:
        if isinstance(n.op, ast.And):
            return all(_truth(self.run(v)) for v in n.values)
        return any(_truth(self.run(v)) for v in n.values)

    def _Compare(self, n: ast.Compare) -> Any:
        left = self.run(n.left)
        result: Any = True
        for op, comp in zip(n.ops, n.comparators):
            fn = _CMPOPS.get(type(op))
            if fn is None:
                raise InvalidArgument("comparison not allowed", reason="BAD_EXPRESSION")
            right = self.run(comp)
            r = self.budget.run("a comparison", fn, left, right)
            result = r if result is True else self.budget.run("a comparison", lambda p, q: p & q, result, r)
            left = right
        return result

    def _Subscript(self, n: ast.Subscript) -> Any:
        base = self.run(n.value)
        idx = self.run(n.slice)
        if isinstance(base, TopK):
            return TopK(self.budget.run_sized("indexing", _index, base.values, idx),
                        self.budget.run_sized("indexing", _index, base.indices, idx), base.over)
        if isinstance(base, (tuple, list)):
            return base[int(idx)]
        return self.budget.run_sized("indexing", _index, _as_tensor(base), idx)

    def _Attribute(self, n: ast.Attribute) -> Any:
        base = self.run(n.value)
        if n.attr == "shape":
            return list(_as_tensor(base).shape)
        if n.attr == "T":
            return _as_tensor(base).T
        if isinstance(base, TopK) and n.attr in ("values", "indices"):
            return getattr(base, n.attr)
        raise InvalidArgument(f"attribute '.{n.attr}' is not allowed", reason="BAD_EXPRESSION")

    def _Call(self, n: ast.Call) -> Any:
        args = [self.run(a) for a in n.args]
        kwargs = {k.arg: self.run(k.value) for k in n.keywords if k.arg}
        if isinstance(n.func, ast.Attribute):  # method call: x.sum(-1)
            return self._call_method(n.func, args, kwargs)
        if not isinstance(n.func, ast.Name):
            raise InvalidArgument("only named functions can be called", reason="BAD_EXPRESSION")
        return self._call_function(n.func.id, args, kwargs)

    def _call_method(self, func: ast.Attribute, args: list[Any], kwargs: dict[str, Any]) -> Any:
        name = func.attr
        if name not in _METHODS:
            raise InvalidArgument(f"method '.{name}()' is not allowed; methods: {sorted(_METHODS)}",
                                  reason="BAD_EXPRESSION")
        base = self.run(func.value)
        if name in _SIMPLE_FUNCS:
            run = self.budget.run_sized if name == "topk" else self.budget.run
            return run(f".{name}()", _SIMPLE_FUNCS[name], base, *args, **kwargs)
        return self.budget.run_sized(f".{name}()", _shape_method, name, _as_tensor(base), args)

    def _call_function(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if name in ("logit_lens", "unembed") and args:
            x = _as_tensor(args[0])
            fn = self.env.logit_lens_fn if name == "logit_lens" else self.env.unembed_fn
            if fn:
                vocab = self.env.weight("W_U")   # [D, V]
                out = x.numel() // max(1, x.shape[-1] if x.dim() else 1) * vocab.shape[-1]
                self.budget.charge(f"{name}()", out * max(4, vocab.element_size()), [*x.shape[:-1], vocab.shape[-1]])
                return fn(x)
        if name == "tokens" and self.env.decode:
            x = args[0].indices if isinstance(args[0], TopK) else _as_tensor(args[0])
            if x.numel() > MAX_DECODED_TOKENS:
                raise ResourceExhausted(f"tokens() of {x.numel():,} ids; it decodes at most {MAX_DECODED_TOKENS:,}",
                                        reason="EXPR_TOO_LARGE")
            return self.env.decode([int(i) for i in x.flatten().tolist()])
        fn = _SIMPLE_FUNCS.get(name)
        if fn is None:
            raise InvalidArgument(f"unknown function '{name}'; functions: {FUNCTION_NAMES}", reason="BAD_EXPRESSION")
        try:
            run = self.budget.run_sized if name == "topk" else self.budget.run
            return run(f"{name}()", fn, *args, **kwargs)
        except TypeError as e:
            raise InvalidArgument(f"{name}(): {e}", reason="BAD_EXPRESSION") from None


def _shape_method(name: str, t: torch.Tensor, args: list[Any]) -> torch.Tensor:
    """.flatten(), .reshape(...), .transpose(a, b), .squeeze(...), .unsqueeze(d)."""
    try:
        if name == "flatten":
            return t.flatten()
        if name == "reshape":
            shape = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            return t.reshape(*[int(a) for a in shape])
        if name == "transpose":
            return t.transpose(int(args[0]), int(args[1]))
        if name == "squeeze":
            return t.squeeze(*[int(a) for a in args])
        return t.unsqueeze(int(args[0]))
    except (RuntimeError, IndexError, ValueError) as e:
        if is_allocation_failure(e):
            raise
        raise InvalidArgument(f".{name}(): {e}", reason="BAD_EXPRESSION") from None


def _index(t: torch.Tensor, idx: Any) -> torch.Tensor:
    items = idx if isinstance(idx, tuple) else (idx,)
    norm: list[Any] = []
    for it in items:
        if isinstance(it, bool) or it is None or it is Ellipsis or isinstance(it, slice):
            norm.append(it)
        elif isinstance(it, (int, float)):
            if isinstance(it, float) and not it.is_integer():
                raise InvalidArgument(f"index {it} is not an integer", reason="BAD_INDEX")
            norm.append(int(it))
        elif isinstance(it, list):
            norm.append(torch.tensor([int(v) for v in it]))
        elif isinstance(it, torch.Tensor):
            norm.append(it)
        else:
            raise InvalidArgument(f"cannot index with {type(it).__name__}", reason="BAD_INDEX")
    try:
        return t[tuple(norm)]
    except IndexError as e:
        raise InvalidArgument(f"index out of range for shape {list(t.shape)}: {e}", reason="OUT_OF_RANGE") from None


def parse(expression: str) -> tuple[ast.Expression, dict[str, str]]:
    """Parse once (e.g. a breakpoint condition at SetBreakpoints time); evaluate many times."""
    if not expression or not expression.strip():
        raise InvalidArgument("empty expression", reason="BAD_EXPRESSION")
    if len(expression) > MAX_EXPR_LEN:
        raise InvalidArgument(f"expression longer than {MAX_EXPR_LEN} characters", reason="BAD_EXPRESSION")
    placeholders: dict[str, str] = {}

    def sub(m: re.Match[str]) -> str:
        key = f"__site{len(placeholders)}"
        placeholders[key] = m.group(0)
        return key

    text = _DOTTED.sub(sub, expression.strip())
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise InvalidArgument(f"cannot parse expression {expression!r}: {e.msg}", reason="BAD_EXPRESSION") from None
    except (ValueError, RecursionError, MemoryError) as e:   # null bytes, absurd nesting
        raise InvalidArgument(f"cannot parse expression: {type(e).__name__}", reason="BAD_EXPRESSION") from None
    return tree, placeholders


def evaluate(expression: str | tuple[ast.Expression, dict[str, str]], env: Env) -> Any:
    """Evaluate an expression (text, or the result of `parse`) against `env`."""
    tree, ph = parse(expression) if isinstance(expression, str) else expression
    with torch.no_grad():
        try:
            return _Interpreter(env, ph).run(tree)
        except TdbServerError:
            raise
        except RecursionError:
            raise InvalidArgument("expression nested too deeply", reason="BAD_EXPRESSION") from None
        except Exception as e:  # noqa: BLE001 - only whitelisted operations run: any failure is the expression's
            if is_allocation_failure(e):
                where = "the model's device" if isinstance(e, torch.OutOfMemoryError) else "host memory"
                raise ResourceExhausted(f"out of {where} evaluating the expression: {e}", reason="OUT_OF_MEMORY") from None
            raise InvalidArgument(f"cannot evaluate: {type(e).__name__}: {e}", reason="BAD_EXPRESSION") from None


def render(value: Any, max_elements: int = 64) -> str:
    """Short text for a result."""
    if isinstance(value, TopK):
        return f"topk(values={render(value.values, max_elements)}, indices={render(value.indices, max_elements)})"
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            v = value.item()
            return f"{v:.6g}" if isinstance(v, float) else str(v)
        if value.numel() <= max_elements:
            return f"tensor({value.detach().cpu().tolist()})"
        return f"tensor {str(value.dtype).replace('torch.', '')} {list(value.shape)}"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


MAX_OUTPUT_CHARS = 16_384   # one log-point line (the event ring keeps thousands of them)


def check_template(template: str) -> None:
    """A log-point message must be short enough to keep per hit (INVALID_ARGUMENT otherwise)."""
    if len(template) > MAX_EXPR_LEN:
        raise InvalidArgument(f"log message longer than {MAX_EXPR_LEN} characters", reason="BAD_LOG_MESSAGE")


def format_template(template: str, env: Env) -> str:
    """Substitute {expr} in a log-point message by evaluating each expression; at most MAX_OUTPUT_CHARS."""
    def sub(m: re.Match[str]) -> str:
        inner = m.group(1).strip()
        if inner in env.extra and isinstance(env.extra[inner], str):
            return env.extra[inner]
        try:
            return render(evaluate(inner, env), max_elements=16)
        except InvalidArgument as e:
            return f"<{e.message}>"
        except ResourceExhausted as e:
            if e.reason != "EXPR_TOO_LARGE":
                raise
            return f"<{e.message}>"     # refused before allocating: the line says so, the run goes on
    text = re.sub(r"\{([^{}]+)\}", sub, template)
    return text if len(text) <= MAX_OUTPUT_CHARS else text[:MAX_OUTPUT_CHARS] + f"… ({len(text)} characters)"
