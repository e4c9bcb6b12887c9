"""The README's two report screenshots, from a run directory's report: the first screen and a
feature card, both at 1280 x 800, in headless Chromium (the browser tests' DevTools client).

    python scripts/report_screenshots.py runs/organism [--feature L3/F107] [--out docs]

Writes docs/report_first_screen.png and docs/report_feature_card.png (palette-quantised so each
stays well under 300 KB). The feature defaults to the first one the browser lists (the first task's
strongest feature).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _save(img, path: Path) -> int:
    buf = io.BytesIO()
    img.quantize(colors=128).save(buf, format="PNG", optimize=True)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_report_browser import Chromium, find_browser

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--feature", default=None, help='the card to show, e.g. "L3/F107"')
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print("no Chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    page_path = (args.run_dir / "report" / "index.html").resolve()
    with tempfile.TemporaryDirectory() as tmp:
        page = Chromium(browser, Path(tmp) / "profile")
        try:
            page.open(page_path.as_uri())
            first = page.screenshot(Path(tmp) / "first.png")
            fid = args.feature or page.js("(JSON.parse(document.getElementById('feature-data').textContent).features[0] || {}).id")
            if not fid:
                print("the report has no features to show", file=sys.stderr)
                return 1
            page.type("#feature-search", fid)
            page.click("#feature-list .pick")
            card = page.screenshot(Path(tmp) / "card.png")
            assert page.console() == [], page.console()
        finally:
            page.close()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, img in (("report_first_screen.png", first), ("report_feature_card.png", card)):
        size = _save(img, args.out / name)
        print(f"{args.out / name}: {size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
