"""tdb_server: a gRPC debugger for transformer language models.

Layers (imports point one way): model/ (HF adapter, sites, hooks) -> engine/ (runs, breakpoints,
stepping, patches) -> analyses/ -> servicer.py/server.py (thin gRPC translation).
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = "1.0"
