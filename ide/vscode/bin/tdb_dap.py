"""The adapter for VS Code on Windows (started as `python tdb_dap.py`): the Python on PATH must have tdb installed."""

import sys

from tdb_server.cli import main

sys.exit(main(["dap", *sys.argv[1:]]))
