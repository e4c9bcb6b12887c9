"""The study report in a real browser: headless Chromium loads it from a loopback server, logs no
console message, fetches nothing but the page itself, and paints a screenshot that is not blank.

Then, driven over Chromium's DevTools protocol (through a pipe, no library) at 1280 x 800: the
summary fills the first viewport, table columns sort and collapsed tables filter, the feature search
opens a card whose tokens are spaced and whose activations show without hovering; screenshots go to
each test's tmp dir. CI (.ci/run) installs Chromium with apt-get and sets MMDIFF_REQUIRE_BROWSER, so
there a missing browser fails; elsewhere the tests are skipped with the reason."""

from __future__ import annotations

import http.server
import io
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Self

import pytest
from PIL import Image
from test_report import SCRIPT, make_run

from mmdiff.report.build import build_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
    "--window-size=1280,2400",
]
CONSOLE = re.compile(r":CONSOLE[:(\]]")  # Chromium's log line of every console message
PLOTS = (
    "sae_fvu_curves",
    "sae_fvu_by_token_type",
    "sae_decoder_cosine",
    "gap_vs_cosine",
    "adapted_per_layer",
    "attribution_layers",
    "attribution_heads",
    "steering",
) + tuple(
    f"{t}_{k}"
    for t in ("spatial", "ocr", "safety")
    for k in ("firing", "candidates", "adapted_firing")
)


def find_browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


@pytest.fixture(scope="module")
def browser() -> str:
    path = find_browser()
    if path:
        return path
    why = (
        "no Chromium on PATH (tried " + ", ".join(BROWSERS) + "): install it (Debian: apt-get install "
        "chromium) to run the report's browser tests"
    )
    if os.environ.get("MMDIFF_REQUIRE_BROWSER"):  # CI (.ci/run) installs it: a skip there is a failure
        pytest.fail(why)
    pytest.skip(why)


class _Server:
    """A loopback HTTP server over `root` that records every path requested."""

    def __init__(self, root: Path) -> None:
        requested = self.requested = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                requested.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"


def screenshot(browser: str, url: str, tmp: Path) -> tuple[Image.Image, list[str]]:
    """(screenshot, console lines) of `url` in a fresh profile."""
    shot, profile = tmp / "shot.png", tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    proc = subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", url],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    console = [line for line in proc.stderr.splitlines() if CONSOLE.search(line)]
    return Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"), console


class Chromium:
    """Headless Chromium driven over its DevTools protocol through a pipe (--remote-debugging-pipe:
    commands on fd 3, replies and events on fd 4, each JSON message ending in a NUL byte), so no
    websocket library and no port. One page, attached in flat mode; every event is kept in `events`."""

    def __init__(self, browser: str, profile: Path, width: int = 1280, height: int = 800) -> None:
        import json
        import queue

        import fcntl

        self._json, self.events = json, []
        r, self._cmd_w = os.pipe()
        self._out_r, w = os.pipe()
        # the child's ends moved above 10, so putting them on 3 and 4 cannot overwrite one another
        cmd_r, out_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (r, w))
        os.close(r)
        os.close(w)

        def child_fds() -> None:  # runs in the child before exec: the pipes become fds 3 and 4
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)

        args = [a for a in FLAGS if not a.startswith(("--window-size", "--enable-logging", "--v="))]
        self.proc = subprocess.Popen(
            [browser, *args, "--remote-debugging-pipe", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            pass_fds=(3, 4, cmd_r, out_w), preexec_fn=child_fds,  # kept open past close_fds
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(cmd_r)
        os.close(out_w)
        self._replies: queue.Queue = queue.Queue()
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._out_r, 1 << 16)
            if not chunk:
                return
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = self._json.loads(raw)
                if "id" in msg:
                    self._replies.put(msg)
                else:
                    self.events.append(msg)

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, self._json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._replies.get(timeout=timeout)
            if reply["id"] == self._next:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply.get("result", {})

    def send(self, method: str, **params) -> dict:
        """A command to the page."""
        return self.call(method, self.session, **params)

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        out = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in out, out["exceptionDetails"]
        return out["result"].get("value")

    def open(self, url: str, timeout: float = 30) -> None:
        import time

        seen = len(self.events)
        self.send("Page.navigate", url=url)
        end = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events[seen:]):
            assert time.monotonic() < end, f"{url} did not load in {timeout} s"
            time.sleep(0.05)

    def click(self, selector: str) -> None:
        """A real mouse click (pressed and released) at the centre of the first match."""
        box = self.js(
            f"(() => {{ const e = document.querySelector({selector!r}); e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({selector!r}).focus()")
        self.send("Input.insertText", text=text)

    def screenshot(self, path: Path, clip: dict | None = None) -> Image.Image:
        import base64

        params = {"format": "png"} | ({"clip": {**clip, "scale": 1}} if clip else {})
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", **params)["data"]))
        return Image.open(path).convert("RGB")

    def console(self) -> list[str]:
        """Every console message, uncaught exception and log entry the page produced."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled":
                out.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')} {p['exceptionDetails'].get('exception', {}).get('description', '')}")
            elif m == "Log.entryAdded":
                out.append(f"log.{p['entry']['level']}: {p['entry']['text']}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it is going away either way
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)


def _plot_png(i: int) -> bytes:
    img = Image.new("RGB", (320, 200), "white")
    for x in range(40, 280):
        img.putpixel((x, 100 + (x * (i + 1)) % 60), (200, 30, 120))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict]:
    import mmdiff.report.build as build

    run = tmp_path_factory.mktemp("browser") / "organism"
    planted = make_run(run)
    # the plots' drawing is tested in test_report.py; newer PNGs keep this test fast
    (run / "report").mkdir(exist_ok=True)
    for i, name in enumerate(PLOTS):
        (run / "report" / f"{name}.png").write_bytes(_plot_png(i))
    collapse, build.COLLAPSE_ROWS = build.COLLAPSE_ROWS, 3  # the fake run's tables are short
    try:
        build_report(run)
    finally:
        build.COLLAPSE_ROWS = collapse
    return run, planted


@pytest.fixture(scope="module")
def report(planted) -> Path:
    return planted[0]


@pytest.fixture
def page(browser, tmp_path):
    chrome = Chromium(browser, tmp_path / "profile")
    yield chrome
    chrome.close()


def test_report_in_chromium(browser, report, tmp_path):
    with _Server(report) as server:
        img, console = screenshot(browser, server.url("report/index.html"), tmp_path)
    assert console == [], console
    fetched = [p for p in server.requested if p != "/favicon.ico"]
    assert fetched == ["/report/index.html"], f"the report fetched more than itself: {fetched}"
    colours = img.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 8, f"screenshot has only {len(colours)} colours"
    non_white = sum(img.convert("L").histogram()[:240]) / (img.width * img.height)
    assert non_white > 0.01, f"the screenshot is almost blank ({non_white:.2%} non-white pixels)"


def test_console_check_catches_errors(browser, tmp_path):
    """The console check is real: a page with a failing script is caught."""
    page = tmp_path / "bad" / "index.html"
    page.parent.mkdir()
    page.write_text(
        '<!DOCTYPE html><p>x</p><script>console.error("boom"); undefined_fn();</script>'
    )
    _, console = screenshot(browser, page.as_uri(), tmp_path)
    assert any("boom" in line for line in console) and any(
        "Uncaught" in line for line in console
    ), console


def test_the_answers_fill_the_first_screen(page, report, tmp_path):
    """At 1280 x 800 the five answers, the figure and the findings table are all in the first viewport,
    and nothing is wider than the window; the page is read from the file system and fetches nothing."""
    url = (report / "report" / "index.html").as_uri()
    page.open(url)
    shot = page.screenshot(tmp_path / "first-screen.png")
    assert shot.size == (1280, 800)
    geo = page.js(
        """(() => { const r = s => document.querySelector(s).getBoundingClientRect();
        return {answers: r('#summary .answers ol').bottom, findings: r('#summary table.findings').bottom,
                figure: r('#summary .sum-fig img').bottom, items: document.querySelectorAll('#summary .answers li').length,
                width: document.documentElement.scrollWidth, scripts: document.scripts.length}; })()"""
    )
    assert geo["items"] == 5, geo
    assert max(geo["answers"], geo["findings"], geo["figure"]) <= 800, geo
    assert geo["width"] <= 1280, f"the page is {geo['width']} px wide: something is cut off at 1280 px"
    assert geo["scripts"] == 2  # the feature data and the report's own script: no hostile text ran
    assert page.console() == []
    assert [u for u in page.requests() if not u.startswith("data:")] == [url]


def test_tables_sort_and_filter_in_place(page, report, tmp_path):
    page.open((report / "report" / "index.html").as_uri())
    found = page.js(
        """(() => { const t = [...document.querySelectorAll('#tasks table.sortable')].find(
             t => [...t.tHead.rows[0].cells].some(c => c.textContent === 'delta_p'));
           const col = [...t.tHead.rows[0].cells].findIndex(c => c.textContent === 'delta_p');
           t.closest('details') && (t.closest('details').open = true);
           return [t.id, col]; })()"""
    )
    table, col = found
    values = f"[...document.querySelectorAll('#{table} tbody tr')].map(r => parseFloat(r.cells[{col}].textContent))"
    before = page.js(values)
    assert len(before) >= 3
    page.click(f"#{table} thead th:nth-child({col + 1})")
    assert page.js(values) == sorted(before, reverse=True)
    page.click(f"#{table} thead th:nth-child({col + 1})")
    assert page.js(values) == sorted(before)
    page.screenshot(tmp_path / "sorted.png")
    # a collapsed table opens, and its filter box keeps the matching rows only
    tid = page.js("document.querySelector('input.filter').dataset.table")
    page.click(f"details:has(#{tid}) > summary")
    first = page.js(f"document.querySelector('#{tid} tbody tr').cells[0].textContent.trim()")
    n = page.js(f"document.querySelectorAll('#{tid} tbody tr').length")
    page.type(f"input[data-table='{tid}']", first)
    shown = page.js(f"[...document.querySelectorAll('#{tid} tbody tr')].filter(r => !r.hidden).map(r => r.textContent)")
    assert 1 <= len(shown) < n and all(first.lower() in t.lower() for t in shown), (first, shown)
    assert page.console() == []


def test_feature_search_opens_its_card(page, planted, tmp_path):
    run, facts = planted
    layer, feature = facts["keys"][0]
    fid = f"L{layer}/F{feature}"
    page.open((run / "report" / "index.html").as_uri())
    page.type("#feature-search", fid)
    assert page.js("document.querySelectorAll('#feature-list .pick').length") == 1
    page.click("#feature-list .pick")
    card = page.js(
        """(() => { const c = document.querySelector('#feature-card');
           const toks = [...c.querySelectorAll('.tokens .tok')].map(t => t.getBoundingClientRect());
           const img = c.querySelector('img.heat');
           return {title: c.querySelector('h3').textContent, tokens: toks.length,
                   gaps: toks.slice(1).map((r, i) => r.top > toks[i].top + 2 ? 99 : r.left - toks[i].right),
                   shown: [...c.querySelectorAll('.tok .act')].filter(a => a.getBoundingClientRect().width > 0).length,
                   words: [...c.querySelectorAll('.tok .w')].map(w => w.textContent),
                   heat: img ? img.naturalWidth : 0, text: c.textContent,
                   top: document.querySelector('#browser').getBoundingClientRect().top}; })()"""
    )
    assert card["title"] == f"Feature {fid}"
    assert card["tokens"] >= 5 and min(card["gaps"]) >= 2, card["gaps"]  # tokens never run together
    assert card["shown"] >= 3  # activations printed beside the strongest tokens, no hover needed
    assert SCRIPT in card["words"] and "<image x4>" in card["words"]  # dataset text shown as text
    assert card["heat"] > 0 and "spatial task features" in card["text"]
    assert 0 <= card["top"] < 80  # the browser scrolled to the card (below the sticky top bar)
    page.screenshot(tmp_path / "feature-card.png")
    # searching by task lists that task's features
    page.js("document.querySelector('#feature-search').value = ''")
    page.type("#feature-search", "ocr")
    assert page.js("document.querySelectorAll('#feature-list .pick').length") >= 1
    assert page.console() == []
