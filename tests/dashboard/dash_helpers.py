"""Helpers of the dashboard tests: run a page under AppTest, read its charts, tables and buttons."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "streamlit_app" / "app.py"
RANDOM_IDS = "5 17 42 8 99 23 61 5 17 42 8 99 23"


def run_page(address: str, page: str, timeout: float = 60, **params: str):
    """Run the app once on `?page=page&...`, configured for the server at `address` ($TDB_SERVER, as
    `tdb dashboard` sets it: the URL cannot choose the server)."""
    from streamlit.testing.v1 import AppTest

    os.environ["TDB_SERVER"] = address
    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.query_params.update(page=page, **params)
    return at.run()


def open_page(address: str, page: str, timeout: float = 60, **params: str):
    """`run_page`, checking that nothing raised and no error is shown."""
    at = run_page(address, page, timeout, **params)
    assert_clean(at)
    return at


def assert_clean(at) -> None:
    """No uncaught exception, and no error box."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def charts(at) -> list[dict]:
    """The Vega-Lite specs on the page, each with its data as `frames` (DataFrames)."""
    from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

    out = []
    for el in _walk(at.main):
        if getattr(el, "type", "") == "vega_lite_chart":
            spec = json.loads(el.proto.spec)
            spec["frames"] = [convert_arrow_bytes_to_pandas_df(d.data.data) for d in el.proto.datasets]
            out.append(spec)
    return out


def _walk(node):
    yield node
    for child in getattr(node, "children", {}).values() if isinstance(getattr(node, "children", None), dict) else []:
        yield from _walk(child)


def button(at, label: str):
    matches = [b for b in at.button if b.label == label]
    assert matches, f"no button {label!r}: {[b.label for b in at.button]}"
    return matches[0]


def frame(at, index: int = 0) -> pd.DataFrame:
    return at.dataframe[index].value


def node_frame(at) -> pd.DataFrame:
    """The Explore page's node table (the frame with a rank column)."""
    frames = [df.value for df in at.dataframe if "rank" in df.value.columns and "node" in df.value.columns]
    assert frames, [list(df.value.columns) for df in at.dataframe]
    return frames[0]
