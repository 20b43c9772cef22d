"""docs/architectures.md's code blocks run as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_architecture_guide_code_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "architectures.md").read_text(), re.S)
    assert len(blocks) == 2
    env: dict = {}
    for code in blocks:
        exec(compile(code, "architectures.md", "exec"), env)
    assert "mistral 2 layers, 27 sites verified" in capsys.readouterr().out
