"""tdb's Debug Adapter Protocol bridge (`tdb dap`): lets VS Code, nvim-dap and any DAP client debug a
forward pass. A client of the tdb server like any other: it speaks gRPC through `tdb_client` and
imports `tdb_server` only to start an embedded server when the launch configuration names none.

    adapter.py    requests -> tdb calls, tdb events -> DAP events (the mapping is documented there)
    patching.py   the setVariable / setExpression mini-syntax (values -> patch ops)
    protocol.py   Content-Length framing
    backend.py    connect to a server, or start one in-process
    main.py       stdio and --listen TCP entry points
"""

from .adapter import CAPABILITIES, DebugAdapter
from .main import run_stdio, run_tcp

__all__ = ["CAPABILITIES", "DebugAdapter", "run_stdio", "run_tcp"]
