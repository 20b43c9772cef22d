"""A `tdb serve` subprocess under an address-space limit (RLIMIT_AS), for tests where memory is the point:
a request that would allocate past the limit kills nothing but its own allocation (MemoryError, or the
process) instead of the machine running the tests. `hostile_server(*flags, limit_gib=...)` yields it (its address and process id)."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]


def _limit(gib: float) -> None:
    n = int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (n, n))


@dataclass
class Served:
    address: str
    pid: int

    def alive(self) -> bool:
        return Path(f"/proc/{self.pid}").exists() and "zombie" not in _state(self.pid)

    def peak_rss_mib(self) -> float:
        """The high-water mark of the server's resident memory (VmHWM), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0


def _state(pid: int) -> str:
    try:
        return next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("State:"))
    except (OSError, StopIteration):
        return "zombie"


@contextlib.contextmanager
def hostile_server(*args: str, limit_gib: float = 3.0, env: dict[str, str] | None = None) -> Iterator[Served]:
    """`tdb serve --port 0 *args` with at most `limit_gib` GiB of address space."""
    proc = subprocess.Popen([sys.executable, "-m", "tdb_server", "serve", "--port", "0", "--device", "cpu", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: _limit(limit_gib),
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "listening on" in line or not line:
                break
        if "listening on" not in line:
            raise RuntimeError(f"the server did not start (exit code {proc.poll()})")
        yield Served(line.rsplit(" ", 1)[-1].strip(), proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

