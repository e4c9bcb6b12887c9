"""The study report in a real browser: headless Chromium loads it from a loopback server, logs no
console message, fetches nothing but the page itself, and paints a screenshot that is not blank.

Chromium is installed with apt-get when it is missing and we are root; the test is skipped, with the
reason, only when that is impossible."""

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
from test_report import make_run

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
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(
            "chromium is not installed and cannot be: not root or no apt-get (apt-get install chromium)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(
            ["apt-get", "update", "-q"], check=True, capture_output=True, timeout=600, env=env
        )
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", "chromium"],
            check=True,
            capture_output=True,
            timeout=900,
            env=env,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(
            f"chromium could not be installed with apt-get ({exc}): {detail.decode(errors='replace')[-300:]}"
        )
    path = find_browser()
    if not path:
        pytest.skip("apt-get installed chromium but no chromium binary is on PATH")
    return path


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


def _plot_png(i: int) -> bytes:
    img = Image.new("RGB", (320, 200), "white")
    for x in range(40, 280):
        img.putpixel((x, 100 + (x * (i + 1)) % 60), (200, 30, 120))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("browser") / "organism"
    make_run(run)
    # the plots' drawing is tested in test_report.py; newer PNGs keep this test fast
    (run / "report").mkdir(exist_ok=True)
    for i, name in enumerate(PLOTS):
        (run / "report" / f"{name}.png").write_bytes(_plot_png(i))
    build_report(run)
    return run


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
