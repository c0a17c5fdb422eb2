"""Decode ms per step of each cache, one panel per context x batch, from an eval.bench_generate JSON (PNG).

    python -m eval.plot_generate eval/results/bench_generate.json --shapes 8192x1,32768x8 \
        --out eval/results/bench_generate.png

A shape measured by several runs of a merged file (eval.tables merge-generate) shows each cache once: the first
row with a decode time."""

from __future__ import annotations

import argparse
import json
import sys


def decode_times(data: dict, model: str | None = None) -> dict[tuple[int, int], dict[str, float]]:
    """{(context, batch): {cache: decode ms per step}} in row order."""
    shapes: dict[tuple[int, int], dict[str, float]] = {}
    for r in data["rows"]:
        ms = r.get("decode_ms_per_step")
        if r.get("status") != "ok" or ms is None or (model and r.get("model") != model):
            continue
        shapes.setdefault((r["context"], r["batch"]), {}).setdefault(r["cache"], ms)
    return shapes


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'8192x1,32768x8' -> [(8192, 1), (32768, 8)]."""
    try:
        return [tuple(int(x) for x in item.split("x")) for item in text.split(",")]  # type: ignore[misc]
    except ValueError:
        raise ValueError(f"--shapes takes CONTEXTxBATCH items separated by commas, e.g. 8192x1,32768x8; got {text!r}")


def plot(data: dict, out: str, model: str | None = None, shapes: list[tuple[int, int]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = decode_times(data, model)
    missing = [s for s in shapes or [] if s not in measured]
    if missing:
        raise ValueError(f"no decode times for {missing}; measured: {sorted(measured)}")
    shapes = {s: measured[s] for s in shapes} if shapes else measured
    if not shapes:
        raise ValueError("no row with status ok and decode_ms_per_step" + (f" for model {model!r}" if model else ""))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False)
    for ax, ((ctx, batch), times) in zip(axes[0], shapes.items()):
        names = list(times)
        bars = ax.barh(names, [times[n] for n in names],
                       color=["tab:green" if n.startswith("kvcomp") else "tab:gray" for n in names])
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{ctx // 1024}K context x batch {batch}", fontsize=10)
        ax.set_xlabel("ms per decode step (lower is better)")
        ax.margins(x=0.2)
    gpu = data.get("meta", {}).get("gpu") or "?"
    models = sorted({r.get("model") for r in data["rows"]} - {None})
    name = model or (models[0] if len(models) == 1 else "all models")
    fig.suptitle(f"generate(): decode time per step, {name}, {gpu}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="eval.bench_generate JSON (or a merge of several)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--model", default=None, help="only this model's rows (default: all)")
    p.add_argument("--shapes", default=None, help="CONTEXTxBATCH panels to draw, e.g. 8192x1,32768x8 (default: all)")
    args = p.parse_args(argv)
    shapes = parse_shapes(args.shapes) if args.shapes else None
    with open(args.path) as f:
        plot(json.load(f), args.out, args.model, shapes)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
