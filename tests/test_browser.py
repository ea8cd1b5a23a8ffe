"""The built book, opened page by page in a real browser (Playwright driving Debian's Chromium).

Needs a built book (``make book`` writes ``_build/html``; another folder: ``VISEDIT_BOOK_HTML``) and
Chromium (``/usr/bin/chromium``; another: ``VISEDIT_CHROMIUM``). Without either the tests skip with a
one-line reason, except under ``VISEDIT_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which installs
Chromium and builds the book first), where a missing piece fails them. The book is not built here:
a build executes every notebook (minutes), and the pages must show what the notebooks print.

Each page is served over HTTP on 127.0.0.1 and checked for: no console error, no request to another
host, every formula typeset by MathJax (no raw TeX left), every plotly figure drawn with a non-zero size
inside the text column, a slider that changes its figure (where a page has one), and nothing wider
than a 390 px phone screen. Screenshots land in ``_build/screens/`` (desktop and phone width).
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = Path(os.environ.get("VISEDIT_BOOK_HTML", ROOT / "_build" / "html"))
CHROMIUM = Path(os.environ.get("VISEDIT_CHROMIUM", "/usr/bin/chromium"))
SCREENS = ROOT / "_build" / "screens"
REQUIRED = os.environ.get("VISEDIT_REQUIRE_BROWSER") == "1"
# Pages a reader opens: every chapter and prose page (not the redirect, search and index pages).
PAGES = sorted(str(p.relative_to(BOOK)) for p in BOOK.glob("*/*.html") if p.parts[-2] not in ("_static", "_sources"))
ISSUE_NUMBER = re.compile(r"\bissues?\s*(?:#|no\.?\s*|number\s*)?\d+", re.I)


def _missing(book: bool = True) -> str | None:
    if book and not (BOOK / "index.html").exists():
        return f"no built book at {BOOK}: run `make book` first"
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM}: apt-get install -y chromium"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install -e '.[test]'"
    return None


def _require(book: bool = True) -> None:
    if (why := _missing(book)) is not None:
        (pytest.fail if REQUIRED else pytest.skip)(why)


@pytest.fixture(scope="module")
def site():
    _require()
    handler = functools.partial(_QuietHandler, directory=str(BOOK))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    _require(book=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


def _open(browser, url: str, width: int, height: int):
    """Open ``url`` at the given viewport; returns the page, its console errors and its foreign requests."""
    page = browser.new_page(viewport={"width": width, "height": height})
    errors, foreign = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: errors.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)

    def request(r):
        parts = urlsplit(r.url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname != "127.0.0.1":
            foreign.append(r.url)

    page.on("request", request)
    page.goto(url, wait_until="load")
    page.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise : null")
    # Figures are drawn when they come near the screen: scroll through them as a reader would.
    page.evaluate(SCROLL_THROUGH_FIGURES)
    page.wait_for_load_state("networkidle")
    return page, errors, foreign


SCROLL_THROUGH_FIGURES = """async () => {
  for (const g of document.querySelectorAll('.plotly-graph-div')) {
    g.scrollIntoView();
    for (let i = 0; i < 100 && !g._fullLayout; i++) await new Promise(r => setTimeout(r, 50));
  }
  window.scrollTo(0, 0);
}"""


UNRENDERED_MATH = """() => {
  const math = [...document.querySelectorAll('.math')];
  const left = math.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 60));
  const walker = document.createTreeWalker(document.querySelector('main') || document.body, NodeFilter.SHOW_TEXT);
  const raw = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (n.parentElement.closest('pre, code, script, style, mjx-container, .plotly-graph-div')) continue;
    if (/\\\\\\(|\\\\\\[|\\$\\$/.test(n.textContent)) raw.push(n.textContent.trim().slice(0, 60));
  }
  return {formulas: math.length, left, raw};
}"""

FIGURES = """() => {
  const column = (document.querySelector('article.bd-article') || document.querySelector('main')).getBoundingClientRect();
  return [...document.querySelectorAll('.plotly-graph-div')].map(g => {
    const r = g.getBoundingClientRect();
    return {id: g.id, title: (g.layout && g.layout.title && g.layout.title.text) || '', drawn: !!g._fullLayout,
            width: r.width, height: r.height, inside: r.left >= column.left - 1 && r.right <= column.right + 1,
            sliders: (g.layout && g.layout.sliders || []).length};
  });
}"""

# Everything but the slider itself, as drawn: changes when a slider step restyles or relayouts the figure.
DRAWING = """id => [...document.getElementById(id).querySelectorAll('svg.main-svg')].map(s => {
  const c = s.cloneNode(true); c.querySelectorAll('.slider-container').forEach(n => n.remove()); return c.outerHTML;
}).join('')"""

OVERFLOW = """() => {
  const W = document.documentElement.clientWidth, out = [];
  for (const e of document.querySelectorAll('body *')) {
    const r = e.getBoundingClientRect();
    if (r.width === 0 || r.height === 0 || r.right <= W + 1 || getComputedStyle(e).visibility === 'hidden') continue;
    let a = e.parentElement, clipped = false;
    for (; a && a !== document.body; a = a.parentElement) {
      if (getComputedStyle(a).overflowX !== 'visible' && a.getBoundingClientRect().right <= W + 1) { clipped = true; break; }
    }
    if (!clipped) out.push(`${e.tagName.toLowerCase()}.${[...e.classList].join('.')} right=${Math.round(r.right)}`);
  }
  return {viewport: W, scrollWidth: document.documentElement.scrollWidth, out};
}"""


def _screen(page, name: str) -> None:
    SCREENS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENS / name), full_page=True)


@pytest.mark.parametrize("path", PAGES or ["(no built book)"])
def test_page_in_the_browser(browser, site, path):
    page, errors, foreign = _open(browser, f"{site}/{path}", 1280, 1000)
    try:
        _screen(page, path.replace("/", "__").replace(".html", ".png"))
        assert not errors, f"console errors: {errors[:5]}"
        assert not foreign, f"requests to another host: {sorted(set(foreign))[:5]}"
        math = page.evaluate(UNRENDERED_MATH)
        assert not math["left"], f"{len(math['left'])} of {math['formulas']} formulas not typeset: {math['left'][:3]}"
        assert not math["raw"], f"raw TeX on the page: {math['raw'][:3]}"
        for fig in page.evaluate(FIGURES):
            assert fig["drawn"] and fig["width"] > 0 and fig["height"] > 0, f"figure not drawn: {fig}"
            assert fig["inside"], f"figure wider than the text column: {fig}"
            if fig["sliders"]:
                before = page.evaluate(DRAWING, fig["id"])
                slider = page.locator(f"[id='{fig['id']}'] .slider-rail-touch-rect").first
                slider.scroll_into_view_if_needed()  # a click outside the viewport reaches nothing
                rail = slider.bounding_box()
                page.mouse.click(rail["x"] + rail["width"] - 2, rail["y"] + rail["height"] / 2)
                page.wait_for_timeout(600)
                assert page.evaluate(DRAWING, fig["id"]) != before, f"moving the slider changes nothing: {fig}"
    finally:
        page.close()


@pytest.mark.parametrize("path", PAGES or ["(no built book)"])
def test_page_fits_a_phone(browser, site, path):
    page, _, _ = _open(browser, f"{site}/{path}", 390, 844)
    try:
        _screen(page, path.replace("/", "__").replace(".html", "-390.png"))
        fit = page.evaluate(OVERFLOW)
        assert not fit["out"], f"{len(fit['out'])} elements overflow a {fit['viewport']} px screen: {fit['out'][:5]}"
        assert fit["scrollWidth"] <= fit["viewport"] + 1, f"the page scrolls sideways: {fit}"
    finally:
        page.close()


def test_no_built_page_mentions_an_issue_number():
    """Project-management references ("issue 2 of the project") do not belong in the reader's pages."""
    if not (BOOK / "index.html").exists():
        (pytest.fail if REQUIRED else pytest.skip)(f"no built book at {BOOK}: run `make book` first")
    hits = []
    for page in sorted(BOOK.glob("*/*.html")):
        text = re.sub(r"<script.*?</script>|<style.*?</style>|<[^>]+>", " ", page.read_text(), flags=re.S)
        hits += [f"{page.relative_to(BOOK)}: …{m.group(0)}…" for m in re.finditer(r"\bissues?\b.{0,30}", text, re.I)
                 if ISSUE_NUMBER.search(m.group(0))]
    assert not hits, hits[:5]


def _markdown_sources():
    """(file name, text) of every markdown cell of the chapters and of every prose page: the book's sources."""
    import json

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "book").glob("*.md")):
        texts = (["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]
                 if path.suffix == ".ipynb" else [path.read_text()])
        yield from ((path.name, t) for t in texts)


def test_sources_do_not_mention_an_issue_number():
    """The same rule on the book's sources, so it holds without a build."""
    hits = [f"{name}: {m.group(0)}" for name, t in _markdown_sources()
            for m in re.finditer(r"\bissues?\b.{0,30}", t, re.I) if ISSUE_NUMBER.search(m.group(0))]
    assert not hits, hits


def test_sources_have_no_inline_code_word_too_wide_for_a_phone():
    """Inline code breaks only at spaces; one word of more than 40 monospace characters overflows a 390 px screen.

    The browser check finds it too, but only with a built book and with the fonts of the machine it runs on; this
    rule holds without either. Long commands belong in code blocks, which scroll.
    """
    hits = []
    for name, t in _markdown_sources():
        t = re.sub(r"^(`{3,}).*?^\1", "", t, flags=re.S | re.M)  # fenced blocks (and directives) scroll or wrap
        hits += [f"{name}: {w}" for m in re.finditer(r"`([^`\n]+)`", t) for w in m.group(1).split() if len(w) > 40]
    assert not hits, hits


def test_book_renderer_writes_the_figure_only(monkeypatch):
    """Under VISEDIT_BOOK=1 a figure's HTML holds neither plotly.js nor a CDN MathJax, and no fixed width."""
    import json

    import plotly.graph_objects as go
    import plotly.io as pio

    from visedit.viz import notebook_setup

    before = pio.renderers.default
    monkeypatch.setenv("VISEDIT_BOOK", "1")
    try:
        assert notebook_setup() == "visedit_book"
        fig = go.Figure(go.Bar(y=[1, 2]), layout={"width": 900, "height": 300, "title": {"text": "a </script> b"}})
        html = pio.renderers["visedit_book"].to_mimebundle(fig.to_dict())["text/html"]
    finally:
        pio.renderers.default = before
    assert "cdn" not in html and "MathJax" not in html and "Plotly.newPlot" not in html
    assert 'class="plotly-graph-div"' in html and "height:300px; width:100%" in html
    spec = json.loads(re.search(r'<script type="application/json"[^>]*>(.*)</script>', html, re.S).group(1))
    assert "width" not in spec["layout"] and spec["layout"]["title"]["text"] == "a </script> b"


GRID = """id => {
  const g = document.getElementById(id), m = g.layout.meta.visedit_reflow, panels = [];
  for (let k = 0; k < m.n; k++) {
    const s = k ? String(k + 1) : '', a = g.layout.annotations[m.titles[k]];
    panels.push({x: g.layout['xaxis' + s].domain, y: g.layout['yaxis' + s].domain, tx: a.x, ty: a.y});
  }
  return {cols: Number(g.dataset.reflow), width: g.clientWidth, height: g._fullLayout.height, margin: g._fullLayout.margin, panels};
}"""


def _grid_oracle(width: float, margin: dict, cols: int, cell: int, n: int) -> tuple[int, int]:
    """Columns and height a reflowing grid of ``n`` panels should take at ``width`` px."""
    plot_w = max(1.0, width - margin["l"] - margin["r"])
    c = max(1, min(cols, int(plot_w // (0.8 * cell))))
    rows = -(-n // c)
    return c, round(rows * (min(cell, plot_w / c) + 20) + margin["t"] + margin["b"])


def test_grids_reflow_to_the_width(browser, tmp_path, monkeypatch):
    """A gallery gets as many columns as its width holds (fewer on a phone, more again when the window
    widens), each panel in its own cell in row-major order with its title centred above it."""
    import shutil

    import plotly
    import plotly.io as pio
    from PIL import Image

    from visedit import viz

    ext = ROOT / "book" / "_ext"
    shutil.copy2(Path(plotly.__file__).parent / "package_data" / "plotly.min.js", tmp_path)
    shutil.copy2(ext / "visedit-figures.js", tmp_path)
    before = pio.renderers.default
    monkeypatch.setenv("VISEDIT_BOOK", "1")
    try:
        viz.notebook_setup()
        fig = viz.gallery([Image.new("RGB", (40, 40), (30 * k, 90, 160)) for k in range(8)], [f"p{k}" for k in range(8)])
        html = pio.renderers["visedit_book"].to_mimebundle(fig.to_dict())["text/html"]
    finally:
        pio.renderers.default = before
    fig_id = re.search(r'<div id="([^"]+)"', html).group(1)
    (tmp_path / "grid.html").write_text(
        '<!doctype html><html><body style="margin:0"><div style="max-width:700px; margin:0 auto">'
        f'{html}</div><script src="plotly.min.js"></script><script src="visedit-figures.js"></script></body></html>')
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto((tmp_path / "grid.html").as_uri(), wait_until="load")
        seen = []
        for width in (1280, 390, 1280):
            page.set_viewport_size({"width": width, "height": 900})
            page.wait_for_timeout(600)
            grid = page.evaluate(GRID, fig_id)
            cols, height = _grid_oracle(grid["width"], grid["margin"], 6, 150, 8)
            assert (grid["cols"], grid["height"]) == (cols, height), (width, grid["cols"], grid["height"])
            m = grid["margin"]
            plot_w, plot_h = grid["width"] - m["l"] - m["r"], height - m["t"] - m["b"]
            row_h = min(150, plot_w / cols) + 20
            for k, p in enumerate(grid["panels"]):
                r, c = divmod(k, cols)
                top, bottom = 1 - (r * row_h + 20) / plot_h, 1 - (r + 1) * row_h / plot_h
                assert abs(p["x"][0] - (c + 0.01) / cols) < 1e-6 and abs(p["x"][1] - (c + 0.99) / cols) < 1e-6
                assert bottom - 1e-6 <= p["y"][0] < p["y"][1] <= top + 1e-6, (k, p, bottom, top)
                assert abs(p["tx"] - (c + 0.5) / cols) < 1e-6 and abs(p["ty"] - top) < 1e-6
            seen.append(cols)
        assert seen[0] > seen[1] and seen[2] == seen[0], seen
    finally:
        page.close()
