#!/usr/bin/env python3
"""One PNG per headline comparison: throughput and latency percentiles of each path
against the baseline measured in the same run (issue 20, part 3).

    from benchplot import plot
    plot("docs/bench/hop.png", "title",
         [("direct", {"rps": ..., "p50_ms": ..., "p99_ms": ...}), ("gateway", {...})],
         baseline="direct", extra=("hop CPU µs / request", {"gateway": 21.0}))

matplotlib draws it. The benchmark scripts run with the system python; when it has no
matplotlib, the drawing runs in a venv of its own ($FAL_BENCH_VENV, default
~/.cache/fal-bench-venv), created with `pip install matplotlib` on first use. The
numbers stay in the scripts' tables and BENCHMARKS.md: a picture is only a glance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VENV = Path(os.environ.get("FAL_BENCH_VENV", Path.home() / ".cache" / "fal-bench-venv"))


def _python_with_matplotlib() -> str:
    try:
        import matplotlib  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    py = VENV / "bin" / "python"
    if not py.exists():
        print(f"benchplot: creating {VENV} with matplotlib (once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if subprocess.run([str(py), "-c", "import matplotlib"], capture_output=True).returncode:
        subprocess.run([str(py), "-m", "pip", "install", "-q", "matplotlib"], check=True)
    return str(py)


def plot(path, title, series, baseline=None, extra=None, units=("req/s", "ms")) -> None:
    """series: [(label, {"rps", "p50_ms", "p99_ms"})]; a value may be missing (None).
    extra: (title, {label: value}) drawn as a third panel (e.g. CPU per request)."""
    spec = {"path": str(path), "title": title, "series": series, "baseline": baseline,
            "extra": extra, "units": list(units)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        subprocess.run([_python_with_matplotlib(), __file__, f.name], check=True)
    finally:
        os.unlink(f.name)
    print(f"wrote {path}")


def _draw(spec: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = spec["series"]
    labels = [s[0] for s in series]
    extra = spec.get("extra")
    panels = 3 if extra else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6))
    base = next((s[1] for s in series if s[0] == spec.get("baseline")), None)
    colors = ["#9e9e9e" if lbl == spec.get("baseline") else c
              for lbl, c in zip(labels, ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"])]

    ax = axes[0]
    shown = [i for i, s in enumerate(series) if s[1].get("rps") is not None]
    vals = [series[i][1]["rps"] for i in shown]
    bars = ax.bar([labels[i] for i in shown], vals, color=[colors[i] for i in shown])
    for b, v in zip(bars, vals):
        txt = f"{v:,.0f}"
        if base and base.get("rps") and v:
            txt += f"\n{v / base['rps']:.2f}×"
        ax.annotate(txt, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_title(f"throughput ({spec['units'][0]})", fontsize=10)
    ax.set_ylim(0, max(vals + [1]) * 1.3)

    ax = axes[1]
    pcts = [k for k in ("p50_ms", "p90_ms", "p99_ms") if any(s[1].get(k) is not None for s in series)]
    lat = [(i, s) for i, s in enumerate(series) if any(s[1].get(k) is not None for k in pcts)]
    width = 0.8 / max(1, len(lat))
    for n, (i, (lbl, vals_)) in enumerate(lat):
        xs = [j + n * width for j in range(len(pcts))]
        ys = [vals_.get(k) or 0 for k in pcts]
        bs = ax.bar(xs, ys, width, label=lbl, color=colors[i])
        for b, y in zip(bs, ys):
            ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + width * (len(lat) - 1) / 2 for j in range(len(pcts))])
    ax.set_xticklabels([k.split("_")[0] for k in pcts])
    ax.set_title(f"latency ({spec['units'][1]})", fontsize=10)
    ax.legend(fontsize=7)

    if extra:
        ax = axes[2]
        title, d = extra
        ks = list(d)
        vs = [d[k] or 0 for k in ks]
        bs = ax.bar(ks, vs, color=[colors[labels.index(k)] if k in labels else "#1f77b4" for k in ks])
        for b, v in zip(bs, vs):
            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, max(vs + [1]) * 1.25)

    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(spec["title"], fontsize=11)
    fig.tight_layout()
    fig.savefig(spec["path"], dpi=100)


if __name__ == "__main__":
    _draw(json.loads(Path(sys.argv[1]).read_text()))
