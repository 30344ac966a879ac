"""PNG plots of a benchmark results folder (``benchmarks/results/<size>/``).

- ``weak_scaling.png``: wall time and process-tree peak RSS vs data size, log-log, both
  workflows, with a linear-growth guide (time) and a flat guide (memory).
- ``stages.png``: per-stage wall time of each workflow on the main set, with the I/O
  floor and the start-up/write overhead.
- ``reference.png``: spedflow vs the reference implementation (pyxem), per workflow:
  end-to-end and algorithm times and the speed-up.
- ``strong_scaling.png``: wall time vs number of worker processes, with the ideal.
- ``quality_sets.png`` (from ``benchmarks/results/`` itself): recall and precision of
  both workflows on every set of each quality suite there (``quality.json``,
  ``variety.json``, ``foreign.json``, ``third.json``, ``kinematic.json``, ``lowdose.json``).

Each plot is drawn only if its JSON exists. ``python benchmarks/plot_results.py DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"vdf": "tab:blue", "nmf": "tab:orange"}


def _load(folder: Path, name: str):
    p = folder / name
    if not p.exists():
        return None
    return json.loads(p.read_text())


def _ok(rows):
    return [r for r in rows if r.get("returncode") == 0]


def plot_weak(res: dict, out: Path) -> Path | None:
    rows = _ok(res.get("rows", []))
    if not rows:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for m in sorted({r["method"] for r in rows}):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["gb"])
        x = [r["gb"] for r in rs]
        c = COLORS.get(m)
        a1.plot(x, [r["wall_s"] for r in rs], "o-", color=c, label=f"{m} end to end")
        a1.plot(x, [r["stage_sum_s"] for r in rs], "s--", color=c, alpha=0.6, label=f"{m} stages")
        if all(r.get("cpu_s") for r in rs):
            a1.plot(x, [r["cpu_s"] for r in rs], "v-.", color=c, alpha=0.6, label=f"{m} CPU s (tree)")
        a1.plot(x, [x[0] and rs[0]["stage_sum_s"] * xi / x[0] for xi in x], ":", color=c,
                alpha=0.5, label=f"{m} linear guide")
        for r in rs:
            if r.get("extra_args"):
                a1.annotate(" ".join(r["extra_args"]).replace("--set ", ""), (r["gb"], r["wall_s"]),
                            fontsize=6, textcoords="offset points", xytext=(3, -10))
        a2.plot(x, [r["peak_rss_mb"] for r in rs], "o-", color=c, label=m)
        a2.axhline(rs[0]["peak_rss_mb"], color=c, ls=":", alpha=0.5)
    fl = sorted({(r["gb"], r["io_floor_s"]) for r in rows if r.get("io_floor_s")})
    if fl:
        a1.plot([f[0] for f in fl], [f[1] for f in fl], "k^-", alpha=0.6, label="I/O floor")
    for a in (a1, a2):
        a.set_xscale("log")
        a.set_xlabel("data size (GB, uncompressed)")
        a.grid(True, which="both", alpha=0.3)
    a1.set_yscale("log")
    a2.set_ylim(bottom=0)  # linear from 0: flat memory reads as flat
    a1.set_ylabel("wall time / CPU time (s)")
    a1.set_title("Weak scaling: time (dotted: linear)")
    a2.set_ylabel("peak RSS of the process tree (MB)")
    a2.set_title("Weak scaling: memory (dotted: flat)")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_stages(res: dict, out: Path) -> Path | None:
    runs = {m: r for m, r in res.get("runs", {}).items() if r.get("returncode") == 0}
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(9, 2.4 + 1.0 * len(runs)))
    cmap = plt.get_cmap("tab20")
    names = []
    for rec in runs.values():
        names += [k for k in rec["timings"] if k not in names]
    for i, (m, rec) in enumerate(runs.items()):
        left = 0.0
        for k in names:
            v = rec["timings"].get(k, 0.0)
            if v <= 0:
                continue
            ax.barh(i, v, left=left, color=cmap(names.index(k) % 20), edgecolor="w",
                    label=k if i == 0 or k not in runs[list(runs)[0]]["timings"] else None)
            left += v
        ax.barh(i, max(rec["overhead_s"], 0), left=left, color="0.85", edgecolor="w", hatch="//",
                label="start-up, cluster, write" if i == 0 else None)
        cpu = f", CPU {rec['cpu_s']:.0f} s" if rec.get("cpu_s") else ""
        ax.text(rec["wall_s"], i, f" {rec['wall_s']:.1f} s{cpu}\n {rec['patterns_per_s']['end_to_end']:.0f} pat/s"
                f" (load {rec.get('load_avg_before', ['?'])[0]})", va="center", fontsize=8)
    floor = res.get("io_floor", {}).get("seconds")
    if floor:
        ax.axvline(floor, color="k", ls="--", label=f"I/O floor {floor:.2f} s")
    ax.set_yticks(range(len(runs)), list(runs))
    ax.set_xlabel("wall time (s)")
    ax.set_xlim(0, max(r["wall_s"] for r in runs.values()) * 1.45)
    ax.set_title("Per-stage time on the main set")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.35 / len(runs) - 0.1))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_reference(res: dict, out: Path) -> Path | None:
    cmp = {m: c for m, c in res.get("methods", {}).items()
           if c.get("reference", {}).get("returncode") == 0 and c.get("spedflow", {}).get("returncode") == 0}
    if not cmp:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels, sp, ref = [], [], []
    for m, c in cmp.items():
        for kind in ("end_to_end", "algorithm", "cpu"):
            if not (c["spedflow_s"].get(kind) and c["reference_s"].get(kind)):
                continue
            labels.append(f"{m}\n{kind.replace('_', ' ')}")
            sp.append(c["spedflow_s"][kind])
            ref.append(c["reference_s"][kind])
    xs = range(len(labels))
    a1.bar([x - 0.2 for x in xs], ref, 0.4, label="reference (pyxem)", color="0.5")
    a1.bar([x + 0.2 for x in xs], sp, 0.4, label="spedflow", color="tab:green")
    a1.set_xticks(list(xs), labels, fontsize=8)
    a1.set_yscale("log")
    a1.set_ylabel("wall time (s); cpu: CPU seconds")
    a1.set_title("Same simulated set, both tools")
    a1.legend(fontsize=8)
    speed = [r / s if s else 0 for r, s in zip(ref, sp)]
    a2.bar(list(xs), speed, color="tab:green")
    a2.axhline(1, color="k", lw=0.8)
    for x, s in zip(xs, speed):
        a2.text(x, s, f"{s:.1f}x", ha="center", va="bottom", fontsize=8)
    a2.set_xticks(list(xs), labels, fontsize=8)
    lines = []
    for m, c in cmp.items():
        q = [c[t].get("quality", {}) for t in ("reference", "spedflow")]
        if all("recall" in x for x in q):
            lines.append(f"{m}: recall {q[0]['recall']:.2f} -> {q[1]['recall']:.2f}, "
                         f"precision {q[0]['precision']:.2f} -> {q[1]['precision']:.2f}")
    if lines:  # above the bars, clear of their labels
        top = max(speed, default=1.0)
        a2.set_ylim(0, top * 1.45)
        a2.text(0.98, 0.97, "quality, reference -> spedflow\n" + "\n".join(lines),
                transform=a2.transAxes, ha="right", va="top", fontsize=7,
                bbox=dict(fc="w", ec="0.7"))
    a2.set_ylabel("speed-up (reference / spedflow)")
    a2.set_title("Speed-up vs reference")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_strong(res: dict, out: Path) -> Path | None:
    rows = _ok(res.get("rows", []))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    for m in sorted({r["method"] for r in rows}):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["workers"])
        w = [r["workers"] for r in rs]
        c = COLORS.get(m)
        ax.plot(w, [r["wall_s"] for r in rs], "o-", color=c, label=f"{m} end to end")
        ax.plot(w, [r["stage_sum_s"] for r in rs], "s--", color=c, alpha=0.6, label=f"{m} stages")
        if all(r.get("cpu_s") for r in rs):
            ax.plot(w, [r["cpu_s"] for r in rs], "v-.", color=c, alpha=0.5, label=f"{m} CPU s")
        ax.plot(w, [rs[0]["stage_sum_s"] * w[0] / wi for wi in w], ":", color=c, alpha=0.5,
                label=f"{m} ideal")
    ax.set_xticks(sorted({r["workers"] for r in rows}))
    ax.set_xlabel("local worker processes (1 thread each)")
    ax.set_ylabel("wall time (s)")
    ax.set_ylim(bottom=0)
    ax.set_title("Strong scaling")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


#: Quality suites: JSON name and panel title.
QUALITY_SUITES = (("quality.json", "own simulator: paper-like sets"),
                  ("variety.json", "own simulator: variety"),
                  ("foreign.json", "foreign simulator"),
                  ("third.json", "third simulator"),
                  ("kinematic.json", "kinematic MgO / ZnO (most crystals invisible)"),
                  ("lowdose.json", "own simulator: 300 / 1000 / 3000 counts per pattern"))


def plot_quality(folder: Path, out: Path) -> Path | None:
    """Recall (filled) and precision (open) per set, VDF and NMF side by side, one panel
    per quality suite found in ``folder``; each panel's title gives the means."""
    suites = [(title, res["rows"]) for name, title in QUALITY_SUITES
              if (res := _load(folder, name)) is not None and res.get("rows")]
    if not suites:
        return None
    fig, axes = plt.subplots(len(suites), 1, figsize=(9, 2.3 * len(suites)), squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], suites):
        sets = list(dict.fromkeys(r["set"] for r in rows))
        means = []
        for k, m in enumerate(("vdf", "nmf")):
            rs = {r["set"]: r for r in rows if r["method"] == m}
            if not rs:
                continue
            xs = [i + (k - 0.5) * 0.25 for i, name in enumerate(sets) if name in rs]
            got = [rs[name] for name in sets if name in rs]
            ax.plot(xs, [r["recall"] for r in got], "o", color=COLORS[m], label=f"{m} recall")
            ax.plot(xs, [r["precision"] for r in got], "o", mfc="none", color=COLORS[m],
                    label=f"{m} precision")
            means.append(f"{m} {sum(r['recall'] for r in got) / len(got):.2f} / "
                         f"{sum(r['precision'] for r in got) / len(got):.2f}")
        ax.set_xticks(range(len(sets)), sets, fontsize=7, rotation=20, ha="right")
        ax.set_ylim(-0.05, 1.08)
        ax.axhline(1.0, color="0.85", lw=0.8, zorder=0)
        ax.set_ylabel("score", fontsize=8)
        ax.set_title(f"{title}: mean recall / precision {', '.join(means)}", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=4, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_all(folder: str | Path) -> list[Path]:
    """Draw every plot whose JSON is in ``folder``; the PNG paths written."""
    folder = Path(folder)
    made = []
    for json_name, fn, png in (("weak_scaling.json", plot_weak, "weak_scaling.png"),
                               ("workflows.json", plot_stages, "stages.png"),
                               ("reference.json", plot_reference, "reference.png"),
                               ("strong_scaling.json", plot_strong, "strong_scaling.png")):
        res = _load(folder, json_name)
        if res is not None:
            p = fn(res, folder / png)
            if p:
                made.append(p)
    p = plot_quality(folder, folder / "quality_sets.png")
    if p:
        made.append(p)
    return made


if __name__ == "__main__":
    for p in plot_all(sys.argv[1] if len(sys.argv) > 1 else "."):
        print(p)
