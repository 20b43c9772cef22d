"""The debug adapter: DAP requests in, tdb calls out through the typed client, tdb events back as DAP
events. One `DebugAdapter` serves one IDE debug session (one connection), which drives one tdb
session and one forward pass (one DAP thread). It only wires the components together:

    transport.py     reading requests, answering them, cancellation (handlers found by name)
    handlers.py      one method per DAP request
    events.py        server events -> DAP events, pumped on their own thread
    breakpoints.py   the breakpoint book
    variables.py     variable handles: frames, scopes, variables, evaluate results
    listing.py       the virtual source listing the model's sites
    state.py         what the handlers and the events share

How DAP maps onto tdb:

    thread                 the run (one per launch)
    stack frame            the site path at the stop: blocks.1.attn.out > blocks.1.attn > blocks.1 > model
    source                 a virtual document listing the model's sites in execution order, one a line
                           (frames point at the stop's line; line breakpoints and log points go there)
    scopes / variables     the server's Value / Captured / Patches scopes; tensors expand lazily by
                           their first dimension
    function breakpoints   site names, units and globs (blocks.1.attn.out, blocks.1.attn.head.2, blocks.*.mlp.out)
    data breakpoints       watch conditions on a site or unit (default `any_nan or any_inf`; edit the
                           condition, e.g. `norm > 40`)
    setVariable / setExpression / REPL `a = b`   patches (mini-syntax in patching.py)
    evaluate               the server's expression language
    next / stepIn / stepOut   step over the block / into the next site / out of the module;
                           granularity "instruction" makes `next` move one site; with "generate", `next`
                           at a token boundary steps to the next one (tdb's token step)
    the Generated scope    with "generate": the text and token ids generated so far (also printed to
                           the debug console as each token is generated)

Requests are read on one thread and handled in order on another, so `cancel` can reach a request
still queued (or a read-only one in flight). Every response to a request that resumes the run is sent
before the events that follow from it: the handler and the event pump share one ordering lock.
Server frame ids and variables references (stop_id << 20 | index) never reach the IDE: the adapter
hands out its own small integers and forgets them whenever the run resumes.
"""

from __future__ import annotations

import threading
from typing import BinaryIO

from .events import EventTranslator
from .handlers import CAPABILITIES, READ_ONLY, RequestHandlers
from .options import AdapterOptions
from .protocol import Channel
from .state import DebugState
from .transport import Transport

__all__ = ["CAPABILITIES", "DebugAdapter"]


class DebugAdapter:
    """Serves one DAP connection. `serve(reader)` returns when the client disconnects or leaves."""

    def __init__(self, channel: Channel, options: AdapterOptions | None = None):
        self.transport = Transport(channel, READ_ONLY)
        self.state = DebugState(self.transport, options)
        self.events = EventTranslator(self.state)
        self.handlers = RequestHandlers(self.state, self.events)
        self.transport.guard = self.handlers.guard

    @property
    def reader(self) -> threading.Thread | None:
        """The thread reading the connection (joined by the TCP server once the socket is shut)."""
        return self.transport.reader

    @property
    def done(self) -> threading.Event:
        return self.transport.done

    def serve(self, reader: BinaryIO) -> None:
        try:
            self.transport.serve(reader, self.handlers)
        finally:
            self.state.shutdown()
