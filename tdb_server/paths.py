"""Where the bundled model(s) live inside the package."""

from __future__ import annotations

import functools
import json
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
DEFAULT_MODEL = "austen"


def bundled_models() -> dict[str, Path]:
    """Name -> directory of every bundled model (a folder with a config.json)."""
    if not BUNDLED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(BUNDLED_DIR.iterdir()) if (p / "config.json").is_file()}


def default_model_path() -> Path:
    models = bundled_models()
    if DEFAULT_MODEL in models:
        return models[DEFAULT_MODEL]
    if models:
        return next(iter(models.values()))
    raise FileNotFoundError(f"no bundled model under {BUNDLED_DIR}; run scripts/train_bundled.py or pass --model")


def ground_truth(path: Path) -> dict:
    """A bundled model's ground_truth.json ({} when it has none)."""
    f = Path(path) / "ground_truth.json"
    return json.loads(f.read_text()) if f.is_file() else {}


@functools.lru_cache(maxsize=8)
def demo(path: str) -> tuple[str, str, str] | None:
    """(prompt, answer, distractor) of the model folder's ground truth demo; None without one (or no folder)."""
    try:
        d = ground_truth(Path(path)).get("demo") if path and Path(path).is_dir() else None
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("prompt", "answer", "distractor")):
        return None
    return d["prompt"], d["answer"], d["distractor"]


def circuit_model_path() -> Path:
    """The bundled model whose ground truth has a verified induction circuit (tests and the walkthrough use
    it): the default model when its circuit is verified, else the first one that has one."""
    models = bundled_models()
    order = sorted(models, key=lambda n: (n != DEFAULT_MODEL, n))
    for name in order:
        if ground_truth(models[name]).get("circuit_verified"):
            return models[name]
    raise FileNotFoundError(f"no bundled model under {BUNDLED_DIR} has a verified circuit in its ground_truth.json")


def resolve_model(name_or_path: str | None) -> str:
    """`None` -> the default bundled model; a bundled model's name -> its folder; else the path."""
    if not name_or_path:
        return str(default_model_path())
    models = bundled_models()
    if name_or_path in models:
        return str(models[name_or_path])
    return name_or_path
