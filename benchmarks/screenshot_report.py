"""Render a spedflow HTML report in headless Chromium: a screenshot and an image check.

Usage::

    python benchmarks/screenshot_report.py RESULT.zarr --out DIR [--store INPUT.zarr]
    python benchmarks/screenshot_report.py DIR/report.html

With a result store the report is written first (spedflow.report.write_report). The
screenshot is saved next to the report as ``report_screenshot.png``. The check:

1. every ``<img>`` in the page has a ``data:image/png;base64`` source that decodes to a
   PNG (static check of the file);
2. a probe copy of the page (the report plus a few lines of JavaScript appended; the
   report itself has none) is loaded in Chromium and its DOM dumped: each image must be
   ``complete`` with a non-zero ``naturalWidth``, i.e. the browser decoded it.

Exit status 0 and "all images loaded (N)" on success; 1 with the failing images listed
otherwise; 2 when Chromium is not installed.
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--disable-dev-shm-usage"]

_PROBE = """
<script>
window.addEventListener('load', function () {
  var bad = [], imgs = document.images;
  for (var i = 0; i < imgs.length; i++) {
    if (!(imgs[i].complete && imgs[i].naturalWidth > 0)) bad.push(i);
  }
  var d = document.createElement('pre');
  d.id = 'spedflow-probe';
  d.textContent = 'PROBE images=' + imgs.length + ' bad=' + bad.join(',') + ' END';
  document.body.appendChild(d);
});
</script>
"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def static_check(html: str) -> tuple[int, list[str]]:
    """Count <img> and list problems: external sources, undecodable or non-PNG data."""
    problems = []
    if re.search(r"\b(src|href)\s*=\s*['\"]?\s*(https?:|file:|//)", html, re.I):
        problems.append("page references an external resource")
    srcs = re.findall(r"<img[^>]*\bsrc=['\"]([^'\"]*)['\"]", html, re.I)
    for i, src in enumerate(srcs):
        if not src.startswith("data:image/png;base64,"):
            problems.append(f"img {i}: source is not embedded PNG data ({src[:30]!r})")
            continue
        try:
            raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        except ValueError as exc:
            problems.append(f"img {i}: base64 does not decode ({exc})")
            continue
        if not raw.startswith(b"\x89PNG\r\n\x1a\n") or len(raw) < 100:
            problems.append(f"img {i}: data is not a PNG")
    return len(srcs), problems


def run_chromium(chromium: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="spedflow-chromium-") as profile:
        return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


def browser_check(chromium: str, html_path: Path) -> tuple[int, list[str]]:
    """Load a probe copy of the page and read which images the browser decoded."""
    text = html_path.read_text(encoding="utf-8")
    probe = text.replace("</body>", _PROBE + "</body>") if "</body>" in text else text + _PROBE
    with tempfile.TemporaryDirectory(prefix="spedflow-probe-") as tmp:
        p = Path(tmp) / "probe.html"
        p.write_text(probe, encoding="utf-8")
        proc = run_chromium(chromium, ["--virtual-time-budget=10000", "--dump-dom", p.as_uri()])
    m = re.search(r"PROBE images=(\d+) bad=([\d,]*) END", proc.stdout)
    if not m:
        return 0, [f"probe did not run (chromium exit {proc.returncode}): {proc.stderr[-300:]}"]
    bad = [b for b in m.group(2).split(",") if b]
    return int(m.group(1)), [f"img {b}: not decoded by the browser" for b in bad]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="result store (.zarr) or an existing report.html")
    ap.add_argument("--out", help="report directory (when PATH is a result store)")
    ap.add_argument("--store", help="input store for the difference patterns")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=4000)
    a = ap.parse_args(argv)

    path = Path(a.path)
    if path.suffix == ".html":
        html_path = path
    else:
        from spedflow.report import write_report
        out = Path(a.out) if a.out else path.with_name(path.name + ".report")
        html_path = write_report(path, out, store_path=a.store)
    print(f"report: {html_path}")

    n, problems = static_check(html_path.read_text(encoding="utf-8"))
    chromium = find_chromium()
    if chromium is None:
        print("chromium is not installed: static check only")
        for p in problems:
            print("FAIL", p)
        return 2
    shot = html_path.with_name("report_screenshot.png")
    proc = run_chromium(chromium, [f"--screenshot={shot}", f"--window-size={a.width},{a.height}",
                                   html_path.resolve().as_uri()])
    if proc.returncode != 0 or not shot.exists():
        problems.append(f"screenshot failed (exit {proc.returncode}): {proc.stderr[-300:]}")
    else:
        print(f"screenshot: {shot}")
    n_browser, browser_problems = browser_check(chromium, html_path)
    problems += browser_problems
    if n_browser != n and not browser_problems:
        problems.append(f"browser saw {n_browser} images, the file has {n}")
    for p in problems:
        print("FAIL", p)
    if problems:
        return 1
    print(f"all images loaded ({n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
