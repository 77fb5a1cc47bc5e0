"""The documentation site: it builds in strict mode, and a real browser shows it as intended.

The site is built once a session with ``mkdocs build --strict`` (the ``docs`` extra), or taken from
``$REFIMPL_DOCS_SITE`` when CI has just built it. A headless Chromium (the distribution's package,
``/usr/bin/chromium``, driven by playwright without a browser download) then opens every page
from a local web server and checks that

- the page loads with no console error, no uncaught exception and no failed request, and asks
  nothing of any other host (the site must work with no network);
- every formula is rendered by KaTeX and no raw LaTeX delimiter is left in the text;
- every link between pages resolves, anchors included;

and it saves a screenshot of the forward-pass page.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import os
import subprocess
import sys
import threading
import urllib.parse

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get("REFIMPL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
BUILD_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> str:
    given = os.environ.get("REFIMPL_DOCS_SITE")
    if given:
        assert os.path.isfile(os.path.join(given, "index.html")), f"REFIMPL_DOCS_SITE={given} holds no built site"
        return given
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install '.[docs]'")
    out = str(tmp_path_factory.mktemp("site"))
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", out], cwd=ROOT,
                       capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                       env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"
    return out


def pages(site: str) -> list[str]:
    """Site-relative paths of every HTML page (the 404 page aside)."""
    out = []
    for dirpath, dirs, files in os.walk(site):
        dirs.sort()
        out += [os.path.relpath(os.path.join(dirpath, f), site).replace(os.sep, "/")
                for f in sorted(files) if f.endswith(".html") and f != "404.html"]
    return out


def test_site_builds_in_strict_mode_with_every_page(site):
    got = set(pages(site))
    for page in ("index.html", "forward/index.html", "walkthrough/index.html", "heads/index.html", "cli/index.html",
                 "api/index.html", "architecture/index.html", "tolerances/index.html"):
        assert page in got, f"{page} missing from the built site"
    with open(os.path.join(site, "walkthrough", "index.html"), encoding="utf-8") as f:
        walkthrough = f.read()
    assert "traced tensors recomputed" in walkthrough, "the walkthrough's outputs are not on its page"
    with open(os.path.join(site, "forward", "index.html"), encoding="utf-8") as f:
        forward = f.read()
    assert "refimpl/ops.py, line" in forward, "the forward page shows no source pulled from the code"


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("id", "name") and v:
                self.ids.add(v)


@functools.lru_cache(maxsize=None)
def anchors(path: str) -> frozenset:
    p = _Ids()
    with open(path, encoding="utf-8") as f:
        p.feed(f.read())
    return frozenset(p.ids)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def server(site):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=site))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture()
def browser(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; or set REFIMPL_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright comes with the docs extra: pip install '.[docs]'")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


RENDER_CHECK = """() => {
  const math = document.querySelectorAll('.arithmatex').length;
  const rendered = document.querySelectorAll('.arithmatex .katex').length;
  const errors = document.querySelectorAll('.katex-error').length;
  const body = document.body.cloneNode(true);
  body.querySelectorAll('pre, code, script, style, .katex').forEach(e => e.remove());
  const text = body.textContent;
  const raw = ['\\\\(', '\\\\)', '\\\\[', '\\\\]', '$$'].filter(d => text.includes(d));
  const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.href);
  return {math, rendered, errors, raw, links};
}"""


def test_every_page_in_a_real_browser(site, server, browser, tmp_path):
    origin = urllib.parse.urlsplit(server).netloc
    page = browser.new_page()
    problems: list[str] = []
    current = {"url": ""}
    page.on("console", lambda m: m.type == "error" and problems.append(f"{current['url']}: console error: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"{current['url']}: uncaught: {e}"))
    # A request cut short by the next navigation (net::ERR_ABORTED) is the test's doing, not the site's.
    page.on("requestfailed", lambda r: "ERR_ABORTED" not in (r.failure or "")
            and problems.append(f"{current['url']}: request failed ({r.failure}): {r.url}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"{current['url']}: HTTP {r.status}: {r.url}"))
    page.on("request", lambda r: urllib.parse.urlsplit(r.url).netloc not in (origin, "")
            and not r.url.startswith("data:") and problems.append(f"{current['url']}: asks another host: {r.url}"))

    math_on = {}
    links: set[tuple[str, str]] = set()
    for rel in pages(site):
        current["url"] = rel
        page.goto(server + rel, wait_until="networkidle")  # the search worker and fonts too
        page.wait_for_function("document.documentElement.dataset.math === 'rendered'", timeout=10_000)
        state = page.evaluate(RENDER_CHECK)
        math_on[rel] = state["rendered"]
        if state["errors"] or state["rendered"] != state["math"]:
            problems.append(f"{rel}: {state['rendered']} of {state['math']} formulas rendered, {state['errors']} KaTeX errors")
        if state["raw"]:
            problems.append(f"{rel}: raw LaTeX delimiters left in the text: {state['raw']}")
        links |= {(rel, href) for href in state["links"]}
        if rel == "forward/index.html":
            shot = tmp_path / "forward.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 20_000, "the forward page's screenshot is (nearly) empty"
            print(f"screenshot of the forward page: {shot}")

    for rel, href in sorted(links):
        url = urllib.parse.urlsplit(href)
        if url.scheme not in ("http", "https") or url.netloc != origin:
            continue  # a link to another site (Material's footer) is not followed: no network
        path = urllib.parse.unquote(url.path).lstrip("/")
        target = os.path.join(site, path, "index.html") if path == "" or path.endswith("/") else os.path.join(site, path)
        if not os.path.isfile(target):
            problems.append(f"{rel}: broken link {href}")
        elif url.fragment and target.endswith(".html") and urllib.parse.unquote(url.fragment) not in anchors(target):
            problems.append(f"{rel}: link to a missing anchor {href}")

    assert not problems, "\n".join(problems)
    assert math_on["forward/index.html"] >= 20, f"only {math_on['forward/index.html']} formulas on the forward page"
    assert math_on["heads/index.html"] >= 10
    assert len(links) > 100, "too few links followed: the link check is broken"
