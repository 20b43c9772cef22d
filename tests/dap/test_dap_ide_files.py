"""The VS Code manifest, the example launch.json and the docs agree with what the adapter takes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VSCODE = ROOT / "ide" / "vscode"
GENERIC = {"type", "request", "name", "debugServer", "noDebug"}


def _debugger() -> dict:
    [dbg] = json.loads((VSCODE / "package.json").read_text())["contributes"]["debuggers"]
    return dbg


def _check_config(cfg: dict, props: dict) -> None:
    assert cfg["type"] == "tdb" and cfg["request"] == "launch" and cfg["name"]
    assert ("prompt" in cfg) != ("tokens" in cfg), cfg
    assert set(cfg) - GENERIC <= set(props), set(cfg) - GENERIC - set(props)


def test_manifest_declares_the_tdb_debugger():
    manifest = json.loads((VSCODE / "package.json").read_text())
    dbg = _debugger()
    assert dbg["type"] == "tdb" and "Debuggers" in manifest["categories"]
    program = VSCODE / dbg["program"]
    assert program.is_file() and os.access(program, os.X_OK)
    assert "dap" in program.read_text()
    assert (VSCODE / dbg["windows"]["program"]).is_file()
    props = dbg["configurationAttributes"]["launch"]["properties"]
    assert {"prompt", "tokens", "server", "model", "device", "dtype", "stopOnEntry", "prependBos", "capture",
            "breakpoints", "generate"} <= set(props)
    for cfg in dbg["initialConfigurations"] + [s["body"] for s in dbg["configurationSnippets"]]:
        _check_config(cfg, props)
    assert {"language": "tdb-sites"} in manifest["contributes"]["breakpoints"]
    assert any(".tdbsites" in lang["extensions"] for lang in manifest["contributes"]["languages"])


def test_example_launch_json():
    props = _debugger()["configurationAttributes"]["launch"]["properties"]
    configs = json.loads((VSCODE / "launch.json").read_text())["configurations"]
    assert configs
    for cfg in configs:
        _check_config(cfg, props)


def test_docs_cover_every_launch_attribute():
    doc = (ROOT / "docs" / "ide.md").read_text()
    for prop in _debugger()["configurationAttributes"]["launch"]["properties"]:
        assert re.search(rf"`{prop}`", doc), f"docs/ide.md does not describe {prop!r}"
    assert (ROOT / "ide" / "nvim-dap.md").is_file()
