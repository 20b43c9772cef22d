"""The notebook walkthrough (docs/walkthrough.ipynb) executed by nbclient against a real server: every
step's result renders as HTML (node table, ablation, sweep heatmap, attention, logit lens, circuit,
activation records), with the model card's answers. Then the node table and the sweep heatmap, as
executed, are drawn by a real browser (headless Chromium): a screenshot in a temporary folder, or in
$TDB_SCREENSHOTS -- docs/screenshots/notebook.png comes from
`TDB_SCREENSHOTS=docs/screenshots .venv/bin/python -m pytest tests/distributions/test_notebook.py`
(a plain test run never rewrites tracked files)."""

from __future__ import annotations

import json
import os
import tempfile
from html import escape
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tdb_server.paths import circuit_model_path
from venvs import ROOT

NOTEBOOK = ROOT / "docs" / "walkthrough.ipynb"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOTS = Path(os.environ.get("TDB_SCREENSHOTS") or tempfile.mkdtemp(prefix="tdb-screenshots-"))
TRUTH = json.loads((circuit_model_path() / "ground_truth.json").read_text())
HEADS = [f"blocks.{layer}.attn.head.{h}" for layer, h in TRUTH["induction_heads"]]


@pytest.fixture(scope="module")
def executed(bundled_server, tmp_path_factory):
    """The notebook as executed (the file on disk is only read), and its code cells by their source."""
    before = NOTEBOOK.read_bytes()
    nb = nbformat.reads(before.decode(), as_version=4)
    env = os.environ.copy()
    os.environ["TDB_SERVER"] = bundled_server          # the kernel inherits it
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path_factory.mktemp("nb"))}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env)
    assert NOTEBOOK.read_bytes() == before
    return nb


def outputs(nb, source_start: str, kind: str = "text/html") -> str:
    cells = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source_start)]
    assert len(cells) == 1, source_start
    return "".join(o.get("data", {}).get(kind, "") if o.output_type == "execute_result" else o.get("text", "")
                   for o in cells[0].outputs)


def test_the_notebook_runs_and_every_result_renders(executed):
    assert not [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert "model induction: 2 layers x 4 heads" in outputs(executed, "import os", "text")
    assert f"next token '{TRUTH['demo']['answer']}'" in outputs(executed, "with tdb.session()", "text")
    table = outputs(executed, "table = tdb.node_table")
    assert "<table>" in table and "Node table: logit(&#x27;Darcy&#x27;) - logit(&#x27;Bingley&#x27;)" in table
    first = table.index("<td class=\"l\">blocks.")
    assert any(table.startswith(f'<td class="l">{h}</td>', first) for h in HEADS), table[first:first + 80]
    sweep = outputs(executed, "sweep = tdb.patch_sweep")
    assert 'class="tdb-grid"' in sweep and sweep.count('title="layer ') == 8 and "complete" in sweep
    cell = next(c for c in executed.cells if c.cell_type == "code" and c.source.startswith("sweep = "))
    kinds = [k for o in cell.outputs for k in o.get("data", {})] + [o.get("name") for o in cell.outputs]
    assert "application/vnd.jupyter.widget-view+json" in kinds and "stderr" not in kinds   # progress=True: a widget
    assert all(h in outputs(executed, "heads = [") for h in HEADS)
    assert outputs(executed, "tdb.attention_pattern").count("<table") == 4
    assert "Logit lens" in outputs(executed, "tdb.logit_lens")
    assert "Circuit: " in outputs(executed, "cue = ") and "Activation records" in outputs(executed, "tdb.activation_records")


def _page(nb) -> str:
    """The executed node table and sweep cells, input and output, as a notebook shows them."""
    parts = []
    for start in ("table = tdb.node_table", "sweep = tdb.patch_sweep"):
        cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith(start))
        parts.append(f'<div class="cell"><pre class="in">In [{cell.execution_count}]: {escape(cell.source)}</pre>'
                     f'<div class="out">{outputs(nb, start)}</div></div>')
    style = ("body{margin:16px;background:#fff}.cell{margin-bottom:18px}"
             "pre.in{background:#f5f5f5;border:1px solid #e0e0e0;padding:6px 8px;font-size:12px;margin:0 0 6px}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(parts)}</body></html>"


def test_a_browser_draws_the_node_table_and_the_sweep_heatmap(executed, tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        msg = f"needs {', '.join(missing)} (scripts/install_browser.sh)"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    page = tmp_path / "notebook.html"
    page.write_text(_page(executed), encoding="utf-8")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1100,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(60)
        driver.get(page.as_uri())
        tables = driver.find_elements(By.CSS_SELECTOR, ".tdb-view table")
        assert len(tables) >= 2 and all(t.size["width"] > 100 and t.size["height"] > 40 for t in tables)
        cells = driver.find_elements(By.CSS_SELECTOR, "table.tdb-grid td")
        assert len(cells) == 8 and all(c.size["width"] >= 20 for c in cells)
        colours = {c.value_of_css_property("background-color") for c in cells}
        assert len(colours) > 3                                 # a heatmap, not a blank grid
        driver.set_window_size(1100, 300)
        height, chrome = driver.execute_script("return [document.documentElement.scrollHeight, "
                                               "window.outerHeight - window.innerHeight]")
        driver.set_window_size(1100, min(3000, int(height) + int(chrome) + 16))   # the whole page in view
        SHOTS.mkdir(parents=True, exist_ok=True)
        shot = SHOTS / "notebook.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
    finally:
        driver.quit()
