"""Accuracy vs bits/value frontier (PNG) from results JSON files.

Reads any mix of:
  synthetic scores.json   (eval/synthetic.py)     y = average score at each length (one series per length)
  perplexity.json         (eval/perplexity.py, eval/frontier.py)  y = top-1 agreement with the full cache (%),
                          or --ppl-metric (a comma list: one panel each); eval/frontier.py's families are series
  calibration.json        (eval/calibrate.py)     y = NLL increase of every grid config
  generic {"results": {cache: {"score": y, "bits_per_value": x}}} (e.g. LongBench summaries)

    python -m eval.plot_frontier eval/results/*/scores.json eval/results/*/perplexity.json --out frontier.png
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any


def series_from(path: Path, ppl_metric: str = "top1_agreement") -> list[dict[str, Any]]:
    """[{label, ylabel, points: [(bits, y, cache)]}] from one results file."""
    data = json.loads(path.read_text())
    model = data.get("model", path.parent.name)
    out = []
    if data.get("suite") == "synthetic":
        for L in data.get("lengths", []):
            pts = []
            for cache, by_len in data["scores"].items():
                row = by_len.get(str(L))
                bits = data.get("bits_per_value", {}).get(cache, {}).get(str(L))
                if row and bits is not None:
                    pts.append((bits, row["avg"], cache))
            out.append({"label": f"{model} synthetic @{L}", "ylabel": "synthetic avg score", "points": pts})
    elif data.get("suite") == "perplexity":
        families = data.get("families") or {}  # eval/frontier.py: one series per family of caches
        for metric in ppl_metric.split(","):
            ylabel = {"top1_agreement": "top-1 agreement with full cache (%)", "delta_nll": "NLL increase (nats)",
                      "kl": "KL(full || cache)", "perplexity": "perplexity"}.get(metric, metric)
            groups: dict[str, list] = {}
            for cache, r in data["results"].items():
                y = r.get(metric)
                if y is None or r.get("bits_per_value") is None or (families and cache == "full"):
                    continue
                label = families.get(cache) or f"{model} ppl {data.get('text', '')} {data.get('tokens', '')} tok"
                groups.setdefault(label, []).append(
                    (r["bits_per_value"], 100 * y if metric == "top1_agreement" else y, _short(cache)))
            named = set(families.values())  # a family is a sweep, drawn joined; the other caches are unrelated
            out += [{"label": label, "ylabel": ylabel, "points": pts, "joined": label in named}
                    for label, pts in groups.items()]
            front = (data.get("targets") or {}).get("kvcomp_front")  # eval/frontier.py's Pareto front (ΔNLL only)
            if metric == "delta_nll" and front:
                out.append({"label": "kvcomp Pareto front", "ylabel": ylabel, "line": "-",
                            "points": [(b, d, "") for b, d in front]})
    elif "rows" in data and "chosen" in data:
        pts = [(r["bits_per_value"], r["delta_nll"], r["cache"]) for r in data["rows"]
               if r.get("bits_per_value") is not None and r.get("delta_nll") is not None]
        out.append({"label": f"{model} calibration grid", "ylabel": "NLL increase (nats)", "points": pts})
    elif isinstance(data.get("results"), dict):
        pts = [(r["bits_per_value"], r["score"], cache) for cache, r in data["results"].items()
               if isinstance(r, dict) and r.get("bits_per_value") is not None and r.get("score") is not None]
        out.append({"label": f"{model} {data.get('suite', path.stem)}", "ylabel": "score", "points": pts})
    return [s for s in out if s["points"]]


def _short(cache: str) -> str:
    """A compact point label: kvcomp specs lose their prefix and the fields the series names (rotation, layout,
    0 or 4 sink tokens); long decimals keep 3 significant digits."""
    for old, new in (("kvcomp:", ""), (",rotation=hadamard", ""), ("rotation=hadamard,", ""), ("rotation=none,", ""),
                     (",rotation=none", ""), ("layout=fixed,", ""), (",sink_tokens=4", ""), (",sink_tokens=0", ""),
                     ("sink_tokens=", "sinks "), ("rel_k=", "k"), (",rel_v=", "/v"), ("granularity=", ""),
                     ("pack_size=", "p"), ("layout=", ""), ("residual_length=", "res"), ("tail_bits=", "tail")):
        cache = cache.replace(old, new)
    return re.sub(r"\d+\.\d{4,}", lambda m: f"{float(m.group()):.3g}", cache)


def y_scale(ylabel: str, values: list[float]) -> str:
    """NLL increase and KL over many configs span orders of magnitude: symlog (which keeps 0 on the axis); within
    one order (e.g. configs around one accuracy) a linear axis reads better."""
    positive = [v for v in values if v > 0]
    spread = max(positive) / min(positive) if positive else 1.0
    return "symlog" if ylabel.startswith(("NLL", "KL")) and spread > 10 else "linear"


def plot(series: list[dict[str, Any]], out: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ylabels = sorted({s["ylabel"] for s in series})
    fig, axes = plt.subplots(len(ylabels), 1, figsize=(11, 4.6 * len(ylabels)), squeeze=False)
    for ax, ylabel in zip(axes[:, 0], ylabels):
        colors = iter(plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2])
        for s in (s for s in series if s["ylabel"] == ylabel):
            pts = sorted(s["points"])
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if s.get("line"):  # a reference line (e.g. a Pareto front), not a family of points
                ax.plot(xs, ys, color="black", linestyle=s["line"], linewidth=1, alpha=0.6, label=s["label"])
                continue
            single = len(pts) == 1  # a single config (a default, a preset): a star the legend names
            ax.plot(xs, ys, marker="*" if single else "o", markersize=13 if single else 6,
                    linestyle=":" if s.get("joined", True) else "none",
                    alpha=0.85, color=next(colors), markeredgecolor="black" if single else None, label=s["label"])
            for x, y, name in pts if not single else ():
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6.5, alpha=0.8)
        if y_scale(ylabel, [p[1] for s in series if s["ylabel"] == ylabel for p in s["points"]]) == "symlog":
            ax.set_yscale("symlog", linthresh=0.005)
        ax.set_xlabel("bits per K/V value (everything counted)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results JSON files")
    p.add_argument("--out", default="eval/results/frontier.png")
    p.add_argument("--ppl-metric", default="top1_agreement",
                   help="comma list of top1_agreement, delta_nll, kl, perplexity (one panel each)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    series = [s for f in args.results for s in series_from(Path(f), args.ppl_metric)]
    if not series:
        print("no plottable results in " + ", ".join(args.results), file=sys.stderr)
        return 1
    print(plot(series, Path(args.out), args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
