"""The Streamlit script of the tdb dashboard: `streamlit run streamlit_app/app.py` (or `tdb dashboard`).

The server is the one it was configured for ($TDB_SERVER, never the URL's); the page comes from `?page=`."""

import sys
from pathlib import Path

try:
    import streamlit_app  # noqa: F401  (installed, or run from the repository root)
except ImportError:  # `streamlit run` puts this folder, not the repository, on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamlit_app.shell import main

main()
