"""Print the built site's size and each page's load time in headless Chromium (a measurement, not a test).

    python book/_ext/measure_site.py [_build/html]      # or: make measure

Each page is opened in a fresh browser context (empty cache) from a local HTTP server; the time is the
navigation's ``loadEventEnd`` (ms). Requests to another host are counted (the book should make none).
Targets of the book: the whole site ≤ 15 MB, every chapter's load event ≤ 2 s.
"""

from __future__ import annotations

import functools
import http.server
import os
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A page the browser leaves before a file is sent (a closed connection) is not an error here."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def main(book: Path, chromium: str = os.environ.get("VISEDIT_CHROMIUM", "/usr/bin/chromium")) -> int:
    from playwright.sync_api import sync_playwright

    files = [p for p in book.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(f"site: {book}  {size / 2**20:.1f} MB in {len(files)} files "
          f"(_static {sum(p.stat().st_size for p in files if '_static' in p.parts) / 2**20:.1f} MB)")
    server = _Server(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(book)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    pages = sorted(str(p.relative_to(book)) for p in book.glob("*/*.html") if p.parts[-2] not in ("_static", "_sources"))
    worst = 0.0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        print(f"{'page':45s} {'html MB':>8s} {'load ms':>8s} {'foreign':>8s}")
        for path in pages:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            page = context.new_page()
            foreign = []
            page.on("request", lambda r: foreign.append(r.url)
                    if urlsplit(r.url).scheme in ("http", "https") and urlsplit(r.url).hostname != "127.0.0.1" else None)
            page.goto(f"{base}/{path}", wait_until="load")
            ms = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
            worst = max(worst, ms)
            print(f"{path:45s} {(book / path).stat().st_size / 2**20:8.2f} {ms:8.0f} {len(foreign):8d}")
            context.close()
        browser.close()
    server.shutdown()
    print(f"largest load time {worst:.0f} ms; site {size / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "_build/html").resolve()))
