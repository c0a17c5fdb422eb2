"""Kernel benchmark: fused compressed decode attention vs SDPA / cuBLAS over bf16, roofline, store speed.

python -m eval.bench_kernels --out eval/results/bench_kernels.json

Data: random bf16 K/V with a per-channel outlier structure (each channel has its own scale,
log-normal, and 4 channels of K and 1 of V are x20, like post-RoPE K of real models); q random.
Times are medians of triton.testing.do_bench (L2 flushed before each timed call): launched eagerly from Python,
so a short call can measure the host's launch time instead of the GPU's. The *_graph_ms columns replay each call
from a CUDA graph (as a compiled decode step runs it), L2 flushed before each replay, and time the GPU alone."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch

from kvcomp_hf import codec
from kvcomp_hf.block_store import BlockStore
from kvcomp_hf.config import KVCompConfig
from kvcomp_hf.kernels import decode_attention, store_blocks
from kvcomp_hf.kernels.decode_attention import _num_sms, choose_tuning

SHAPES = {"llama3.1-8b": dict(hq=32, h=8, d=128), "smollm2": dict(hq=9, h=3, d=64)}
DATA_NOTE = ("random normal K/V (bf16) times a per-channel log-normal scale (sigma 0.5); 4 K channels and 1 V "
             "channel x20 (outliers); q random normal; tail of 128..191 dense tokens")


def bench(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def capture_graph(fn, calls: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` calls of fn, warmed up first on a side stream (compiles, allocator)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def bench_graph(fn, reps: int = 50) -> float:
    """Median GPU ms of fn() replayed from a CUDA graph, L2 flushed (256 MB written) before each replay."""
    graph = capture_graph(fn)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for a, b in zip(starts, ends):
        flush.zero_()
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in zip(starts, ends))[reps // 2]


def copy_bandwidth(dev):
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    x.random_(0, 255)
    ms = bench(lambda: y.copy_(x))
    del x, y
    return 2 * (1 << 30) / (ms * 1e-3)  # bytes read + written per second


def make_kv(B, H, L, D, gen_dev, dtype=torch.bfloat16):
    scale_k = torch.exp(0.5 * torch.randn(H, 1, D, device=gen_dev))
    scale_v = torch.exp(0.5 * torch.randn(H, 1, D, device=gen_dev))
    scale_k[:, :, :4] *= 20
    scale_v[:, :, :1] *= 20
    k = (torch.randn(B, H, L, D, device=gen_dev) * scale_k).to(dtype)
    v = (torch.randn(B, H, L, D, device=gen_dev) * scale_v).to(dtype)
    return k, v


VARIANTS = {  # name -> DecodeTuning fields that differ from the default tuning
    "w4pf0": dict(num_warps=4, prefetch=False), "w8": dict(num_warps=8), "w8pf0": dict(num_warps=8, prefetch=False),
    "r168": dict(maxnreg=168), "r128": dict(maxnreg=128), "r255": dict(maxnreg=255),
    "waves3": dict(split_waves=3), "waves6": dict(split_waves=6), "waves8": dict(split_waves=8),
    "waves12": dict(split_waves=12), "waves24": dict(split_waves=24), "waves32": dict(split_waves=32),
    "min1": dict(min_blocks_per_split=1), "min2": dict(min_blocks_per_split=2),
    "min4": dict(min_blocks_per_split=4), "min16": dict(min_blocks_per_split=16),
    "tmmin2": dict(tokens_in_m=True, min_blocks_per_split=2), "tmmin4": dict(tokens_in_m=True, min_blocks_per_split=4),
    "tm": dict(tokens_in_m=True), "tm8": dict(tokens_in_m=True, num_warps=8), "tm2": dict(tokens_in_m=True, num_warps=2),
    "tmmin16": dict(tokens_in_m=True, min_blocks_per_split=16), "tmwaves4": dict(tokens_in_m=True, split_waves=4),
    "tmr128": dict(tokens_in_m=True, maxnreg=128), "tmr160": dict(tokens_in_m=True, maxnreg=160),
    "old": dict(tokens_in_m=False), "sv0": dict(split_v=False), "prmt": dict(prmt_unpack=True),
    "tail2": dict(tail_launch=True), "tail1": dict(tail_launch=False),
    "prmt0": dict(prmt_unpack=False),  # (the default unpacks fixed 4-bit fields with prmt since 2026-12-06)
}


def run_variants(names, fused, base, timer):
    out = {}
    for name in names:
        try:
            tuning = dataclasses.replace(base, **VARIANTS[name])
            fused(tuning)
            out[name] = timer(lambda: fused(tuning))
        except Exception as err:  # a variant that fails to compile is reported, not fatal
            out[name] = f"error: {str(err)[:200]}"
    return out


def run_one(shape_name, ctx, B, cfg, bw, dev, variants=(), skip_store=False, store_variants=()):
    s = SHAPES[shape_name]
    Hq, H, D = s["hq"], s["h"], s["d"]
    nb = (ctx - cfg.residual_length) // 64
    T = ctx - nb * 64
    row = dict(shape=shape_name, context=ctx, batch=B, q_heads=Hq, kv_heads=H, head_dim=D, dtype="bfloat16",
               compressed_blocks=nb, tail=T)
    k, v = make_kv(B, H, ctx, D, dev)
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
    S = B * nb
    st = BlockStore.from_config(cfg, H, D, torch.bfloat16, torch.device(dev), use_triton=True)
    st.reserve(S, st.max_bytes(S))
    kc, vc = k[:, :, : nb * 64], v[:, :, : nb * 64]

    def store(num_warps=None):
        st.pool_used.zero_()
        store_blocks(kc, vc, st, 0, num_warps=num_warps)

    store()
    used = st.used_bytes()
    store_in = 2 * kc.numel() * 2
    if not skip_store:
        t_store = bench(store)
        row["store_ms"] = t_store
        row["store_GBps_bf16_input"] = store_in / (t_store * 1e-3) / 1e9
        if torch.device(dev).type == "cuda":  # which of the store's three kernels the time goes to
            try:
                row["store_kernels_ms"] = device_ms_by_kernel(store)
                # the kernels' own time: at 8K x 1 the eager call is longer than its kernels (host time)
                row["store_GBps_bf16_input_gpu"] = store_in / (sum(row["store_kernels_ms"].values()) * 1e-3) / 1e9
            except RuntimeError as err:  # a profiler that cannot start costs this breakdown, not the row
                row["store_kernels_error"] = str(err)[:200]
        for sw in store_variants:  # (stats warps, pack warps)
            store(sw)
            t = bench(lambda sw=sw: store(sw))
            row.setdefault("store_variants_GBps", {})[f"{sw[0]}x{sw[1]}"] = store_in / (t * 1e-3) / 1e9
        store()

    meta = S * 2 * 64 * st.fmt.groups * (2 + 2) + S * 64 + S * 2 * H * 8 + B * nb * 4
    comp_values = S * H * 64 * D * 2
    row["bits_per_value"] = (used + meta) * 8 / comp_values
    row["bits_per_value_segments_only"] = used * 8 / comp_values
    block_table = torch.arange(S, dtype=torch.int32, device=dev).view(B, nb)
    k_tail, v_tail = k[:, :, nb * 64:], v[:, :, nb * 64:]
    scaling = 1 / math.sqrt(D)
    tuning = choose_tuning(D, B, H, nb)
    row["tuning"] = dataclasses.asdict(tuning)
    row["num_splits"] = tuning.splits(B, H, nb, _num_sms(torch.device(dev)))[0]

    def fused(tuning=None):
        return decode_attention(q, k_tail, v_tail, st, block_table, None, scaling, tuning=tuning)

    out = fused()
    # correctness spot check against SDPA over the dequantised cache (float32)
    if S * H * 64 * D <= (1 << 27):
        kh, vh = codec.decode_store(st, block_table)  # [B, nb, H, 64, D]
        kh = kh.transpose(1, 2).reshape(B, H, nb * 64, D)
        vh = vh.transpose(1, 2).reshape(B, H, nb * 64, D)
        kk = torch.cat([kh, k_tail.float()], 2)
        vv = torch.cat([vh, v_tail.float()], 2)
        del kh, vh
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kk, vv, scale=scaling,
                                                               enable_gqa=True)
        row["rel_err_vs_dequant_sdpa"] = ((out.float() - ref).norm() / ref.norm()).item()
        del kk, vv, ref
    graphs = torch.device(dev).type == "cuda"  # CUDA graph replays time the GPU alone (see the docstring)
    row["fused_ms"] = bench(fused)
    if graphs:
        row["fused_graph_ms"] = bench_graph(fused)
    if variants:
        row["variants_ms"] = run_variants(variants, fused, choose_tuning(D, B, H, nb),
                                          bench_graph if graphs else bench)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True)

    try:
        row["sdpa_bf16_ms"] = bench(sdpa)
        if graphs:
            row["sdpa_graph_ms"] = bench_graph(sdpa)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        row["sdpa_bf16_ms"] = None
        row["sdpa_error"] = str(err)[:200]
    # cuBLAS: q.K^T and p.V as batched GEMMs over (batch, kv head) with the GQA group as rows
    g = Hq // H
    qb = q.view(B, H, g, D).reshape(B * H, g, D)
    kb = k.reshape(B * H, ctx, D)
    vb = v.reshape(B * H, ctx, D)
    p = torch.softmax(torch.bmm(qb, kb.transpose(1, 2)).float(), -1).to(torch.bfloat16)
    row["bmm_qk_ms"] = bench(lambda: torch.bmm(qb, kb.transpose(1, 2)))
    row["bmm_pv_ms"] = bench(lambda: torch.bmm(p, vb))
    row["cublas_ms"] = row["bmm_qk_ms"] + row["bmm_pv_ms"]
    comp_read = used + meta + 2 * k_tail.numel() * 2 + q.numel() * 2 * 2
    dense_read = 2 * k.numel() * 2 + q.numel() * 2 * 2
    row["compressed_bytes_read"] = comp_read
    row["dense_bytes_read"] = dense_read
    row["roofline_ms"] = comp_read / bw * 1e3
    row["dense_roofline_ms"] = dense_read / bw * 1e3
    row["fused_over_roofline"] = row["fused_ms"] / row["roofline_ms"]
    if row.get("sdpa_bf16_ms"):
        row["speedup_vs_sdpa"] = row["sdpa_bf16_ms"] / row["fused_ms"]
        if graphs:
            row["speedup_vs_sdpa_graph"] = row["sdpa_graph_ms"] / row["fused_graph_ms"]
    row["speedup_vs_cublas"] = row["cublas_ms"] / row["fused_ms"]
    del k, v, p
    return row


def device_ms_by_kernel(fn, reps: int = 5) -> dict[str, float]:
    """GPU ms per fn() call of each kernel fn launches (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = {e.key: e.self_device_time_total / 1e3 / reps for e in prof.key_averages()
             if e.self_device_time_total > 0}
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def kernel_report(asm_dir=None):
    """Registers, spills and shared memory of every compiled kvcomp kernel (best effort across Triton versions);
    with asm_dir, the cubin of each decode kernel variant is written there (cuobjdump --dump-sass)."""
    da = sys.modules[decode_attention.__module__]
    sm = sys.modules[store_blocks.__module__]
    rep = []
    for kern in (da._decode_kernel, da._tokens_in_m_kernel, da._combine_kernel, sm._stats_kernel, sm._pack_kernel,
                 sm._head_stats_kernel, sm._pack64_kernel):
        try:
            for caches in kern.device_caches.values():
                for ck in caches[0].values():
                    rep.append(dict(kernel=kern.fn.__name__, regs=ck.n_regs, spills=ck.n_spills,
                                    smem=ck.metadata.shared, warps=ck.metadata.num_warps))
                    if asm_dir and kern is da._tokens_in_m_kernel and "cubin" in ck.asm:
                        name = f"{kern.fn.__name__}_w{ck.metadata.num_warps}_r{ck.n_regs}_{len(rep)}.cubin"
                        with open(os.path.join(asm_dir, name), "wb") as f:
                            f.write(ck.asm["cubin"])
        except Exception as err:
            rep.append(dict(kernel=getattr(kern, "__name__", "?"), error=str(err)[:100]))
    return rep


def _config_value(text: str):
    """'64' -> 64, '0.1' -> 0.1, anything else stays a string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="eval/results/bench_kernels.json")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--shapes", default="llama3.1-8b")
    ap.add_argument("--variants", default="",
                    help=f"comma list of decode variants to time too (CUDA graph replays): {list(VARIANTS)}")
    ap.add_argument("--variant-rows", default="", help="ctx:B,... rows that time the (decode and store) variants "
                                                       "(default all)")
    ap.add_argument("--skip-store", action="store_true")
    ap.add_argument("--asm-dir", default="", help="write the cubin of each compiled decode kernel here")
    ap.add_argument("--config", default="", help="KVCompConfig overrides, e.g. pack_size=16,repack=median")
    ap.add_argument("--store-warps", default="", help="store (stats x pack) warp variants to time too, e.g. 8x8,4x8")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return
    dev = "cuda"
    torch.manual_seed(0)
    overrides = dict(kv.split("=") for kv in args.config.split(",") if kv)
    cfg = KVCompConfig.from_dict({k: _config_value(v) for k, v in overrides.items()})
    bw = copy_bandwidth(dev)
    import triton
    info = dict(device=torch.cuda.get_device_name(), sms=_num_sms(torch.device(dev)), torch=torch.__version__,
                triton=triton.__version__, copy_bandwidth_GBps=bw / 1e9,
                config=dict(cfg.to_dict(), storage_layout=cfg.storage_layout), data=DATA_NOTE,
                timing="triton.testing.do_bench median, L2 flushed between calls; ms. *_graph_ms: median of CUDA "
                       "graph replays, L2 flushed before each",
                date=time.strftime("%Y-%m-%d"))
    print(json.dumps(info))
    rows = []
    for shape in args.shapes.split(","):
        for ctx in map(int, args.contexts.split(",")):
            for B in map(int, args.batches.split(",")):
                t0 = time.time()
                try:
                    vr = [tuple(map(int, x.split(":"))) for x in args.variant_rows.split(",") if x]
                    timed = not vr or (ctx, B) in vr
                    var = [v for v in args.variants.split(",") if v] if timed else []
                    sv = [tuple(map(int, x.split("x"))) for x in args.store_warps.split(",") if x] if timed else []
                    row = run_one(shape, ctx, B, cfg, bw, dev, var, args.skip_store, sv)
                except Exception as err:  # out of memory, or a failed compile: keep the other rows
                    row = dict(shape=shape, context=ctx, batch=B, skipped=f"{type(err).__name__}: {str(err)[:300]}")
                torch.cuda.empty_cache()
                row["wall_s"] = time.time() - t0
                rows.append(row)
                print(json.dumps(row), flush=True)
    kr = kernel_report(args.asm_dir or None)
    for k in kr:
        print(json.dumps(k))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(info=info, rows=rows, kernels=kr), f, indent=1)
    hdr = (f"{'shape':12} {'ctx':>7} {'B':>2} {'bits':>5} {'fused':>8} {'sdpa':>8} {'cublas':>8} {'roof':>8} "
           f"{'f/roof':>6} {'xSDPA':>6} {'graph f':>8} {'graph s':>8} {'xSDPAg':>6} {'store GB/s':>10} {'err':>8}")
    print(hdr)
    for r in rows:
        if "skipped" in r:
            print(f"{r['shape']:12} {r['context']:>7} {r['batch']:>2} skipped")
            continue
        sd = r.get("sdpa_bf16_ms") or float("nan")
        print(f"{r['shape']:12} {r['context']:>7} {r['batch']:>2} {r['bits_per_value']:5.2f} {r['fused_ms']:8.4f} "
              f"{sd:8.4f} {r['cublas_ms']:8.4f} {r['roofline_ms']:8.4f} {r['fused_over_roofline']:6.2f} "
              f"{sd / r['fused_ms']:6.2f} {r.get('fused_graph_ms', float('nan')):8.4f} "
              f"{r.get('sdpa_graph_ms') or float('nan'):8.4f} "
              f"{r.get('speedup_vs_sdpa_graph', float('nan')):6.2f} "
              f"{r.get('store_GBps_bf16_input', float('nan')):10.1f} "
              f"{r.get('rel_err_vs_dequant_sdpa', float('nan')):8.1e}")
        if r.get("store_kernels_ms"):
            print(f"   store: {r['store_GBps_bf16_input_gpu']:.1f} GB/s of kernel time; ms by kernel:",
                  " ".join(f"{k[:24]}={v:.4f}" for k, v in r["store_kernels_ms"].items()))
        if r.get("store_variants_GBps"):
            print("   store GB/s:", " ".join(f"{k}={v:.1f}" for k, v in r["store_variants_GBps"].items()))
        if r.get("variants_ms"):
            print("   variants:", " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in r["variants_ms"].items()))


if __name__ == "__main__":
    main()
