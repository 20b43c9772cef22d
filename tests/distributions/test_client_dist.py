"""The client distribution (packages/tdb-client) without the model stack: built as a wheel, installed
into a fresh virtual environment with its three dependencies (grpcio, protobuf, numpy) and no torch,
it drives a real server -- started here from the full install -- through a session, a node table and
a patching sweep. Also measured: its install size and the import time of `tdb_client` there."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tdb_server.paths import circuit_model_path

from venvs import build, fresh_venv, pip_install, run, site_packages, source_copy, tree_bytes, wheelhouse

pytestmark = pytest.mark.timeout(900)

IMPORT_PROBE = ("import time; t = time.perf_counter(); c = time.process_time(); import tdb_client; "
                "print(time.perf_counter() - t, time.process_time() - c)")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client-dist")
    wheels = build(source_copy(tmp / "src", "client"), tmp / "dist", sdist=False)
    assert [w.name.split("-")[0] for w in wheels] == ["tdb_client"]
    python = fresh_venv(tmp / "venv")
    seconds = pip_install(python, "tdb-client", find_links=[tmp / "dist", wheelhouse()])
    return python, seconds


def test_the_client_wheel_installs_without_torch_and_drives_a_server(client_venv, bundled_server, tmp_path):
    python, install_s = client_venv
    out = run([python, Path(__file__).parent / "drive_client.py", bundled_server,
               circuit_model_path() / "ground_truth.json"], timeout=600, cwd=tmp_path)
    seen = json.loads(out)
    truth = json.loads((circuit_model_path() / "ground_truth.json").read_text())
    heads = {f"blocks.{layer}.attn.head.{h}" for layer, h in truth["induction_heads"]}
    assert seen["torch_importable"] is False
    assert seen["client_file"].startswith(str(site_packages(python)))       # the wheel, not this checkout
    version = (Path(__file__).parents[2] / "VERSION").read_text().strip()
    assert seen["server_version"] == seen["client_version"] == version
    assert seen["stopped_at"] == "blocks.1.attn.out" and seen["next_token"] == truth["demo"]["answer"]
    assert seen["top_nodes"][0] in heads
    assert seen["sweep_shape"] == [2, 4] and "blocks.{}.attn.head.{}".format(*seen["sweep_best"]) in heads
    assert "<table" in seen["sweep_html"]
    pkgs = {p.name.split("-")[0].lower() for p in site_packages(python).glob("*.dist-info")}
    assert {"torch", "transformers", "tokenizers", "safetensors"}.isdisjoint(pkgs), pkgs
    print(f"\ntdb-client installed in {install_s:.1f} s; distributions: {sorted(pkgs)}")


def test_client_install_size_and_import_time(client_venv, tmp_path):
    python, _ = client_venv
    site = site_packages(python)
    total = tree_bytes(site)
    ours = sum(tree_bytes(site / p) for p in ("tdb_client", "tdb", "streamlit_app"))
    runs = [tuple(map(float, run([python, "-c", IMPORT_PROBE], timeout=120, cwd=tmp_path).split()))
            for _ in range(5)]
    wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
    print(f"\ntdb-client install: {total / 2**20:.1f} MiB in site-packages ({ours / 2**20:.2f} MiB of it tdb's own); "
          f"import tdb_client: best of 5 {wall:.3f} s wall, {cpu:.3f} s CPU (median wall "
          f"{statistics.median(r[0] for r in runs):.3f} s)")
    assert total < 200 * 2**20          # grpcio + protobuf + numpy (~120 MiB); torch alone is ~700 MiB
    assert cpu < 1.0                     # ~0.2 s on an idle core; torch's import alone takes over a second
