"""The README's Python example runs as written (against a server on the bundled circuit model)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs(bundled_server, capsys):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "no Python example in the README"
    code = blocks[0].replace("127.0.0.1:50051", bundled_server)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "['blocks.1.attn.out', 'blocks.1.attn', 'blocks.1', 'model']" in out
    assert "direct_effect" in out and "Darcy" in out


def test_readme_commands_exist():
    text = (ROOT / "README.md").read_text()
    for script in re.findall(r"bash (scripts/\S+\.sh)", text):
        assert (ROOT / script).is_file(), script
    for doc in re.findall(r"\]\(((?:docs|ide)/[^)#]+)\)", text):
        assert (ROOT / doc).exists(), doc
