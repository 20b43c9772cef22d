"""Fresh virtual environments filled from wheels on disk, for the packaging tests.

Builds use `python -m build --no-isolation` with the dev environment's setuptools, and installs use
`pip --no-index` with the wheels scripts/setup.sh downloaded into `<dev venv>/wheelhouse`, so nothing
here needs the network. The distributions are built from a copy of the sources (links followed), so
the checkout is left as it was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = Path(sys.prefix) / "wheelhouse"
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
# What a subprocess inherits must not point back at this checkout or at a package index.
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("PIP_")}


def run(cmd: list, *, timeout: float, cwd: Path | None = None, env: dict | None = None) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env=env or CLEAN_ENV)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def wheelhouse() -> Path:
    if not any(WHEELHOUSE.glob("numpy-*.whl")):
        pytest.fail(f"no wheels in {WHEELHOUSE}: run `bash scripts/setup.sh` (it downloads them once)")
    return WHEELHOUSE


def source_copy(dest: Path, which: str) -> Path:
    """A copy of one project's sources: "client" (packages/tdb-client, links resolved) or "server"
    (the repository root's pyproject.toml, README.md, VERSION and tdb_server)."""
    if which == "client":
        shutil.copytree(ROOT / "packages" / "tdb-client", dest, symlinks=False, ignore=SKIP)
    else:
        dest.mkdir(parents=True)
        for name in ("pyproject.toml", "README.md", "VERSION"):
            shutil.copy(ROOT / name, dest / name)
        shutil.copytree(ROOT / "tdb_server", dest / "tdb_server", ignore=SKIP)
    return dest


def build(project: Path, out: Path, *, sdist: bool) -> list[Path]:
    """sdist and wheel (the wheel built from the sdist, as pip would), or the wheel alone."""
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out] + ([] if sdist else ["--wheel"])
        + [project], timeout=300)
    return sorted(out.iterdir())


def fresh_venv(path: Path) -> Path:
    """A new virtual environment without pip (the dev environment's pip installs into it): its python."""
    run([sys.executable, "-m", "venv", "--without-pip", path], timeout=120)
    return path / "bin" / "python"


def pip_install(python: Path, *requirements: str, find_links: list[Path], compile: bool = True) -> float:
    """Install from wheels on disk only; returns the seconds it took. `compile=False` skips pip's
    byte-compiling of every file (torch has thousands; Python compiles what it imports), for installs
    whose import times are not measured."""
    links = [a for d in find_links for a in ("--find-links", str(d))]
    t0 = time.monotonic()
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index", "--no-cache-dir",
         *([] if compile else ["--no-compile"]), "--disable-pip-version-check", *links, *requirements], timeout=600)
    return time.monotonic() - t0


def site_packages(python: Path) -> Path:
    return Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=60).strip())


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
