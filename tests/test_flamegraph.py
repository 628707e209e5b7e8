"""Offline flamegraphs (ftcore.report.flamegraph): the HTML ftcore writes renders in headless Chromium
with networking off, and the PNG of the top allocation sites is written beside it.

A small script under the real `memray run` makes the capture (a 48 MB and an 8 MB allocation in
two named functions); Chromium (Debian's chromium-headless-shell, installed by scripts/setup.sh)
runs inside a fresh network namespace (`unshare --net`: no interface but a down loopback), so any
file still expected from a CDN fails to load and the page stays blank.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ftcore.report.flamegraph import (
    external_resources,
    inline_cdn_assets,
    top_allocators,
    write_reports,
)

pytestmark = pytest.mark.integration

SCRIPT = """
def ftcore_top_allocator():
    return bytearray(48 * 2**20)

def smaller_allocator():
    return bytearray(8 * 2**20)

keep = [ftcore_top_allocator(), smaller_allocator()]
"""
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def chromium() -> str:
    for name in (os.environ.get("FTCORE_CHROMIUM"), *BROWSERS):
        if name and (path := shutil.which(name)):
            return path
    pytest.fail("no headless Chromium: `apt-get install chromium-headless-shell` (scripts/setup.sh "
                "does it on Debian/Ubuntu) or set FTCORE_CHROMIUM")


def offline_prefix() -> list[str]:
    """A command prefix that runs its command with no network: a new network namespace (as root,
    else in a user namespace)."""
    for prefix in (["unshare", "--net"], ["unshare", "--net", "--map-root-user"]):
        if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    pytest.fail("cannot make a network namespace (`unshare --net`): the offline check needs one")


def render_offline(html: Path) -> str:
    """The DOM of `html` after its scripts ran (5 s of virtual time), Chromium offline."""
    cmd = [*offline_prefix(), chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--window-size=1200,800", "--virtual-time-budget=5000", "--dump-dom", html.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("memray")
    (d / "alloc.py").write_text(SCRIPT)
    subprocess.run([sys.executable, "-m", "memray", "run", "-q", "-o", str(d / "cap.bin"), str(d / "alloc.py")],
                   check=True, cwd=d, timeout=120)
    return d / "cap.bin"


def test_flamegraph_renders_offline(capture: Path):
    html, png = capture.with_name("flamegraph.html"), capture.with_name("top.png")
    assert write_reports(capture, html, png, "alloc.py") == []
    page = html.read_text()
    assert external_resources(page) == [], "the page still loads files from the web"

    sites, peak = top_allocators(capture)
    top = sites[0].function
    assert top == "ftcore_top_allocator" and 47.9 < sites[0].mb < 48.5 and peak >= 56

    dom = render_offline(html)
    chart = re.search(r'<div id="chart">(<svg.*?</svg>)', dom, re.S)
    assert chart, "no flamegraph SVG in #chart: the page did not render"
    svg = chart.group(1)
    assert svg.count('class="frame"') >= 3, "the flamegraph SVG has no frames"
    assert top in svg, f"the top allocation site {top} is not in the flamegraph"
    # the memory-over-time graph draws with the vendored plotly basic bundle
    small = re.search(r'<div id="smallMemoryGraph".*?</svg>', dom, re.S)
    assert small and "main-svg" in small.group(0), "plotly drew no memory graph"

    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24])[0] >= 600


def test_cdn_urls_not_vendored_are_kept_and_named():
    page = ('<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/bootstrap@4.6.0/dist/css/bootstrap.min.css">'
            '<script src="https://cdn.jsdelivr.net/npm/d3@7.9.0/dist/d3.min.js"></script>'
            '<script src="https://cdn.jsdelivr.net/npm/d3@7.9.1/dist/d3.min.js"></script>')
    out, missing = inline_cdn_assets(page)
    assert missing == ["https://cdn.jsdelivr.net/npm/d3@7.9.1/dist/d3.min.js"]
    assert external_resources(out) == missing
    assert out.count("<script>") == 1 and "<style>" in out and "sourceMappingURL" not in out


def test_external_resources_sees_every_kind_of_load():
    page = ('<a href="https://example.org/docs">docs</a><img src="//example.org/x.png">'
            '<style>@import "https://example.org/a.css"; .x{background:url(http://example.org/b.png)}</style>'
            '<link rel="icon" href="https://example.org/favicon.ico"><svg><path d="M0 0"/></svg>')
    assert external_resources(page) == ["//example.org/x.png", "https://example.org/a.css",
                                        "http://example.org/b.png", "https://example.org/favicon.ico"]


def test_inlined_text_cannot_close_its_element(tmp_path, monkeypatch):
    import ftcore.report.flamegraph as fg

    (tmp_path / "x.js").write_text('var s = "</script><b>oops</b>";\n//# sourceMappingURL=x.js.map\n')
    (tmp_path / "x.css").write_text("a{}</STYLE><b>\n/*# sourceMappingURL=x.css.map */")
    monkeypatch.setattr(fg, "ASSET_DIR", tmp_path)
    monkeypatch.setattr(fg, "ASSETS", {"x@1/x.js": "x.js", "x@1/x.css": "x.css"})
    out, missing = fg.inline_cdn_assets(f'<script src="{fg.CDN}x@1/x.js"></script>'
                                        f'<link rel="stylesheet" href="{fg.CDN}x@1/x.css">')
    assert not missing and "sourceMappingURL" not in out
    assert out.lower().count("</script") == 1 and out.lower().count("</style") == 1, out
