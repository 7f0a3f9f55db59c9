"""A screenshot of `mt-serve`'s page, as docs/img/serve_page.png shows it.

    mt-serve saved/<run>/best.pt --port 8000 &
    python scripts/page_screenshot.py http://127.0.0.1:8000 docs/img/serve_page.png \\
        --text "Ein Mann fährt auf einem roten Fahrrad." --kind cross --layer 3 --head mean

Drives Debian's Chromium (`make browser`) with Playwright: types the text, waits for the
translation and the heat map, picks the attention to show, and saves the page.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys


def fail(message: str) -> None:
    """A one-line error on stderr and exit status 2, as the project's commands do."""
    print(f"page_screenshot: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="where mt-serve answers, e.g. http://127.0.0.1:8000")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--text", default="Ein Mann fährt auf einem roten Fahrrad.")
    parser.add_argument("--kind", default="cross", choices=("cross", "encoder", "decoder"))
    parser.add_argument("--layer", type=int, default=1, help="counted from 1")
    parser.add_argument("--head", default="mean", help="counted from 1, or mean")
    parser.add_argument("--nbest", type=int, default=3)
    parser.add_argument("--words", action="store_true", help="join subwords into words")
    args = parser.parse_args()
    chromium = os.environ.get("MT_CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        fail("no Chromium found (`make browser` installs it, or set MT_CHROMIUM)")
    try:
        from playwright.sync_api import Error, expect, sync_playwright
    except ImportError:
        fail("Playwright is not installed (pip install playwright; `make setup` installs it)")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(args.url.rstrip("/") + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('→')")
            page.fill("#nbest", str(args.nbest))
            if args.words:
                page.check("#words")
            page.locator("#source").press_sequentially(args.text, delay=10)
            expect(page.locator("#translations li").first).not_to_be_empty(timeout=60_000)
            page.locator("#heatmap td.cell").first.wait_for(timeout=60_000)
            # By index (Playwright also matches a value against the labels, which count from 1).
            kinds = {"cross": 0, "encoder": 1, "decoder": 2}
            page.select_option("#kind", index=kinds[args.kind])
            page.select_option("#layer", index=args.layer - 1)
            page.select_option("#head", index=0 if args.head == "mean" else int(args.head))
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    except (Error, AssertionError) as err:  # the page did not load, or answer in time
        fail(f"{args.url}: {str(err).splitlines()[0]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
