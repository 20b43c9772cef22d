"""Run by the packaging tests with a fresh environment's python (never the dev one): a tdb client as
a user installed it drives a server through a session, a node table and a patching sweep, and prints
what it saw as JSON. Usage: python drive_client.py HOST:PORT GROUND_TRUTH_JSON"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from tdb_client import Target, TdbClient

address, truth = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
demo = truth["demo"]
prompt, corrupted = demo["prompt"], demo["variants"][0]["prompt"]
target = Target(tokens=[demo["answer"]], distractors=[demo["distractor"]])
seen: dict = {"torch_importable": importlib.util.find_spec("torch") is not None,
              "client_file": __import__("tdb_client").__file__, "client_version": __import__("tdb_client").__version__}
with TdbClient(address, timeout=120) as tdb:
    info = tdb.initialize()
    seen["server_version"], seen["protocol_version"] = info.server_version, info.protocol_version
    with tdb.session() as s:                                   # a session: stop, read, go on
        s.set_breakpoints(["blocks.1.attn.out"])
        stop = s.launch(prompt, capture=["*"])                 # every site, attention patterns too
        pattern = s.read("blocks.1.attn.pattern")[0]           # [head, query, key]
        seen["stopped_at"] = stop.site
        seen["attends_to"] = [int(pattern[h, -1].argmax()) for h in range(pattern.shape[0])]
        seen["next_token"] = s.continue_().result.top[0][0].text
    table = tdb.node_table(prompt, target, top_k=5, node_types=["head"])
    seen["top_nodes"] = table.top.nodes
    sweep = tdb.patch_sweep(prompt, corrupted, target, kind="head_out")
    seen["sweep_shape"] = list(sweep.normalized.shape)
    seen["sweep_best"] = [int(i) for i in np.unravel_index(np.nanargmax(sweep.normalized), sweep.normalized.shape)]
    seen["sweep_html"] = sweep._repr_html_()                   # the notebook view needs nothing more
print(json.dumps(seen))
