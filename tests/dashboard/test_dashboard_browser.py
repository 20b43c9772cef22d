"""The running dashboard in a real browser (Debian's Chromium through Selenium), and `tdb dashboard`
end to end: start, print its URL, serve pages, stop cleanly on SIGTERM (with its embedded server).

Screenshots land in a temporary folder, or in $TDB_SCREENSHOTS: the README's come from
`TDB_SCREENSHOTS=docs/screenshots bash scripts/test.sh tests/dashboard/test_dashboard_browser.py`
(a test run never rewrites tracked files).
scripts/install_browser.sh (run by scripts/test.sh) installs chromium and chromium-driver; without
them this file is skipped, except under CI, where that is a failure.
"""

from __future__ import annotations

import os
import re
import tempfile
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from dash_helpers import ROOT

from tdb_client import TdbClient, TdbError

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOTS = Path(os.environ.get("TDB_SCREENSHOTS") or tempfile.mkdtemp(prefix="tdb-screenshots-"))
URL_LINE = re.compile(r"^tdb: dashboard at (http://\S+)$")
WIDTH = 1440
TYPED_BUNDLED = "Elizabeth saw Mr. Darcy at the ball, and later that evening she spoke of Mr."
TYPED_IDS = "9 4 33 7 61 9 4 33 7 61 12"


def _need_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        msg = f"browser test needs {', '.join(missing)} (scripts/install_browser.sh, the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def _free_port() -> int:
    from streamlit_app.launch import free_port

    return free_port()


class Dashboard:
    """`python -m tdb_server dashboard ...` as a child process; `url` once it printed its line."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "tdb_server", "dashboard", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: list[str] = []
        self.err: list[str] = []
        self._got = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()
        if not self._got.wait(180):
            self.stop()
            raise AssertionError(f"no URL line from `tdb dashboard`: {self.lines} {''.join(self.err)[-2000:]}")
        self.url = next(URL_LINE.match(line.strip()).group(1) for line in self.lines if URL_LINE.match(line.strip()))
        self.server = re.search(r"server=([^&]+)", self.url).group(1)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if URL_LINE.match(line.strip()):
                self._got.set()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def browser(tmp_path):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}", f"--window-size={WIDTH},1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# -- browser helpers ----------------------------------------------------------------------------------

def _wait(driver, predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # the page is re-rendering: try again
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; page text: {_text(driver)[:1500]}")


def _text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''")


def _idle(driver, timeout: float = 60) -> None:
    """Wait until the app has drawn and its script is not running (twice in a row, to skip reruns)."""
    from selenium.webdriver.common.by import By

    def quiet() -> bool:
        return (bool(driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebar"]'))
                and not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
                and not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSkeleton"]'))

    _wait(driver, quiet, timeout, "the app to finish running")
    time.sleep(0.6)
    _wait(driver, quiet, timeout, "the app to finish running")


def _click(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f'//button[.//p[normalize-space()="{label}"]]').click()


def _shoot(driver, name: str) -> Path:
    """A full-page screenshot: the window grows to the height of the app's scrolling main area."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h1")).perform()  # no stray tooltip
    height = driver.execute_script(
        "const m = document.querySelector('[data-testid=\"stMain\"]'); return m ? m.scrollHeight : 1000")
    driver.set_window_size(WIDTH, min(4000, max(900, int(height) + 40)))
    time.sleep(0.8)
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(WIDTH, 1000)
    assert path.stat().st_size > 20_000, f"{path} looks empty"
    return path


# -- tests ----------------------------------------------------------------------------------------------

def test_browser_explore_debugger_and_views(dash, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app = Dashboard("--server", dash.address, "--port", str(_free_port()))
    try:
        d = browser
        # Explore: type the prompt, submit it, wait for the node table
        d.get(f"{app.url}&target={dash.target}&distractor={dash.distractor}")
        _idle(d)
        box = d.find_element(By.CSS_SELECTOR, 'textarea[aria-label="Prompt"]')
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        # a prompt other than the page's default (the demo), so that typing it changes the URL
        variants = (dash.ground_truth or {}).get("demo", {}).get("variants") or [{"prompt": TYPED_BUNDLED}]
        prompt = variants[0]["prompt"] if dash.bundled else TYPED_IDS
        box.send_keys(prompt)
        box.send_keys(Keys.CONTROL, Keys.ENTER)
        n_tokens = len(prompt.split()) if not dash.bundled else None
        _wait(d, lambda: "prompt=" in d.current_url, 30, "the prompt in the URL")
        _idle(d)
        _wait(d, lambda: d.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]'), 60, "the node table")
        text = _text(d)
        assert "Node table" in text and "direct effect" in text.replace("_", " ")
        if n_tokens:
            assert f"{n_tokens} tokens" in text
        _shoot(d, "explore")
        # a row action inside the node table's fragment reruns the whole page: the page's panel shows it
        assert "Active ablations (0)" in text
        _click(d, "Ablate")
        _wait(d, lambda: "Active ablations (1)" in _text(d), 60, "the row's ablation in the page's panel")
        _idle(d)

        # Debugger: launch to a breakpoint, step into, look at the stack and a heatmap
        d.get(f"{app.url}&page=debugger&bp=blocks.0.attn.out")
        _idle(d)
        _click(d, "Launch")
        _wait(d, lambda: "paused at blocks.0.attn.out" in _text(d), 60, "the breakpoint")
        _idle(d)
        _click(d, "Into")
        _wait(d, lambda: "paused at blocks.0.resid_mid" in _text(d), 60, "the step")
        _idle(d)
        assert "Stack" in _text(d) and "Variables" in _text(d)
        _shoot(d, "debugger")

        from urllib.parse import quote

        for page, extra in (("attention", "&layer=1"), ("logit_lens", ""),
                            ("component", "&component=blocks.1.attn.head.1"), ("patching", ""),
                            ("circuit", f"&prompt={quote(prompt)}")):
            d.get(f"{app.url}&page={page}{extra}")
            _idle(d)
            assert "Traceback" not in _text(d)
            _shoot(d, page)
    finally:
        code = app.stop()
    assert code == 0, "".join(app.err)[-3000:]


def test_tdb_dashboard_starts_and_stops_its_embedded_server(dash, gpt2_adapter, tmp_path):
    if shutil.which("true") is None:  # pragma: no cover
        pytest.skip("no POSIX tools")
    args = ["--port", "0"]
    if not dash.bundled:                       # no bundled model yet: the random GPT-2, saved to disk
        gpt2_adapter.model.save_pretrained(tmp_path / "model")
        args += ["--model", str(tmp_path / "model")]
    app = Dashboard(*args)
    try:
        with urllib.request.urlopen(app.url.split("?")[0] + "_stcore/health", timeout=10) as r:
            assert r.status == 200
        with TdbClient(app.server) as c:
            assert c.model_info().n_layers >= 1
    finally:
        code = app.stop()
    assert code == 0, "".join(app.err)[-3000:]
    with TdbClient(app.server) as c, pytest.raises(TdbError):
        c.wait_ready(timeout=2)                # the embedded server is gone too


# -- fit: every page on both bundled models, at 1280 and 1440 px ----------------------------------------------

FIT_WIDTHS = (1280, 1440)
FIT_PAGES = (("explore", ""), ("component", ""), ("debugger", "&bp=blocks.0.attn.out"), ("patching", ""),
             ("attention", "&layer=1"), ("logit_lens", ""), ("circuit", ""))
OVERFLOW_JS = """
const main = document.querySelector('[data-testid="stMain"]');
if (!main) return null;
const right = main.getBoundingClientRect().right;
const out = [];
for (const el of main.querySelectorAll('canvas, svg, table, pre, [data-testid="stVegaLiteChart"], '
                                       + '[data-testid="stDataFrame"], [data-testid="stMarkdownContainer"], '
                                       + '[data-testid="stHorizontalBlock"]')) {
  if (el.closest('[data-testid="stDataFrame"]') && el.getAttribute('data-testid') !== 'stDataFrame') continue;
  const r = el.getBoundingClientRect();
  if (r.width > 0 && r.right > right + 1) out.push((el.getAttribute('data-testid') || el.tagName) + ' right=' +
                                                  Math.round(r.right) + ' > ' + Math.round(right));
}
if (main.scrollWidth > main.clientWidth + 1) out.push('main scrolls sideways: ' + main.scrollWidth + ' > ' + main.clientWidth);
return out;
"""


def _overflow(driver) -> list[str]:
    return driver.execute_script(OVERFLOW_JS) or []


@pytest.mark.parametrize("model", ["austen", "induction"])
def test_every_page_fits_at_1280_and_1440_px_on_both_bundled_models(model, browser):
    from tdb_server.paths import bundled_models

    if model not in bundled_models():
        pytest.skip(f"the {model} model is not bundled")
    app = Dashboard("--model", model, "--port", str(_free_port()))
    try:
        d = browser
        problems = {}
        for width in FIT_WIDTHS:
            for page, extra in FIT_PAGES:
                d.set_window_size(width, 1000)
                d.get(f"{app.url}&page={page}{extra}")
                _idle(d)
                text = _text(d)
                assert "Traceback" not in text and "page failed" not in text, (page, text[:800])
                assert "not in the model's vocabulary" not in text, (page, text[:800])      # the model's own demo
                bad = _overflow(d)
                if bad:
                    problems[f"{page}@{width}"] = bad
                if width == WIDTH:
                    _shoot(d, f"{model}-{page}")
        assert not problems, problems
    finally:
        code = app.stop()
    assert code == 0, "".join(app.err)[-3000:]
