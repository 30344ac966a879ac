"""``spedflow demo``: the whole analysis of the paper on a simulated data set."""

from __future__ import annotations

import html
import logging
import sys
from pathlib import Path

log = logging.getLogger("spedflow")


def run_demo(out="spedflow-demo", *, scan=(64, 64), detector: int = 128, seed: int = 0,
             overwrite: bool = False, progress: bool = True) -> Path:
    """Simulate, segment with both workflows, evaluate, and write the reports.

    Returns the path of ``index.html``, which links both reports and the scores.
    """
    from .api import segment
    from .evaluate import evaluate, format_evaluation
    from .report import write_report
    from .simulate import simulate

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "simulated.zarr"
    wanted = {"scan": [int(s) for s in scan], "detector": [int(detector)] * 2, "seed": int(seed)}
    made = _simulated_with(store)
    if made != wanted or overwrite:
        if made is not None and made != wanted:  # another --seed/--scan/--detector than last time
            _say(f"{store} was simulated with {made}; simulating it again with {wanted}", progress)
        _say(f"simulating {scan[0]}x{scan[1]} patterns of {detector}x{detector} px -> {store}", progress)
        simulate(store, scan=scan, detector=detector, seed=seed, overwrite=True, progress=progress)
    else:
        _say(f"reusing {store}, simulated before with these settings (--overwrite simulates it "
             "again; the workflows reuse their finished stages too)", progress)
    rows = []
    for method in ("vdf", "nmf"):
        result = out / f"{method}-result.zarr"
        _say(f"segmenting with the {method.upper()} workflow -> {result}", progress)
        segment(store, method=method, out=result, overwrite=True, progress=progress, local=True)
        scores = evaluate(result, store)
        print(format_evaluation(scores))  # the demo's result: on stdout, also with -q
        page = write_report(result, out / f"{method}-report", store_path=store)
        rows.append((method, scores, Path(page).relative_to(out.resolve()) if Path(page).is_absolute()
                     else Path(page).relative_to(out)))
    index = out / "index.html"
    body = "".join(
        f"<tr><td><a href='{html.escape(str(p))}'>{m.upper()} workflow report</a></td>"
        f"<td>{s['recall']:.2f}</td><td>{s['precision']:.2f}</td><td>{s['mean_iou']:.2f}</td></tr>"
        for m, s, p in rows)
    index.write_text(
        "<!doctype html><meta charset='utf-8'><title>spedflow demo</title>"
        "<h1>spedflow demo: nanocrystal segmentation of simulated SPED data</h1>"
        "<table border=1 cellpadding=4><tr><th>report</th><th>recall</th><th>precision</th>"
        f"<th>mean IoU</th></tr>{body}</table>")
    return index


def _simulated_with(store: Path) -> dict | None:
    """The scan, detector and seed an earlier demo simulated ``store`` with (None: no
    readable demo store there)."""
    if not store.exists():
        return None
    try:
        import zarr
        sim = zarr.open_group(str(store), mode="r").attrs["spedflow"]["simulation"]
        return {"scan": list(sim["scan"]), "detector": list(sim["detector"]), "seed": int(sim["seed"])}
    except Exception:  # not a finished demo store: simulate it again
        return {}


def _say(text: str, enabled: bool) -> None:
    if enabled:
        print(text, file=sys.stderr)
