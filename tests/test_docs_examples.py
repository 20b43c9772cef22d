"""The Python examples of docs/sweeps.md, circuits.md and sae.md run as written, against servers on the
bundled models they name (the address in each example is replaced by the test server's)."""

import pytest
from doc_helpers import python_blocks


def _run(doc: str, address: str, tmp_path, monkeypatch) -> None:
    blocks = python_blocks(f"docs/{doc}")
    assert blocks, doc
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code.replace("127.0.0.1:50051", address), doc, "exec"), {"__name__": "docs"})


@pytest.mark.parametrize("doc", ["sweeps.md", "circuits.md"])
def test_induction_model_examples(doc, bundled_server, tmp_path, monkeypatch):
    _run(doc, bundled_server, tmp_path, monkeypatch)


def test_sae_example(make_server, tmp_path, monkeypatch):
    from tdb_server.model import load_model
    from tdb_server.paths import bundled_models

    _, address = make_server(load_model(str(bundled_models()["austen"]), device="cpu", dtype="float32"))
    _run("sae.md", address, tmp_path, monkeypatch)
