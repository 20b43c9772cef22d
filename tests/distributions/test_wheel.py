"""A wheel that runs: `python -m build` makes the sdists and wheels of both distributions (tdb-client
and tdb-debugger); the wheels -- not an editable install -- go into a fresh virtual environment with
the pinned torch and the rest from wheels on disk; there `tdb --version` reports the version written
in VERSION, and `tdb serve` on a bundled model answers a client call with that version."""

from __future__ import annotations

import subprocess
import tarfile
import zipfile

import pytest

from venvs import CLEAN_ENV, ROOT, build, fresh_venv, pip_install, run, site_packages, source_copy, wheelhouse

pytestmark = pytest.mark.timeout(1200)
VERSION = (ROOT / "VERSION").read_text().strip()
BUNDLED = ("tdb_server/bundled/induction/model.safetensors", "tdb_server/bundled/induction/tokenizer.json",
           "tdb_server/bundled/induction/ground_truth.json", "tdb_server/bundled/austen/model.safetensors",
           "tdb_server/bundled/heldout.txt")

CLIENT_CALL = """
import sys, tdb_client, tdb_server
from tdb_client import TdbClient
with TdbClient(sys.argv[1], timeout=60) as c:
    info, model = c.initialize(), c.model_info()
    ids, _ = c.tokenize("Mr Darcy")
print(info.server_version, model.name, len(ids), tdb_client.__file__, tdb_server.__file__)
"""


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    out = tmp / "dist"
    build(source_copy(tmp / "client", "client"), out, sdist=True)
    build(source_copy(tmp / "server", "server"), out, sdist=True)
    return out


def test_sdists_and_wheels_carry_their_packages_and_the_bundled_models(dists):
    names = sorted(p.name for p in dists.iterdir())
    assert names == [f"tdb_client-{VERSION}-py3-none-any.whl", f"tdb_client-{VERSION}.tar.gz",
                     f"tdb_debugger-{VERSION}-py3-none-any.whl", f"tdb_debugger-{VERSION}.tar.gz"], names
    server = zipfile.ZipFile(dists / f"tdb_debugger-{VERSION}-py3-none-any.whl").namelist()
    client = zipfile.ZipFile(dists / f"tdb_client-{VERSION}-py3-none-any.whl").namelist()
    assert set(BUNDLED) <= set(server), sorted(set(BUNDLED) - set(server))
    assert {n.split("/")[0] for n in server if not n.startswith("tdb_debugger-")} == {"tdb_server"}
    assert {n.split("/")[0] for n in client if not n.startswith("tdb_client-")} == {"tdb", "tdb_client", "streamlit_app"}
    assert "tdb/v1/debugger_pb2.pyi" in client and "tdb_client/dap/__init__.py" in client
    meta = zipfile.ZipFile(dists / f"tdb_debugger-{VERSION}-py3-none-any.whl").read(
        f"tdb_debugger-{VERSION}.dist-info/METADATA").decode()
    assert "Requires-Dist: tdb-client" in meta and "Requires-Dist: torch" in meta
    with tarfile.open(dists / f"tdb_debugger-{VERSION}.tar.gz") as sdist:
        assert f"tdb_debugger-{VERSION}/{BUNDLED[0]}" in sdist.getnames()


def test_the_installed_wheel_serves_a_bundled_model(dists, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, "tdb-debugger", find_links=[dists, wheelhouse()], compile=False)
    tdb = python.parent / "tdb"
    assert run([tdb, "--version"], timeout=120, cwd=tmp_path).strip() == f"tdb {VERSION}"
    server = subprocess.Popen([tdb, "serve", "--model", "induction", "--port", "0", "--device", "cpu"], cwd=tmp_path,
                              env=CLEAN_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in server.stdout:                       # the model loads, then the port is printed
            lines.append(line)
            if line.startswith("tdb: listening on "):
                break
        assert lines and lines[-1].startswith("tdb: listening on "), "".join(lines)[-3000:]
        address = lines[-1].split()[-1]
        out = run([python, "-c", CLIENT_CALL, address], timeout=120, cwd=tmp_path).split()
        site = str(site_packages(python))
        assert out[:3] == [VERSION, "induction", "2"], out
        assert out[3].startswith(site) and out[4].startswith(site), out   # the wheels, not this checkout
    finally:
        server.terminate()
        server.wait(timeout=60)
