"""`tdb serve` on the mistakes a new user makes first: a misspelt model name, a port already taken,
`--device cuda` on a machine without CUDA. Each ends with one line in tdb's words and a non-zero exit
status, never a Python traceback or the Hugging Face hub's advice (tdb never downloads)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tdb_server", "serve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_misspelt_model_name_is_refused_in_tdbs_words():
    from tdb_server.paths import bundled_models

    done = _serve("--model", "austin", "--port", "0")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert "huggingface" not in done.stderr.lower(), done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("tdb serve: no model 'austin'"), done.stderr
    for name in bundled_models():          # the names it could have meant
        assert name in line


def test_a_port_already_taken_is_one_line():
    from tdb_server.paths import bundled_models

    if "induction" not in bundled_models():
        pytest.skip("needs the bundled induction model")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = _serve("--model", "induction", "--device", "cpu", "--port", str(port))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"tdb serve: cannot bind 127.0.0.1:{port}"), done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_clear_error():
    from tdb_server.errors import FailedPrecondition
    from tdb_server.model import load_model
    from tdb_server.paths import resolve_model

    with pytest.raises(FailedPrecondition, match="no CUDA device"):
        load_model(resolve_model(None), device="cuda")


def test_a_port_already_taken_is_refused_before_the_model_loads(monkeypatch):
    from tdb_server import server

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(server, "load_model", no_load)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{port}"):
            server.serve(model="induction", port=port, device="cpu")
    server.check_port_free("127.0.0.1", port)         # free again once nothing listens


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_refused_before_the_weights_load(monkeypatch):
    import transformers

    from tdb_server.errors import FailedPrecondition
    from tdb_server.model import load_model
    from tdb_server.paths import resolve_model

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the device was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(FailedPrecondition, match="no CUDA device"):
        load_model(resolve_model(None), device="cuda")
