"""tdb_server: a gRPC debugger for transformer language models.

Layers (imports point one way; tests/test_layering.py checks it):

    errors.py, limits.py, paths.py, shm.py   leaves (neutral error codes, no grpc)
    model/        the HF adapter, THE name grammar (sites.py), hooks, one capture (capture.py), one
                  intervention model (interventions.py), tokens, corpus, fingerprint
    engine/ analyses/ sae/ records/ explain/ files.py
                  sessions and runs; analyses as plain functions over the adapter; SAEs; records
    serde.py wire.py servicer.py analysis_servicer.py sae_servicer.py recording.py security.py
                  the protobuf / gRPC edge: proto <-> domain, one error conversion
    server.py cli.py   create_server(addr) -> (server, port); the `tdb` command
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = "1.0"
