"""Imports point one way (shared/design/ARCHITECTURE.md), checked on the source, not by convention:

    errors/limits/paths -> model -> engine/analyses/sae/records/explain -> serde/servicers -> server/cli

- a module imports only from its own tier or below; protobuf (`tdb.v1`) only at the edge tier;
- the packages of one tier import each other without a cycle;
- no import hides inside a function (a hidden import is how a cycle is dodged), except where an
  entry point loads a heavy part lazily on purpose (listed below, with the reason);
- `tdb_client` never imports `tdb_server` except the DAP bridge's embedded-server helper; the
  dashboard imports only `tdb_client` (and never the generated protobuf code).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SERVER_TIERS = {
    "errors": 0, "limits": 0, "bounds": 0, "paths": 0, "shm": 0, "bundled": 0,
    "model": 1,
    "engine": 2, "analyses": 2, "sae": 2, "records": 2, "explain": 2, "files": 2,
    "serde": 3, "wire": 3, "security": 3, "aio_bridge": 3, "decode_guard": 3, "recording": 3, "servicer": 3, "analysis_servicer": 3, "sae_servicer": 3,
    "server": 4, "cli": 4, "__main__": 4,
    "": 0,   # tdb_server/__init__.py: the version constants
}
EDGE_TIER = 3
# Imports inside functions on purpose: entry points that load a heavy part only when it is used.
LAZY_OK = {
    ("tdb_server.cli", "tdb_server.server"): "`tdb --help` and `tdb dap` start without loading torch",
    ("tdb_server.cli", "tdb_client.dap"): "the DAP bridge is loaded only by `tdb dap`",
    ("tdb_server.cli", "streamlit_app.launch"): "the dashboard is loaded only by `tdb dashboard`",
    ("tdb_client.dap.backend", "tdb_server.model"): "the bridge's embedded server, only when no address is given",
    ("tdb_client.dap.backend", "tdb_server.paths"): "the bridge's embedded server, only when no address is given",
    ("tdb_client.dap.backend", "tdb_server.server"): "the bridge's embedded server, only when no address is given",
    ("tdb_client.dap.backend", "tdb_server.files"): "a launch's model folder checked by the server's own allow-list",
    ("tdb_client.dap.backend", "tdb_server.errors"): "a launch's model folder checked by the server's own allow-list",
    ("streamlit_app.app", "streamlit_app"): "streamlit runs app.py as a script, outside the package",
}
OURS = ("tdb_server", "tdb_client", "streamlit_app", "tdb")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(parts: list[str]) -> bool:
    path = ROOT.joinpath(*parts)
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each import of our packages in `path`."""
    mod = _module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []

    def visit(node: ast.AST, in_function: bool, in_type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            checking = in_type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = package[: len(package) - child.level + 1] if child.level else []
                if child.module:
                    names = [".".join(base + [child.module])]
                else:   # from . import x: the modules (or names) x of the package
                    names = [".".join(base + [a.name]) if _is_module(base + [a.name]) else ".".join(base)
                             for a in child.names]
            for name in names:
                if name.split(".")[0] in OURS and not checking:
                    out.append((name, child.lineno, in_function))
            visit(child, inner, checking)

    visit(tree, False, False)
    return out


def _files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "_pb2" not in p.name)


def _server_part(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _tier(module: str) -> int:
    part = _server_part(module)
    if part not in SERVER_TIERS:
        pytest.fail(f"{module}: tdb_server/{part} has no tier in tests/test_layering.py: add it")
    return SERVER_TIERS[part]


ALL = [(p, name, line, inner) for pkg in ("tdb_server", "tdb_client", "streamlit_app")
       for p in _files(pkg) for name, line, inner in _imports(p)]


def test_no_import_hides_inside_a_function():
    hidden = [f"{_module_name(p)}:{line} imports {name}" for p, name, line, inner in ALL
              if inner and not any(_module_name(p) == a and (name == b or name.startswith(b + "."))
                                   for a, b in LAZY_OK)]
    assert not hidden, "imports inside functions (move code so the import can stand at the top):\n" + "\n".join(hidden)


def test_server_imports_point_down_the_stack():
    wrong = []
    for p, name, line, _ in ALL:
        mod = _module_name(p)
        if not mod.startswith("tdb_server"):
            continue
        if name.startswith("tdb."):
            if _tier(mod) < EDGE_TIER:
                wrong.append(f"{mod}:{line} imports protobuf ({name}): only the serde/servicer edge may")
        elif name.startswith("tdb_server") and _tier(name) > _tier(mod):
            wrong.append(f"{mod}:{line} imports {name}, a higher tier")
        elif name.split(".")[0] in ("tdb_client", "streamlit_app") and mod != "tdb_server.cli":
            wrong.append(f"{mod}:{line} imports {name}: the server never imports its clients")
    assert not wrong, "\n".join(wrong)


def test_grpc_and_protobuf_only_at_the_edge():
    wrong = []
    for p in _files("tdb_server"):
        mod = _module_name(p)
        if _tier(mod) >= EDGE_TIER:
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            wrong += [f"{mod}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "grpc"
                      or n.startswith("google.protobuf")]
    assert not wrong, "grpc / protobuf below the servicers:\n" + "\n".join(wrong)


def test_packages_of_one_tier_form_no_cycle():
    edges: dict[str, set[str]] = {}
    for p, name, _, _ in ALL:
        mod = _module_name(p)
        if mod.startswith("tdb_server") and name.startswith("tdb_server"):
            a, b = _server_part(mod), _server_part(name)
            if a != b and SERVER_TIERS.get(a) == SERVER_TIERS.get(b):
                edges.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges.get(start, ()))

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in edges for b in edges[a] if reaches(b, a, {b}))
    assert not cycles, "import cycles between packages of one tier:\n" + "\n".join(cycles)


def test_clients_never_import_the_server():
    wrong = [f"{_module_name(p)}:{line} imports {name}" for p, name, line, _ in ALL
             if _module_name(p).startswith("tdb_client") and name.startswith("tdb_server")
             and not _module_name(p).startswith("tdb_client.dap.backend")]
    wrong += [f"{_module_name(p)}:{line} imports {name}" for p, name, line, _ in ALL
              if _module_name(p).startswith("streamlit_app") and name.split(".")[0] in ("tdb_server", "tdb")]
    assert not wrong, "\n".join(wrong)


def test_client_modules_form_no_cycle():
    edges: dict[str, set[str]] = {}
    for p, name, _, _ in ALL:
        mod = _module_name(p)
        if mod.startswith("tdb_client") and name.startswith("tdb_client") and name != mod:
            edges.setdefault(mod, set()).add(name)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges.get(start, ()))

    cycles = sorted(f"{a} -> {b}" for a in edges for b in edges[a]
                    if reaches(b, a, {b}) and not a.startswith(b + ".") and not b.startswith(a + "."))
    assert not cycles, "import cycles between client modules:\n" + "\n".join(cycles)
