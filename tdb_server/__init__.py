"""tdb_server: a gRPC debugger for transformer language models.

Layers (imports point one way; tests/test_layering.py checks it):

    errors.py, limits.py, paths.py, shm.py   leaves (neutral error codes, no grpc)
    model/        the HF adapter, THE name grammar (sites.py), hooks, one capture (capture.py), one
                  intervention model (interventions.py), tokens, corpus, fingerprint
    engine/ analyses/ sae/ records/ explain/ files.py
                  sessions and runs; analyses as plain functions over the adapter; SAEs; records
    serde.py wire.py servicer.py analysis_servicer.py sae_servicer.py recording.py security.py aio_bridge.py
                  the protobuf / gRPC edge: proto <-> domain, one error conversion, plain methods on the
                  asyncio server
    server.py cli.py   create_server(addr) -> (server, port) on grpc.aio; the `tdb` command
"""

from importlib.metadata import PackageNotFoundError, version as _installed_version
from pathlib import Path as _Path


def _version() -> str:
    """The installed distribution's version (written once, in the repository's file VERSION, which
    both pyproject.toml files read); a source tree used without installing reads that file itself."""
    try:
        return _installed_version("tdb-debugger")
    except PackageNotFoundError:
        source = _Path(__file__).resolve().parent.parent / "VERSION"
        return source.read_text().strip() if source.is_file() else "0+unknown"


__version__ = _version()
# 1.1: sessions are their creator's (CreateSessionResponse.session_secret, sent as metadata
# 'tdb-session-secret'); PatchRequest.run_id; TokenGenerated.appended; node-table verification
# 1.2: ReadTensors (many tensors in one request, one shared-memory file; capability supportsBatchReads)
PROTOCOL_VERSION = "1.2"
