"""The accuracy-per-bit frontier in one run: perplexity through many caches, in parallel worker processes.

Every cache spec is teacher-forced through the model beside the full cache (eval/perplexity.py's
evaluate_window) over --windows windows of --tokens tokens; workers (separate processes, each loading the
model once) share one GPU, which small models leave mostly idle. Each finished spec is written at once, so
a run stopped by --time-budget keeps what it finished. The merge writes

    <out>/perplexity.json   (suite "perplexity": what eval/plot_frontier.py reads)
    <out>/frontier.md       bits/value all-in, ΔNLL, KL, top-1, and the bits/value of each part of the cache
    <out>/frontier.png      bits/value against ΔNLL and against KL

Spec extension for the per-layer lever: a kvcomp spec may end in "|edge=N*F": the first and last N layers
use rel_k and rel_v multiplied by F (e.g. "kvcomp:rotation=hadamard|edge=2*0.5").

    python -m eval.frontier --workers 12 --tokens 8192 --windows 2 --out eval/results/frontier-smollm2
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from eval import common, perplexity

ROT = "rotation=hadamard"
# (spec, family) in priority order: baselines, the rel sweep with and without rotation, then the levers
DEFAULT_CACHES = [
    ("kvcomp:rel_k=0.1,rel_v=0.2,rotation=none,granularity=token,repack=median,pack_size=16", "kvcomp old default"),
    ("kvcomp:smollm2-135m-instruct", "kvcomp old preset"),
    ("kivi2", "KIVI"), ("kivi4", "KIVI"),
    *[(f"kvcomp:rel_k={k},rel_v={v},{ROT}", "kvcomp rotated")
      for k, v in ((0.1, 0.2), (0.07, 0.1), (0.12, 0.25), (0.05, 0.1), (0.1, 0.15), (0.15, 0.3), (0.07, 0.15),
                   (0.1, 0.25))],
    *[(f"kvcomp:rel_k={k},rel_v={v},rotation=none", "kvcomp not rotated")
      for k, v in ((0.1, 0.1), (0.07, 0.1), (0.05, 0.1))],
    ("kvcomp", "kvcomp new default"),
    (f"kvcomp:rel_k=0.1,rel_v=0.2,{ROT},repack=none", "lever"),
    (f"kvcomp:rel_k=0.1,rel_v=0.2,{ROT},pack_size=8", "lever"),
    (f"kvcomp:rel_k=0.1,rel_v=0.2,{ROT},granularity=token_head", "lever"),
    (f"kvcomp:rel_k=0.15,rel_v=0.15,{ROT}", "lever"),
    (f"kvcomp:rel_k=0.1,rel_v=0.2,{ROT}|edge=2*0.5", "lever"),
    (f"kvcomp:rel_k=0.07,rel_v=0.1,{ROT},repack=none", "lever"),
    (f"kvcomp:rel_k=0.07,rel_v=0.1,{ROT},granularity=token_head", "lever"),
    (f"kvcomp:rel_k=0.07,rel_v=0.1,{ROT}|edge=2*0.5", "lever"),
    ("hf-int2", "QuantizedCache"), ("hf-int4", "QuantizedCache"),  # last: quanto may build its extension first
]
PARTS = [("payload", ("payload",)), ("pack min+width", ("pack_meta",)), ("token min+step", ("token_min", "token_step")),
         ("offsets", ("seg_offset", "seg_bytes")), ("perm", ("perm",)), ("block table", ("block_table",)),
         ("tail", ("tail",))]


def split_edge(spec: str) -> tuple[str, tuple[int, float] | None]:
    """'kvcomp:...|edge=N*F' -> ('kvcomp:...', (N, F)); other specs -> (spec, None)."""
    if "|" not in spec:
        return spec, None
    base, _, opt = spec.partition("|")
    if not opt.startswith("edge=") or "*" not in opt:
        raise ValueError(f"spec option must be 'edge=N*F', got {opt!r} in {spec!r}")
    n, f = opt[len("edge="):].split("*")
    return base, (int(n), float(f))


def make_cache(spec: str, model):
    """common.make_cache (a DynamicCache for "full"), plus the edge-layer lever (first/last N layers at F x rel)."""
    base, edge = split_edge(spec)
    cache = common.make_cache(base, model)
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    if edge is not None:
        n, f = edge
        layers = cache.layers
        for layer in layers[:n] + layers[-n:]:
            layer.config = dataclasses.replace(layer.config, rel_k=layer.config.rel_k * f,
                                               rel_v=layer.config.rel_v * f)
    return cache


def _spec_file(out: Path, spec: str) -> Path:
    return out / f"spec_{hashlib.sha1(spec.encode()).hexdigest()[:12]}.json"


class _Spec:  # what evaluate_window needs of a spec: a name, and a cache from perplexity._new_cache
    def __init__(self, name):
        self.name = name


def run_worker(args: argparse.Namespace) -> None:
    model, tokenizer = common.load_model(args.model, args.gguf_file, args.device, args.dtype)
    text_name, text = common.load_text(args.text, min_words=args.tokens, order=common.PERPLEXITY_ORDER)
    windows = perplexity.token_windows(tokenizer, text, args.tokens, args.windows)
    out = Path(args.out)
    perplexity._new_cache = lambda spec, m, n_tokens: make_cache(spec.name, m)  # specs with the edge option too
    for spec in args.worker_specs.split(";"):
        t0 = time.time()
        try:
            per_window = [perplexity.evaluate_window(model, ids, [_Spec("full"), _Spec(spec)], args.chunk)
                          for ids in windows]
        except Exception as err:  # noqa: BLE001 - one failing baseline must not cost the others
            print(f"FAILED {spec}: {err!r}", flush=True)
            common.write_json(_spec_file(out, spec), {"cache": spec, "error": repr(err)})
            continue
        res = perplexity.summarise(per_window, ["full", spec])
        common.write_json(_spec_file(out, spec),
                          {"cache": spec, "result": res[spec], "full": res["full"], "seconds": time.time() - t0,
                           "text": text_name, "text_sha256": common.text_sha256(text)})
        print(f"done {spec}: {_num(res[spec]['bits_per_value'], '.3f')} bits/value, "
              f"dNLL {_num(res[spec]['delta_nll'], '+.4f')} ({time.time() - t0:.0f}s)", flush=True)


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def part_bits(report: dict[str, Any]) -> dict[str, float] | None:
    """Bits per K/V value of each part of a KVCompCache's memory_report (shared parts count once)."""
    if "parts" not in report.get("k", {}) or not report.get("bits_per_value"):
        return None
    n_values = 8 * report["compressed_bytes"] / report["bits_per_value"]
    groups = [report["k"]["parts"], report["v"]["parts"], report.get("shared_parts", {})]
    return {label: 8 * sum(g.get(key, 0) for g in groups for key in keys) / n_values for label, keys in PARTS}


def table(results: dict[str, Any], families: dict[str, str]) -> str:
    head = ["cache", "family", "bits/value", "ΔNLL", "KL", "top-1"] + [p for p, _ in PARTS]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    rows = sorted(results.items(), key=lambda kv: (families.get(kv[0], ""), kv[1]["bits_per_value"] or 99))
    for name, r in rows:
        if name == "full":
            continue
        parts = part_bits(r.get("cache_report", {})) or {}
        cells = [name.replace("|", "\\|"), families.get(name, ""), _num(r["bits_per_value"], ".3f"),
                 _num(r["delta_nll"], "+.4f"), _num(r["kl"], ".4f"), _num(100 * r["top1_agreement"], ".1f") + "%"]
        cells += [f"{parts[p]:.3f}" if p in parts else "" for p, _ in PARTS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(out: Path, families: dict[str, str], args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    failed = {}
    text = None
    for f in sorted(out.glob("spec_*.json")):
        d = json.loads(f.read_text())
        if "error" in d:
            failed[d["cache"]] = d["error"]
            continue
        results.setdefault("full", {k: v for k, v in d["full"].items()})
        results[d["cache"]] = d["result"]
        text = text or (d["text"], d["text_sha256"])
    names = ["full"] + [s for s in families if s in results]
    result = {"suite": "perplexity", "model": common.model_label(args.model, args.gguf_file),
              "text": text[0] if text else None, "text_sha256": text[1] if text else None, "tokens": args.tokens,
              "chunk": args.chunk, "windows": args.windows, "caches": names,
              "families": {n: families.get(n, "") for n in names}, "results": {n: results[n] for n in names},
              "failed": failed, "seconds": round(seconds, 1), "meta": common.run_metadata(args)}
    common.write_json(out / "perplexity.json", result)
    md = (f"# Frontier: {result['model']}, {result['text']}, {args.windows} x {args.tokens} tokens, chunk {args.chunk}, "
          f"{result['meta'].get('device')}, {time.strftime('%Y-%m-%d')}\n\n"
          f"bits/value all-in (payload, pack metadata, per-token min/step, offsets, permutations, block tables, "
          f"uncompressed tail); the part columns are bits/value of each part (kvcomp only).\n\n"
          f"{table(result['results'], families)}\n\n"
          + (f"Failed: {failed}\n\n" if failed else "")
          + f"Command: `{result['meta']['command']}`\n")
    (out / "frontier.md").write_text(md, encoding="utf-8")
    print(md)
    return result


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.caches:
        pairs = [(s, "") for s in args.caches.split(";") if s]
    else:
        pairs = DEFAULT_CACHES
    families = dict(pairs)
    for s in families:  # fail now on a bad spec, not inside a worker
        common.parse_cache_spec(split_edge(s)[0])
    todo = [s for s in families if not _spec_file(out, s).exists()]
    n = max(1, min(args.workers, len(todo)))
    shares = [todo[i::n] for i in range(n)]  # round-robin keeps each worker's first specs the important ones
    t0 = time.time()
    env = dict(os.environ)
    procs = []
    for i, share in enumerate(s for s in shares if s):
        cmd = [sys.executable, "-m", "eval.frontier", "--worker-specs", ";".join(share), "--out", str(out), "--tokens",
               str(args.tokens), "--windows", str(args.windows), "--chunk", str(args.chunk), "--text", args.text,
               "--model", args.model, "--device", args.device, "--dtype", args.dtype]
        if args.gguf_file:
            cmd += ["--gguf-file", args.gguf_file]
        log = open(out / f"worker{i}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    for p, log in procs:
        left = args.time_budget - (time.time() - t0)
        try:
            p.wait(timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
    merge(out, families, args, time.time() - t0)
    if not args.no_plot:
        from eval import plot_frontier

        plot_frontier.main([str(out / "perplexity.json"), "--ppl-metric", "delta_nll,kl", "--out",
                            str(out / "frontier.png"), "--title", f"{args.windows} x {args.tokens} tokens"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(caches=None)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--text", default="pydoc")
    p.add_argument("--workers", type=int, default=4, help="worker processes (each loads the model once)")
    p.add_argument("--time-budget", type=float, default=3600, help="seconds; workers still running are stopped")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--worker-specs", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is None:
        args.out = "eval/results/frontier"
    if args.worker_specs:
        run_worker(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
