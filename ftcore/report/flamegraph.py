"""memray flamegraphs that open offline, and a static PNG of the top allocation sites.

memray's flamegraph HTML loads d3, d3-flame-graph, plotly, bootstrap, jQuery, popper and lodash
from a CDN (`<script src="https://cdn.jsdelivr.net/npm/PKG@VER/PATH">`); without internet the page
stays blank. `write_reports` runs `memray flamegraph` as usual, then replaces each such tag with
the same file inlined from ftcore/assets/flamegraph/ (npm packages vendored with their licenses;
the README there lists versions, sources and sizes). plotly is the exception: the memory graph
draws scatter traces only, so the 1 MB basic bundle of the same version stands in for the full
3.6 MB one. A URL that is not vendored (a newer memray that moved to other versions) stays as it
was and comes back as a warning: the page then needs internet for that file.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "flamegraph"
CDN = "https://cdn.jsdelivr.net/npm/"
# CDN path (as memray 1.20's templates write it) -> vendored file under ASSET_DIR
ASSETS = {
    "bootstrap@4.6.0/dist/css/bootstrap.min.css": "bootstrap@4.6.0/bootstrap.min.css",
    "bootstrap@4.6.0/dist/js/bootstrap.min.js": "bootstrap@4.6.0/bootstrap.min.js",
    "popper.js@1.16.1/dist/umd/popper.min.js": "popper.js@1.16.1/popper.min.js",
    "jquery@3.6.0/dist/jquery.min.js": "jquery@3.6.0/jquery.min.js",
    "lodash@4.17.21/lodash.min.js": "lodash@4.17.21/lodash.min.js",
    "plotly.js@2.11.1/dist/plotly.min.js": "plotly.js-basic-dist-min@2.11.1/plotly-basic.min.js",
    "d3@7.9.0/dist/d3.min.js": "d3@7.9.0/d3.min.js",
    "d3-scale-chromatic@3.1.0/dist/d3-scale-chromatic.min.js": (
        "d3-scale-chromatic@3.1.0/d3-scale-chromatic.min.js"
    ),
    "d3-flame-graph@4.1.3/dist/d3-flamegraph.min.js": "d3-flame-graph@4.1.3/d3-flamegraph.min.js",
}
# the two tag shapes memray writes for CDN files
_CDN_TAG = re.compile(
    r'<script src="(https?://[^"]+)"></script>|<link rel="stylesheet" href="(https?://[^"]+)">'
)
_SOURCE_MAP = re.compile(r"/[/*]# sourceMappingURL=\S+?(?: \*/)?$", re.M)


def inline_cdn_assets(html: str) -> tuple[str, list[str]]:
    """(html with every vendored CDN script/stylesheet inlined, URLs left as they were)."""
    missing: list[str] = []

    def swap(m: re.Match) -> str:
        url = m.group(1) or m.group(2)
        local = ASSETS.get(url[len(CDN):]) if url.startswith(CDN) else None
        if local is None:
            missing.append(url)
            return m.group(0)
        # no map fetches
        text = _SOURCE_MAP.sub("", (ASSET_DIR / local).read_text(encoding="utf-8"))
        if m.group(1):  # a literal "</script" would end the inline element early
            return "<script>" + re.sub(r"</(script)", r"<\\/\1", text, flags=re.I) + "</script>"
        return "<style>" + re.sub(r"</(style)", r"<\\/\1", text, flags=re.I) + "</style>"

    return _CDN_TAG.sub(swap, html), missing


class _Loads(HTMLParser):
    """Collects the URLs a page would fetch by itself (links a person clicks, <a href>,
    excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self._in_style = tag == "style"
        for name, value in attrs:
            if (
                tag != "a"
                and name in ("src", "href", "data", "poster")
                and value
                and _remote(value)
            ):
                self.urls.append(value)

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.urls += [
                u
                for u in re.findall(r"""(?:url\(|@import)\s*['"]?([^'")\s]+)""", data)
                if _remote(u)
            ]


def _remote(url: str) -> bool:
    return url.strip().lower().startswith(("http:", "https:", "//"))


def external_resources(html: str) -> list[str]:
    """URLs the page loads from elsewhere (scripts, stylesheets, images, CSS url()/@import)."""
    p = _Loads()
    p.feed(html)
    return p.urls


@dataclass(frozen=True)
class Site:
    """One allocation site: the innermost Python frame (else native) of bytes live at the peak."""

    function: str
    location: str
    mb: float
    allocations: int


def top_allocators(capture: Path, n: int = 10) -> tuple[list[Site], float]:
    """(the n sites holding the most bytes at memray's high-water mark, the peak in MB)."""
    import memray

    reader = memray.FileReader(str(capture))
    native = reader.metadata.has_native_traces
    sites: dict[tuple[str, str], list[int]] = {}
    for rec in reader.get_high_watermark_allocation_records(merge_threads=True):
        frames = rec.stack_trace(max_stacks=1)  # innermost first
        if not frames and native:
            frames = rec.native_stack_trace(max_stacks=1)
        key = (
            (frames[0][0], f"{Path(frames[0][1]).name}:{frames[0][2]}")
            if frames
            else ("(no frame)", "")
        )
        acc = sites.setdefault(key, [0, 0])
        acc[0] += rec.size
        acc[1] += rec.n_allocations
    mb = 2**20
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])
    floor = ranked[0][1][0] / 200 if ranked else 0  # drop sites under 0.5% of the largest
    return ([Site(f, loc, b / mb, c) for (f, loc), (b, c) in ranked[:n] if b >= floor],
            reader.metadata.peak_memory / mb)


def write_top_png(sites: list[Site], peak_mb: float, png: Path, title: str) -> None:
    """Horizontal bars, largest on top: MB live at the peak per site (matplotlib, no pyplot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 1.3 + 0.32 * max(len(sites), 1)))
    ax = fig.subplots()
    labels = [_short(f"{s.function} ({s.location})" if s.location else s.function) for s in sites][
        ::-1
    ]
    values = [s.mb for s in sites][::-1]
    bars = ax.barh(labels, values, color="#d9534f")
    ax.bar_label(bars, labels=[f"{v:.1f} MB" for v in values], padding=3, fontsize=8)
    ax.set_xlabel("MB live at the peak")
    ax.set_xlim(0, max(values, default=1) * 1.2)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title(f"{title}: top allocation sites at the memray peak\n"
                 f"(these {len(sites)} hold {sum(values):.0f} of {peak_mb:.0f} MB)", fontsize=10)
    fig.savefig(png, dpi=90, bbox_inches="tight")  # room for long labels


def _short(text: str, width: int = 50) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def write_reports(capture: Path, html: Path, png: Path, title: str) -> list[str]:
    """memray's flamegraph of `capture` as a self-contained `html`, and `png` of its top
    allocation sites beside it. Returns warnings (one line each; empty when all is inline)."""
    subprocess.run(
        [sys.executable, "-m", "memray", "flamegraph", "-f", "-o", str(html), str(capture)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    page, missing = inline_cdn_assets(html.read_text(encoding="utf-8"))
    html.write_text(page, encoding="utf-8")
    sites, peak = top_allocators(capture)
    write_top_png(sites, peak, png, title)
    return [f"{html.name} loads {url} from the web (not vendored in ftcore/assets/flamegraph; its "
            "README says how to add it): that part needs internet" for url in missing]
