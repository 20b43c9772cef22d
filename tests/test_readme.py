"""The README's Python examples run as written (against a server on the bundled circuit model, as the
README says to start), and print what their comments say."""

import re
from pathlib import Path

from doc_helpers import python_blocks

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_examples_run(bundled_server, capsys):
    blocks = python_blocks("README.md")
    assert blocks, "no Python example in the README"
    namespace = {"__name__": "readme"}
    for code in blocks:
        exec(compile(code.replace("127.0.0.1:50051", bundled_server), "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "['blocks.1.attn.out', 'blocks.1.attn', 'blocks.1', 'model']" in out
    assert "('Darcy', 0.1)" in out                              # head 1.3 zeroed at the stop
    assert re.search(r"0\s+blocks\.1\.attn\.head\.3\s+head\s", out) and "direct_effect" in out
    assert "9.44 -> 3.99" in out


def test_readme_commands_exist():
    text = (ROOT / "README.md").read_text()
    for script in re.findall(r"bash (scripts/\S+\.sh)", text):
        assert (ROOT / script).is_file(), script
    for doc in re.findall(r"\]\(((?:docs|ide)/[^)#]+)\)", text):
        assert (ROOT / doc).exists(), doc
