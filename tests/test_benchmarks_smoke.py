"""The benchmarks' pure helpers, and the GPU script end to end on tiny CPU models (no timing is asserted:
benchmarks are never tests; this only keeps the script that runs where no CI does from rotting)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.bench_peers import dense_direct, max_diff
from benchmarks.common import table_lines

ROOT = Path(__file__).resolve().parent.parent


def test_dense_direct_takes_one_node_type_at_one_position():
    ids = np.array([[1, 0, 2, 5, -1], [1, 1, 0, 5, -1], [1, 1, 0, 4, -1], [3, 0, 7, 5, -1]])
    metrics = np.array([[0, 0, 0.5, 0], [0, 0, -1.0, 0], [0, 0, 9.0, 0], [0, 0, 3.0, 0]], dtype=np.float32)
    got = dense_direct(ids, metrics, node_type=1, pos=5, shape=(2, 3))
    assert got[0, 2] == 0.5 and got[1, 0] == -1.0
    assert np.isnan(got).sum() == 4


def test_max_diff_skips_missing_entries():
    assert max_diff([1.0, np.nan, 3.0], [1.5, 2.0, 3.0]) == 0.5
    assert np.isnan(max_diff([np.nan], [1.0]))


def test_table_lines_show_missing_values_and_notes():
    lines = table_lines([{"id": "P7", "what": "peer", "value": None, "note": "not installed"},
                         {"id": "P1", "what": "fwd", "value": 1.2345, "unit": "ms", "ratio": 1.0, "target": "<= 1"},
                         {"id": "P4", "what": "sweep", "value": 73157.2, "unit": "ms", "note": "max |a - b| 0"}])
    assert lines[2] == "| P7 | peer | — |  |  | not installed |"
    assert lines[3] == "| P1 | fwd | 1.23 ms | 1.00× | <= 1 |  |"
    assert lines[4] == "| P4 | sweep | 73,157 ms |  |  | max \\|a - b\\| 0 |"     # pipes escaped for Markdown


def test_gpu_script_runs_end_to_end_on_a_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--tiny", "--device", "cpu", "--dtype", "float32",
                        "--tokens", "8", "--steps", "10", "--repeat", "1", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["id"] for row in rows} == {"P1", "P2", "P4", "P5"}
    assert all(row["value"] is not None for row in rows)
    assert rows[-1]["value"] < 1e-4          # the batched head sweep reproduces the serial loop
    assert r.stdout.rstrip().splitlines()[-1].startswith("| P4 | fp32 exactness")   # the table comes last


def test_recompute_bound_counts_the_blocks_after_each_patch():
    from benchmarks.bench_sweeps import recompute_bound

    assert recompute_bound(12, 12) == 80          # 12 heads x (12 + 11 + ... + 1) blocks / 12 + 2 runs
    assert recompute_bound(2, 4) == 4 * 3 / 2 + 2


def test_perturb_norms_changes_the_layernorms_only(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from benchmarks.bench_peers import perturb_norms

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=8, vocab_size=32)).save_pretrained(
        tmp_path / "src")
    perturb_norms(tmp_path / "src", tmp_path / "dst")
    a = dict(GPT2LMHeadModel.from_pretrained(tmp_path / "src").named_parameters())
    b = dict(GPT2LMHeadModel.from_pretrained(tmp_path / "dst").named_parameters())
    norms = [k for k in a if ".ln_" in k]
    assert len(norms) == 2 * 2 * 2 + 2                          # ln_1, ln_2 per block, ln_f; weight and bias
    assert all(not torch.equal(a[k], b[k]) for k in norms)
    assert all(torch.equal(a[k], b[k]) for k in a if k not in norms)


def test_scaling_script_runs_on_tiny_models_without_peers(tmp_path):
    """benchmarks/bench_scaling.py end to end at two lengths and on the Llama family, peers off (CI has
    none): every task has a timed tdb row, every peer a row saying why it is absent, and the plot is drawn."""
    out, chart = tmp_path / "scaling.json", tmp_path / "scaling.html"
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_scaling", "--tiny", "--peers", "none", "--tokens", "8,16",
                        "--llama-tokens", "8", "--repeat", "1", "--long", "16", "--flow-max", "8", "--full-table-max", "8",
                        "--threads", "1", "--json", str(out), "--plot", str(chart)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["id"] for row in rows} == {"S"}
    cells = {(row["model"], row["tokens"], row["task"], row["tool"]): row for row in rows}
    for model, tokens, task in [("GPT-2 tiny", 8, "node table, direct effects at the target"),
                                ("GPT-2 tiny", 16, "cache everything"), ("GPT-2 tiny", 8, "information flow"),
                                ("GPT-2 tiny", 16, "exact head sweep, 8 heads"),
                                ("GPT-2 tiny", 16, "exact head sweep, layer 0 (4 heads)"),
                                ("Llama tiny", 8, "node table, direct effects at the target"),
                                ("Llama tiny", 8, "cache everything")]:
        tdb = cells[(model, tokens, task, "tdb")]
        assert tdb["value"] > 0 and tdb["ratio"] > 0, tdb
        if task != "information flow":
            assert "not asked for" in cells[(model, tokens, task, "TransformerLens")]["note"]
    assert cells[("GPT-2 tiny", 16, "information flow", "tdb")]["value"] is None          # past --flow-max
    assert "lower bound of 8" in cells[("GPT-2 tiny", 16, "exact head sweep, 8 heads", "tdb")]["note"]
    assert "one run" in cells[("GPT-2 tiny", 16, "exact head sweep, 8 heads", "tdb")]["note"]   # from --long on
    assert not any(row["model"] == "Llama tiny" and row["task"] in ("information flow",) for row in rows)
    assert "vega" in chart.read_text().lower()
