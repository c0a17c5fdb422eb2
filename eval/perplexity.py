"""Perplexity through the cache: teacher-forced over long real text, every position reading the compressed past.

The text is fed in chunks of --chunk tokens onto a growing cache of each kind (all caches in lockstep, so the
full cache's next-token distribution is at hand for every position). Each position attends to the cache exactly as
it was at the start of its chunk plus the chunk's own tokens in full precision; with --chunk 1 that is token-by-token
decoding. For kvcomp (and KIVI values) the most recent >= 128 tokens stay uncompressed anyway, so a chunk of at most
128 tokens sees what decoding would see up to where a block boundary falls inside the chunk.

Reported per cache: perplexity, mean NLL (nats), NLL increase vs the full cache, mean KL(full || cache) of the
next-token distributions, top-1 agreement with the full cache, bits/value of the cache at the end, and the same
per quarter of the positions (later positions read more compressed context).

    python -m eval.perplexity --caches full,kvcomp,kivi2,kivi4 --tokens 1500 --chunk 64 --out eval/results/ppl
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from eval import common
from kvcomp_hf.compat import cache_kwargs


def token_windows(tokenizer, text: str, n_tokens: int, n_windows: int = 1) -> list[list[int]]:
    """n_windows windows of n_tokens tokens of contiguous text, evenly spaced through the text."""
    words = text.split(" ")
    # tokenise generously sized word spans, then cut to n_tokens
    span = max(int(n_tokens * 1.3) + 64, 256)
    stride = max((len(words) - span) // max(n_windows, 1), 0)
    windows = []
    for w in range(n_windows):
        start = w * stride
        ids: list[int] = []
        grow = span
        while True:
            piece = " ".join(words[start:start + grow])
            ids = tokenizer(piece, add_special_tokens=True)["input_ids"]
            if len(ids) >= n_tokens or start + grow >= len(words):
                break
            grow *= 2
        if len(ids) < n_tokens:
            raise ValueError(f"text has only {len(ids)} tokens from word {start}; asked for {n_tokens}")
        windows.append(ids[:n_tokens])
    return windows


def _new_cache(spec: common.CacheSpec, model, n_tokens: int):
    cache = common.make_cache(spec, model, max_cache_len=n_tokens)
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    return cache


def _sdpa_backends(spec):
    """full:flash's SDPA backends; nothing for a spec that is only a name (eval.frontier's edge-lever specs)."""
    return common.sdpa_backends(spec) if isinstance(spec, common.CacheSpec) else contextlib.nullcontext()


@torch.no_grad()
def evaluate_window(model, ids: list[int], specs: list[common.CacheSpec], chunk: int,
                    reference: str = "full", progress_desc: str | None = None) -> dict[str, Any]:
    """Teacher-force `ids` through one cache per spec in lockstep; per-position NLL, KL vs the reference, top-1."""
    device = model.device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    n = x.shape[1]
    caches = {sp.name: _new_cache(sp, model, n) for sp in specs}
    specs_by_name = {sp.name: sp for sp in specs}
    ref = reference if reference in caches else None
    nll = {k: torch.zeros(n - 1, dtype=torch.float64) for k in caches}
    kl = {k: torch.zeros(n - 1, dtype=torch.float64) for k in caches}
    top1 = {k: torch.zeros(n - 1, dtype=torch.bool) for k in caches}
    steps = range(0, n - 1, chunk)
    bar = common.progress(steps, desc=progress_desc or "perplexity", leave=False)
    for s in bar:
        e = min(s + chunk, n - 1)  # positions s..e-1 predict tokens s+1..e
        inp = x[:, s:e]
        target = x[0, s + 1:e + 1].cpu()
        logps = {}
        for name, cache in caches.items():
            with _sdpa_backends(specs_by_name[name]):
                out = model(input_ids=inp, **cache_kwargs(cache), use_cache=True)
            logps[name] = torch.log_softmax(out.logits[0].float(), dim=-1).cpu()
            del out
        ref_lp = logps[ref] if ref else None
        ref_top = ref_lp.argmax(-1) if ref else None
        for name, lp in logps.items():
            nll[name][s:e] = -lp.gather(-1, target[:, None])[:, 0].double()
            if ref is not None:
                # KL(ref || this) = sum p_ref (log p_ref - log p_this)
                kl[name][s:e] = (ref_lp.exp() * (ref_lp - lp)).sum(-1).double()
                top1[name][s:e] = lp.argmax(-1) == ref_top
    reports = {name: common.cache_report(c, n, model) for name, c in caches.items()}
    return {"n_tokens": n, "nll": nll, "kl": kl if ref else None, "top1": top1 if ref else None, "reports": reports}


def summarise(per_window: list[dict[str, Any]], names: list[str], reference: str = "full",
              buckets: int = 4) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        nll = torch.cat([w["nll"][name] for w in per_window])
        has_ref = per_window[0]["kl"] is not None
        res: dict[str, Any] = {"nll": nll.mean().item(), "perplexity": math.exp(nll.mean().item()),
                               "positions": int(nll.numel())}
        if has_ref:
            kl = torch.cat([w["kl"][name] for w in per_window])
            t1 = torch.cat([w["top1"][name] for w in per_window]).double()
            ref_nll = torch.cat([w["nll"][reference] for w in per_window])
            res.update({"delta_nll": (nll.mean() - ref_nll.mean()).item(), "kl": kl.mean().item(),
                        "top1_agreement": t1.mean().item()})
        # per position bucket (positions within each window)
        n = per_window[0]["nll"][name].numel()
        edges = [round(i * n / buckets) for i in range(buckets + 1)]
        res["by_position"] = []
        for b in range(buckets):
            lo, hi = edges[b], edges[b + 1]
            seg = torch.cat([w["nll"][name][lo:hi] for w in per_window])
            row = {"from": lo + 1, "to": hi, "nll": seg.mean().item()}
            if has_ref:
                row["kl"] = torch.cat([w["kl"][name][lo:hi] for w in per_window]).mean().item()
                row["top1_agreement"] = torch.cat([w["top1"][name][lo:hi] for w in per_window]).double().mean().item()
                row["delta_nll"] = row["nll"] - torch.cat([w["nll"][reference][lo:hi] for w in per_window]).mean().item()
            res["by_position"].append(row)
        bpv = [w["reports"][name].get("bits_per_value") for w in per_window]
        bpv = [b for b in bpv if b is not None]
        res["bits_per_value"] = sum(bpv) / len(bpv) if bpv else None
        res["cache_report"] = per_window[-1]["reports"][name]
        out[name] = res
    return out


def markdown(results: dict[str, Any], names: list[str], kv_dtype: str | None = None) -> str:
    lines = [f"| cache | {common.bits_header(kv_dtype)} | perplexity | NLL | ΔNLL vs full | KL(full‖cache) | "
             "top-1 agree |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        r = results[name]
        b = r.get("bits_per_value")
        lines.append(f"| {name} | {b:.3f} | {r['perplexity']:.4f} | {r['nll']:.5f} | "
                     f"{r.get('delta_nll', float('nan')):+.5f} | {r.get('kl', float('nan')):.5f} | "
                     f"{100 * r.get('top1_agreement', float('nan')):.2f}% |" if b is not None else
                     f"| {name} | - | {r['perplexity']:.4f} | {r['nll']:.5f} | {r.get('delta_nll', float('nan')):+.5f}"
                     f" | {r.get('kl', float('nan')):.5f} | {100 * r.get('top1_agreement', float('nan')):.2f}% |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.set_seed(args.seed)
    specs = common.parse_cache_list(args.caches)
    names = [sp.name for sp in specs]
    if "full" not in names:  # KL and top-1 need the full cache as reference
        specs.insert(0, common.parse_cache_spec("full"))
        names.insert(0, "full")
    out = Path(args.out or "eval/results/perplexity")
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = common.load_model(args.model, args.gguf_file, args.device, args.dtype)
    text_name, text = common.load_text(args.text, min_words=args.tokens, order=common.PERPLEXITY_ORDER)
    windows = token_windows(tokenizer, text, args.tokens, args.windows)
    if args.limit:
        windows = windows[: args.limit]
    per_window = []
    t0 = time.time()
    for i, ids in enumerate(common.progress(windows, desc="windows")):
        per_window.append(evaluate_window(model, ids, specs, args.chunk, progress_desc=f"window {i}"))
    results = summarise(per_window, names)
    result = {
        "suite": "perplexity", "model": common.model_label(args.model, args.gguf_file),
        "text": text_name, "text_sha256": common.text_sha256(text), "tokens": args.tokens, "chunk": args.chunk,
        "windows": len(windows), "caches": names, "results": results, "kv_dtype": common.kv_dtype(model),
        "seconds": round(time.time() - t0, 1), "meta": common.run_metadata(args),
    }
    common.write_json(out / "perplexity.json", result)
    table = markdown(results, names, result["kv_dtype"])
    (out / "perplexity.md").write_text(
        f"# Perplexity through the cache: {result['model']}, {text_name}, {len(windows)} x {args.tokens} tokens, "
        f"chunk {args.chunk}\n\n{table}\n\nCommand: `{result['meta']['command']}`\n", encoding="utf-8")
    print(table)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(caches="full,kvcomp,kivi2,kivi4")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per window")
    p.add_argument("--chunk", type=int, default=64, help="tokens per forward onto the cache (1 = exact decoding)")
    p.add_argument("--windows", type=int, default=1, help="windows evenly spaced through the text")
    p.add_argument("--text", default="auto",
                   help="auto (austen, handbook, cfi, pydoc: first available) | one of those | a text file path")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
