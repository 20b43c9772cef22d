"""Per-page interaction times of the dashboard in a real browser (headless Chromium through Selenium).

    .venv/bin/python benchmarks/bench_dashboard.py [--model induction] [--repeats 3] [--root DIR]

Starts `tdb dashboard --model M` (its own embedded server) from the checkout at --root (default this
one, so an older checkout can be measured the same way), opens each page on the model's demo prompt
and measures, from the browser's side:

    open      the page loaded from its URL until the app is idle (no "running" indicator, no skeleton)
    edit      the prompt changed (one word appended, Ctrl+Enter) until the new token count is shown
              and the app is idle: new server work plus Streamlit's rerun of the page
    back      the prompt changed back: the same, with the answers cached

Medians over --repeats (each repeat edits to a different word, so `edit` is never cached). Prints a
table and writes JSON (--json). A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("explore", "component", "debugger", "patching", "attention", "logit_lens", "circuit")
WORDS = ("the", "and", "to", "of", "her", "was")
URL_LINE = re.compile(r"^tdb: dashboard at (http://\S+)$")
IDLE_JS = """
const busy = document.querySelector('[data-testid="stStatusWidget"]') || document.querySelector('[data-testid="stSkeleton"]');
return document.querySelector('[data-testid="stSidebar"]') !== null && !busy;
"""


def start(root: Path, model: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tdb_server", "dashboard", "--model", model, "--port", "0"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    found: list[str] = []
    got = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            m = URL_LINE.match(line.strip())
            if m:
                found.append(m.group(1))
                got.set()

    threading.Thread(target=read, daemon=True).start()
    if not got.wait(180):
        proc.kill()
        raise SystemExit("the dashboard did not start")
    return proc, found[0]


def browser(width: int = 1440):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="tdb-bench-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", f"--user-data-dir={profile}", f"--window-size={width},1000"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))


def wait_idle(d, marker: str = "", timeout: float = 120.0) -> float:
    """Seconds until the app is idle twice 150 ms apart (and `marker` is on the page)."""
    t0 = time.perf_counter()
    quiet_since = None
    while time.perf_counter() - t0 < timeout:
        try:
            idle = d.execute_script(IDLE_JS) and (not marker or marker in d.execute_script(
                "return document.body.innerText"))
        except Exception:  # the page is being redrawn
            idle = False
        now = time.perf_counter()
        if idle:
            quiet_since = quiet_since or now
            if now - quiet_since >= 0.15:
                return quiet_since - t0
        else:
            quiet_since = None
        time.sleep(0.02)
    raise TimeoutError(f"not idle after {timeout} s (waiting for {marker!r})")


def set_prompt(d, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = d.find_elements(By.TAG_NAME, "textarea")[0]
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    box.send_keys(Keys.CONTROL, Keys.ENTER)


def measure(url: str, demo: str, n_tokens, repeats: int) -> dict[str, dict[str, float]]:
    d = browser()
    out: dict[str, dict[str, float]] = {}
    try:
        for page in PAGES:
            times: dict[str, list[float]] = {"open": [], "edit": [], "back": []}
            for r in range(repeats):
                t0 = time.perf_counter()
                d.get(f"{url}&page={page}&prompt={quote(demo)}")
                wait_idle(d, f"{n_tokens(demo)} tokens")
                times["open"].append(time.perf_counter() - t0)
                edited = f"{demo} {WORDS[r % len(WORDS)]}"
                t0 = time.perf_counter()
                set_prompt(d, edited)
                wait_idle(d, f"{n_tokens(edited)} tokens")
                times["edit"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                set_prompt(d, demo)
                wait_idle(d, f"{n_tokens(demo)} tokens")
                times["back"].append(time.perf_counter() - t0)
            out[page] = {k: statistics.median(v) for k, v in times.items()}
            print(f"{page:12s} " + "  ".join(f"{k} {v:6.2f} s" for k, v in out[page].items()), flush=True)
    finally:
        d.quit()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="induction")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose dashboard to measure")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--prompt", default=None, help="the prompt (default: the model's demo, as its server reports it)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tdb_client import TdbClient

    proc, url = start(args.root, args.model)
    try:
        server = re.search(r"server=([^&]+)", url).group(1)
        with TdbClient(server) as c:
            demo = getattr(c.model_info(), "demo", None)
            prompt = args.prompt or (demo.prompt if demo else "When Mr. Darcy entered the room, Mr.")

            def n_tokens(text: str) -> int:
                return len(c.tokenize(text)[0])

            result = measure(url, prompt, n_tokens, args.repeats)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    report = {"model": args.model, "root": str(args.root), "repeats": args.repeats, "pages": result}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
