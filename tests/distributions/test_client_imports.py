"""What `import tdb_client` costs: the client imports grpc, protobuf, numpy and its own modules, and
nothing that a notebook user does not need at import time (torch, the dashboard, the DAP bridge,
progress bars, the stdlib's urllib/email/xml that xml.sax.saxutils drags in)."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tdb_client.graph import Edge, Graph, Node

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "streamlit", "altair", "pandas", "tqdm", "tdb_server", "tdb_client.dap",
         "urllib.request", "email", "xml")


def test_importing_the_client_loads_nothing_heavy():
    code = "import sys, json; import tdb_client; print(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout)
    heavy = sorted({h for h in HEAVY for m in loaded if m == h or m.startswith(h + ".")})
    assert not heavy, f"import tdb_client loads {heavy}"


def test_the_client_reports_its_version_when_asked():
    code = ("import sys, tdb_client; before = 'importlib.metadata' in sys.modules; "
            "print(before, tdb_client.__version__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", (ROOT / "VERSION").read_text().strip()]


def test_graphml_attributes_are_quoted_without_xml_sax():
    odd = 'blocks.0."q"<&>\tend'
    g = Graph("circuit", [Node(odd, "head", 0, label="a & b"), Node("logits", "logits", 2)],
              [Edge(odd, "logits", "resid", 1.5, component="q")])
    root = ET.fromstring(g.to_graphml())
    ns = {"g": "http://graphml.graphdrawing.org/xmlns"}
    assert [n.get("id") for n in root.iterfind(".//g:node", ns)] == [odd, "logits"]
    edge = root.find(".//g:edge", ns)
    assert (edge.get("source"), edge.get("target")) == (odd, "logits")
