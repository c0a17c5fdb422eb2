"""Where a decode step's time goes: host (Python, launches) versus GPU kernels, per cache.

    python -m eval.profile_decode --model smollm2-135m --context 8192 --batch 1 --out $OUT/profile.json

For each cache spec (default full, full:flash, kvcomp; see eval/common/specs.py): prefill once, then time
decode steps three ways:
  - generate(): per-token host stamps (common.timed_generate, as eval.bench_generate);
  - forward loop: model(token) + argmax, synchronised per step;
  - GPU busy time per step from torch.profiler (sum of kernel times), so wall - busy = host-bound time.
Prints a table and the top kernels / host ops of each cache. Random weights (speed does not depend on
trained weights).

With --prefill: where the prefill's time goes instead (one forward over the whole context, as generate() runs
it without --prefill-chunk): wall time and GPU time by kernel, so a cache's TTFT overhead over DynamicCache is
read kernel by kernel.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from eval import common
from eval.common import LLAMA31_8B, SMOLLM2_135M, llama_config, random_llama
from kvcomp_hf.compat import cache_kwargs

ARCHS = {"llama3.1-8b": LLAMA31_8B, "smollm2-135m": SMOLLM2_135M}


def _new_cache(cache: str, model, max_cache_len: int):
    """generate_kwargs switches attention; a fresh cache object for the forward loop."""
    from transformers import DynamicCache

    kwargs = common.generate_kwargs(cache, model)
    cache_obj = common.make_cache(cache, model, max_cache_len=max_cache_len)
    return kwargs, cache_obj if cache_obj is not None else DynamicCache(config=model.config)


def _prefill(model, cache_obj, ids, chunk: int):
    out = None
    for s in range(0, ids.shape[1], chunk):
        out = model(ids[:, s:s + chunk], **cache_kwargs(cache_obj), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def profile_cache(model, cache: str, context: int, batch: int, steps: int, chunk: int, generate: bool = True) -> dict:
    with common.sdpa_backends(cache):
        return _profile_cache(model, cache, context, batch, steps, chunk, generate)


WARM_STEPS = 3  # a compiled forward compiles on the first call and records its CUDA graph on a later one


def _profile_cache(model, cache: str, context: int, batch: int, steps: int, chunk: int, generate: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cfg = model.config
    gen = torch.Generator(device="cpu").manual_seed(context + batch)
    ids = torch.randint(3, cfg.vocab_size - 1, (batch, context), generator=gen).to(model.device)
    row = {"cache": cache, "context": context, "batch": batch}

    n_prof = 4
    max_len = context + WARM_STEPS + steps + n_prof + 1
    if generate:  # generate(), as the benchmark times it
        kwargs, _ = _new_cache(cache, model, max_len)
        _, timing = common.timed_generate(model, ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                                          do_sample=False, eos_token_id=None, pad_token_id=0,
                                          prefill_chunk_size=chunk, **kwargs)
        row["generate_ms_per_step"] = timing["decode_ms_per_step_median"]

    # plain forward loop over the same cache type; ":compiled" specs decode through
    # torch.compile(mode="reduce-overhead") (CUDA graphs), positions passed as tensors as generate() does
    kwargs, cache_obj = _new_cache(cache, model, max_len)
    compiled = common.parse_cache_spec(cache).variant == "compiled"
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) if compiled else model.forward
    with torch.inference_mode():
        tok = _prefill(model, cache_obj, ids, chunk)
        pos = torch.full((batch, 1), context, device=model.device, dtype=torch.long)

        def step(tok, pos):
            out = forward(tok, **cache_kwargs(cache_obj), use_cache=True, position_ids=pos, cache_position=pos[0])
            return out.logits[:, -1:].argmax(-1), pos + 1

        for _ in range(WARM_STEPS):
            tok, pos = step(tok, pos)
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tok, pos = step(tok, pos)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        times.sort()
        row["forward_ms_per_step"] = round(1e3 * times[len(times) // 2], 3)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(n_prof):
                tok, pos = step(tok, pos)
            torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    row["gpu_busy_ms_per_step"] = round(gpu_us / 1e3 / n_prof, 3)
    row["host_bound_ms_per_step"] = round(row["forward_ms_per_step"] - row["gpu_busy_ms_per_step"], 3)
    row["top_kernels"] = [{"name": k["name"], "ms_per_step": k["ms_per_call"], "calls_per_step": k["launches_per_call"]}
                          for k in _top_kernels(events, n_prof, 8)]
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)
    row["top_host_ops"] = [{"name": e.key[:80], "ms_per_step": round(e.self_cpu_time_total / 1e3 / n_prof, 3),
                            "calls_per_step": e.count / n_prof} for e in host[:8]]
    del cache_obj
    torch.cuda.empty_cache()
    return row


def _top_kernels(events, n_calls: int, top: int) -> list[dict]:
    kernels = sorted((e for e in events if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    return [{"name": e.key[:80], "ms_per_call": round(e.self_device_time_total / 1e3 / n_calls, 3),
             "launches_per_call": e.count / n_calls} for e in kernels[:top]]


def profile_prefill(model, cache: str, context: int, batch: int, repeats: int = 2) -> dict:
    """Wall ms of one prefill forward (median of `repeats`, each on a fresh cache) and its GPU time by kernel."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device="cpu").manual_seed(context + batch)
    ids = torch.randint(3, model.config.vocab_size - 1, (batch, context), generator=gen).to(model.device)
    walls = []
    with common.sdpa_backends(cache), torch.inference_mode():
        for _ in range(repeats):
            _, cache_obj = _new_cache(cache, model, context + 1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _prefill(model, cache_obj, ids, context)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
            del cache_obj
        _, cache_obj = _new_cache(cache, model, context + 1)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _prefill(model, cache_obj, ids, context)
            torch.cuda.synchronize()
        del cache_obj
    torch.cuda.empty_cache()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    walls.sort()
    return {"cache": cache, "context": context, "batch": batch, "prefill_ms": round(1e3 * walls[len(walls) // 2], 2),
            "gpu_busy_ms": round(gpu_us / 1e3, 2), "top_kernels": _top_kernels(events, 1, 14)}


def _print_prefill(rows: list[dict]) -> None:
    print("| cache | context | batch | prefill ms | GPU busy ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cache']} | {r['context']} | {r['batch']} | {r['prefill_ms']} | {r['gpu_busy_ms']} |")
    for r in rows:
        print(f"\n{r['cache']} {r['context']}x{r['batch']}: top GPU kernels of the prefill")
        for k in r["top_kernels"]:
            print(f"  {k['ms_per_call']:9.3f} ms  x{k['launches_per_call']:<6g} {k['name']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", choices=sorted(ARCHS))
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=16, help="timed decode steps")
    p.add_argument("--caches", default="full,full:flash,kvcomp",
                   help="comma list of cache specs: " + " | ".join(common.ALLOWED_SPEC_FORMS))
    p.add_argument("--prefill-chunk", type=int, default=4096)
    p.add_argument("--skip-generate", action="store_true",
                   help="time the forward loop only (a :compiled spec's generate() compiles once more)")
    p.add_argument("--prefill", action="store_true",
                   help="profile the prefill (one unchunked forward over --context tokens) instead of decode steps")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("eval.profile_decode needs a CUDA GPU")
    caches = [spec.name for spec in common.parse_cache_list(args.caches)]
    common.import_kvcomp()
    device = torch.device("cuda")
    model = random_llama(llama_config(ARCHS[args.model], args.context + 1024), device, torch.bfloat16)
    model.generation_config.eos_token_id = None
    rows = []
    if args.prefill:
        for cache in caches:
            profile_prefill(model, cache, 640, args.batch, repeats=1)  # warm-up: compiles the kernels
            rows.append(profile_prefill(model, cache, args.context, args.batch))
        _print_prefill(rows)
        if args.out:
            Path(args.out).write_text(json.dumps({"model": args.model, "gpu": torch.cuda.get_device_name(),
                                                  "torch": torch.__version__, "prefill_rows": rows}, indent=1))
        return
    for cache in caches:
        gen = not args.skip_generate
        if gen or common.parse_cache_spec(cache).variant != "compiled":  # (the compiled loop warms up itself)
            profile_cache(model, cache, 320, args.batch, 4, args.prefill_chunk, gen)  # warm-up / compile
        row = profile_cache(model, cache, args.context, args.batch, args.steps, args.prefill_chunk, gen)
        rows.append(row)
    print(f"\n{args.model}, context {args.context}, batch {args.batch}, {torch.cuda.get_device_name()}")
    print("| cache | generate ms/step | forward ms/step | GPU busy ms/step | host-bound ms/step |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cache']} | {r.get('generate_ms_per_step', '-')} | {r['forward_ms_per_step']} | "
              f"{r['gpu_busy_ms_per_step']} | {r['host_bound_ms_per_step']} |")
    for r in rows:
        print(f"\n{r['cache']}: top GPU kernels per step")
        for k in r["top_kernels"]:
            print(f"  {k['ms_per_step']:8.3f} ms  x{k['calls_per_step']:<6g} {k['name']}")
        print(f"{r['cache']}: top host ops per step (self CPU)")
        for k in r["top_host_ops"]:
            print(f"  {k['ms_per_step']:8.3f} ms  x{k['calls_per_step']:<6g} {k['name']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "gpu": torch.cuda.get_device_name(),
                                              "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
