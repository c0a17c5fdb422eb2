"""Markdown tables for eval/RESULTS.md from the benchmark JSON in eval/results/.

    python -m eval.tables kernels eval/results/bench_kernels.json
    python -m eval.tables kernels-summary DEFAULT.json FAST.json    (the README's table: graph times of two configs)
    python -m eval.tables generate eval/results/bench_generate.json
    python -m eval.tables merge-generate OUT.json RUN1.json RUN2.json ...   (one file from several bench_generate runs)
"""

from __future__ import annotations

import argparse
import json


def kernels_table(data: dict) -> str:
    info = data["info"]
    date = f"{info['date']}, " if info.get("date") else ""
    graph = any("fused_graph_ms" in r for r in data["rows"])  # runs before 2026-12-06 have eager times only
    head = ("| shape | context | batch | bits/value | fused ms | SDPA bf16 ms | cuBLAS q·Kᵀ+p·V ms "
            "| fused / SDPA speed-up | fused / roofline | store GB/s (eager / kernels) |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if graph:
        head += " fused ms (graph) | SDPA ms (graph) | speed-up (graph) |"
        rule += "---:|---:|---:|"
    lines = [f"{date}{info['device']}, torch {info['torch']}, triton {info['triton']}, copy bandwidth "
             f"{info['copy_bandwidth_GBps']:.0f} GB/s; config {_config(info.get('config', {}))}; {info['timing']}.", "",
             head, rule]
    for r in data["rows"]:
        if "skipped" in r:
            continue
        fused = r["fused_ms"]
        line = (f"| {r['shape']} | {r['context']} | {r['batch']} | {r['bits_per_value']:.2f} | {fused:.3f} | "
                f"{r['sdpa_bf16_ms']:.3f} | {r['cublas_ms']:.3f} | {r['sdpa_bf16_ms'] / fused:.2f}x | "
                f"{fused / r['roofline_ms']:.1f}x | {_store_cell(r)} |")
        if graph:
            line += (f" {r['fused_graph_ms']:.4f} | {r['sdpa_graph_ms']:.4f} | "
                     f"**{r['sdpa_graph_ms'] / r['fused_graph_ms']:.2f}x** |")
        lines.append(line)
    return "\n".join(lines)


def kernels_summary(default: dict, fast: dict) -> str:
    """The default config's and the fast preset's CUDA-graph times against SDPA, one row per shape."""
    by_shape = {(r["context"], r["batch"]): r for r in fast["rows"] if "fused_graph_ms" in r}
    fast_bits = next(iter(by_shape.values()))["bits_per_value"] if by_shape else float("nan")
    lines = [f"| context x batch | SDPA bf16 ms | default bits/value | default ms | default / SDPA | `fast` ms "
             f"({fast_bits:.2f} bits) | `fast` / SDPA | store GB/s (default; eager / kernels) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in default["rows"]:
        if "fused_graph_ms" not in r:
            continue
        f = by_shape.get((r["context"], r["batch"]))
        fast_cols = f"{f['fused_graph_ms']:.4f} | {f['sdpa_graph_ms'] / f['fused_graph_ms']:.2f}x" if f else "- | -"
        store = _store_cell(r)
        lines.append(f"| {r['context'] // 1024}K x {r['batch']} | {r['sdpa_graph_ms']:.4f} | "
                     f"{r['bits_per_value']:.2f} | {r['fused_graph_ms']:.4f} | "
                     f"{r['sdpa_graph_ms'] / r['fused_graph_ms']:.2f}x | {fast_cols} | "
                     f"{store} |")
    return "\n".join(lines)


def _store_cell(row: dict) -> str:
    """The store's GB/s of bf16 input as timed eagerly, and from its kernels' own time where the run has it."""
    eager, gpu = row.get("store_GBps_bf16_input"), row.get("store_GBps_bf16_input_gpu")
    if eager is None:  # --skip-store
        return "-"
    return f"{eager:.0f}" if gpu is None else f"{eager:.0f} / {gpu:.0f}"


def _config(cfg: dict) -> str:
    keys = ("rel_k", "rel_v", "pack_size", "repack", "granularity", "layout", "rotation")
    shown = dict(cfg)
    if shown.get("layout") == "auto" and "storage_layout" in cfg:  # the layout "auto" chose
        shown["layout"] = f"auto ({cfg['storage_layout']})"
    return ", ".join(f"{k} {shown[k]}" for k in keys if k in shown)


def generate_table(data: dict) -> str:
    rows = data["rows"] if isinstance(data, dict) else data
    lines = ["| model | cache | context | batch | TTFT s | decode tok/s | peak GiB | cache GiB | bits/value |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("status") != "ok" or r.get("same_as"):
            continue
        cache_gib = (r.get("cache_bytes") or 0) / 2**30
        lines.append(f"| {r['model']} | {r['cache']} | {r['context']} | {r['batch']} | {r['ttft_s']:.2f} | "
                     f"{r['decode_tok_s']:.1f} | {r['peak_mem_gib']:.1f} | {cache_gib:.2f} | "
                     f"{r.get('bits_per_value') or 0:.2f} |")
    return "\n".join(lines)


def merge_generate(paths: list[str]) -> dict:
    """The rows of several bench_generate runs in one file; each row names its run (meta.runs[i]: that run's
    argv, GPU, versions), so nothing is averaged or re-labelled."""
    runs, rows, notes = [], [], None
    for i, path in enumerate(paths):
        with open(path) as f:
            data = json.load(f)
        runs.append({"file": path, **{k: v for k, v in data["meta"].items() if k != "notes"}})
        rows += [{**r, "run": i} for r in data["rows"]]
        if notes is None:  # the notes of the first run
            notes = data["meta"].get("notes", [])
    return {"meta": {"runs": runs, "notes": notes, "gpu": runs[0].get("gpu")}, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["kernels", "kernels-summary", "generate", "merge-generate"])
    parser.add_argument("path", help="the JSON to read (merge-generate: the JSON to write)")
    parser.add_argument("runs", nargs="*", help="merge-generate: the bench_generate JSON files to merge; "
                                                "kernels-summary: the fast preset's bench_kernels JSON")
    args = parser.parse_args()
    if args.kind == "merge-generate":
        if not args.runs:
            parser.error("merge-generate needs at least one bench_generate JSON after the output path")
        with open(args.path, "w") as f:
            json.dump(merge_generate(args.runs), f, indent=1)
        return
    with open(args.path) as f:
        data = json.load(f)
    if args.kind == "kernels-summary":
        if len(args.runs) != 1:
            parser.error("kernels-summary needs the default's and the fast preset's bench_kernels JSON")
        with open(args.runs[0]) as f:
            print(kernels_summary(data, json.load(f)))
        return
    print(kernels_table(data) if args.kind == "kernels" else generate_table(data))


if __name__ == "__main__":
    main()
