"""Per-page interaction times of the dashboard in a real browser (headless Chromium through Selenium).

    .venv/bin/python benchmarks/bench_dashboard.py [--model induction] [--repeats 3] [--root DIR]

Starts `tdb dashboard --model M` (its own embedded server) from the checkout at --root (default this
one, so an older checkout can be measured the same way), opens each page on the model's demo prompt
and measures, from the browser's side:

    open      the page loaded from its URL until the app is idle (no "running" indicator, no skeleton)
    edit      the prompt changed (one word appended, Ctrl+Enter) until the new token count is shown
              and the app is idle: new server work plus Streamlit's rerun of the page (timed from the
              Ctrl+Enter: typing reruns nothing)
    back      the prompt changed back: the same, with the answers cached
    widget    Explore only: "verify the top k exactly" set to a new k (Enter) until its table says so
    step      Debugger only: after Launch with stop on entry, a click on Into until the new stop is shown

Medians over --repeats (each repeat edits to a different word, so `edit` is never cached). Prints a
table and writes JSON (--json). A benchmark, not a test: nothing is asserted.

With --script, no browser: the page's Python script alone under Streamlit's AppTest (the same server
and edits): what a rerun costs before Streamlit sends it and the browser draws it.
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
from urllib.parse import quote, unquote

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


def wait_idle(d, marker: str = "", timeout: float = 120.0, gone: str = "") -> float:
    """Seconds until the app is idle twice 150 ms apart (and `marker` is on the page, `gone` is not)."""
    t0 = time.perf_counter()
    quiet_since = None
    while time.perf_counter() - t0 < timeout:
        try:
            text = d.execute_script("return document.body.innerText") if marker or gone else ""
            idle = d.execute_script(IDLE_JS) and marker in text and not (gone and gone in text)
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


def set_prompt(d, text: str) -> float:
    """Type `text` into the prompt box and submit it (Ctrl+Enter); returns the time of the submit (typing,
    which reruns nothing, is the person's time, not the app's)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = d.find_elements(By.TAG_NAME, "textarea")[0]
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    t0 = time.perf_counter()
    box.send_keys(Keys.CONTROL, Keys.ENTER)
    return t0


def set_number(d, label: str, value: int) -> float:
    """Type `value` into the number input labelled `label` and submit it (Enter); returns the submit time."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = d.find_element(By.CSS_SELECTOR, f'input[aria-label="{label}"]')
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value))
    t0 = time.perf_counter()
    box.send_keys(Keys.ENTER)
    return t0


def click(d, label: str) -> float:
    """Click the button (or checkbox) showing `label`; returns the time of the click."""
    from selenium.webdriver.common.by import By

    el = d.find_element(By.XPATH, f"//button[normalize-space(.)='{label}' or .//p[normalize-space(.)='{label}']]"
                                  f" | //label[.//p[normalize-space(.)='{label}']]")
    t0 = time.perf_counter()
    el.click()
    return t0


def paused_line(d) -> str:
    """The Debugger's "paused at `site` (when)" line as shown."""
    m = re.search(r"paused at [^\n]*", d.execute_script("return document.body.innerText"))
    return m.group(0) if m else ""


def debugger_steps(d, n: int) -> list[float]:
    """Launch with stop on entry, then `n` clicks on Into: seconds from each click until the new stop is shown."""
    click(d, "stop on entry")
    wait_idle(d)
    click(d, "Launch")
    wait_idle(d, "paused at")
    times = []
    for _ in range(n):
        before = paused_line(d)
        t0 = click(d, "Into")
        wait_idle(d, "paused at", gone=before)
        times.append(time.perf_counter() - t0)
    click(d, "Stop")
    wait_idle(d)
    return times


# in-page interactions: (page, number input's label, values to set, text that shows the new value is drawn)
INTERACTIONS = {"explore": ("Verify the top k exactly (0: off)", (8, 6, 9), "over these {} rows")}


def measure(url: str, demo: str, n_tokens, repeats: int, pages=PAGES) -> dict[str, dict[str, float]]:
    d = browser()
    out: dict[str, dict[str, float]] = {}
    try:
        for page in pages:
            times: dict[str, list[float]] = {"open": [], "edit": [], "back": []}
            for r in range(repeats):
                t0 = time.perf_counter()
                d.get(f"{url}&page={page}&prompt={quote(demo)}")
                wait_idle(d, f"{n_tokens(demo)} tokens")
                times["open"].append(time.perf_counter() - t0)
                edited = f"{demo} {WORDS[r % len(WORDS)]}"
                t0 = set_prompt(d, edited)
                wait_idle(d, f"{n_tokens(edited)} tokens")
                times["edit"].append(time.perf_counter() - t0)
                t0 = set_prompt(d, demo)
                wait_idle(d, f"{n_tokens(demo)} tokens")
                times["back"].append(time.perf_counter() - t0)
                if page in INTERACTIONS:
                    label, values, marker = INTERACTIONS[page]
                    t0 = set_number(d, label, values[r % len(values)])
                    wait_idle(d, marker.format(values[r % len(values)]))
                    times.setdefault("widget", []).append(time.perf_counter() - t0)
            if page == "debugger":
                times["step"] = debugger_steps(d, 2 * repeats)
            out[page] = {k: statistics.median(v) for k, v in times.items()}
            print(f"{page:12s} " + "  ".join(f"{k} {v:6.2f} s" for k, v in out[page].items()), flush=True)
    finally:
        d.quit()
    return out


def measure_script(address: str, demo: str, repeats: int, pages=PAGES) -> dict[str, dict[str, float]]:
    """Seconds of the page script per rerun under AppTest after the prompt box changed: `edit` to a prompt
    nothing has cached, `back` to the demo (cached). The first run of each page (AppTest's own start-up,
    ~2 s of scanning installed packages) is not counted."""
    from streamlit.testing.v1 import AppTest

    os.environ["TDB_SERVER"] = address
    app = str(ROOT / "streamlit_app" / "app.py")
    out: dict[str, dict[str, float]] = {}
    for page in pages:
        times: dict[str, list[float]] = {"edit": [], "back": []}
        at = AppTest.from_file(app, default_timeout=120)
        at.query_params.update(page=page, prompt=demo)
        at.run()
        for r in range(repeats):
            edited = f"{demo} {WORDS[(r + PAGES.index(page)) % len(WORDS)]} {WORDS[r % len(WORDS)]}"
            for kind, text in (("edit", edited), ("back", demo)):
                at.text_area(key="url.prompt").set_value(text)
                t0 = time.perf_counter()
                at.run()
                times[kind].append(time.perf_counter() - t0)
                if at.exception:
                    print(f"{page}: {at.exception[0].value}", file=sys.stderr)
        out[page] = {k: statistics.median(v) for k, v in times.items()}
        print(f"{page:12s} " + "  ".join(f"{k} {v:6.2f} s" for k, v in out[page].items()), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="induction")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose dashboard to measure")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--prompt", default=None, help="the prompt (default: the model's demo, as its server reports it)")
    ap.add_argument("--pages", default=",".join(PAGES), help="the pages to measure, comma-separated")
    ap.add_argument("--script", action="store_true", help="time the page scripts under AppTest, not the browser")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tdb_client import TdbClient

    proc, url = start(args.root, args.model)
    try:
        server = unquote(re.search(r"server=([^&]+)", url).group(1))
        with TdbClient(server) as c:
            demo = getattr(c.model_info(), "demo", None)
            prompt = args.prompt or (demo.prompt if demo else "When Mr. Darcy entered the room, Mr.")

            def n_tokens(text: str) -> int:
                return len(c.tokenize(text)[0])

            pages = [p for p in args.pages.split(",") if p in PAGES]
            result = (measure_script(server, prompt, args.repeats, pages) if args.script
                      else measure(url, prompt, n_tokens, args.repeats, pages))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    report = {"model": args.model, "root": str(args.root), "repeats": args.repeats,
              "measured": "script" if args.script else "browser", "pages": result}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
