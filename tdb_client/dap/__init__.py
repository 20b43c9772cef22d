"""tdb's Debug Adapter Protocol bridge (`tdb dap`): lets VS Code, nvim-dap and any DAP client debug a
forward pass. A client of the tdb server like any other: it speaks gRPC through `tdb_client` and
imports `tdb_server` only to start an embedded server when the launch configuration names none.
Split by component, as debugpy separates messaging from components:

    adapter.py      DebugAdapter: wires the components for one connection (the DAP <-> tdb mapping is documented there)
    protocol.py     Content-Length framing, the sending Channel, DapError
    transport.py    reading requests, answering them, cancellation; handlers found by name
    handlers.py     one method per DAP request; the capabilities
    events.py       server events -> DAP events
    breakpoints.py  the breakpoint book
    variables.py    variable handles (frames, scopes, variables, evaluate results)
    listing.py      the virtual source: the model's sites, one a line
    state.py        what handlers and events share (the tdb session, the run, the components)
    launch.py       the launch configuration: checks, generation options, where the server comes from
    options.py      what `tdb dap` was started with: the server a token belongs to, the listener's
                    credential, the folders models may be loaded from
    patching.py     the setVariable / setExpression mini-syntax (values -> patch ops), syntax only
    backend.py      connect to a server, or start one in-process
    main.py         stdio and --listen TCP entry points
"""

from .adapter import CAPABILITIES, DebugAdapter
from .main import run_stdio, run_tcp
from .options import AdapterOptions

__all__ = ["CAPABILITIES", "AdapterOptions", "DebugAdapter", "run_stdio", "run_tcp"]
