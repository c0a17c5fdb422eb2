"""Multi-GPU generate(): kvcomp vs DynamicCache with device_map="auto" (pipeline of layers over the visible
GPUs) and with tp_plan="auto" (tensor parallel, under torchrun).

    # layers split over all visible GPUs (one process)
    python eval/bench_multigpu.py --out eval/results/bench_multigpu.json
    # tensor parallel, one process per GPU
    torchrun --nproc-per-node 2 eval/bench_multigpu.py --tp --out eval/results/bench_multigpu_tp.json
    # CPU checks of both code paths (tiny shapes; gloo for --tp)
    python eval/bench_multigpu.py --quick
    torchrun --nproc-per-node 2 eval/bench_multigpu.py --quick --tp

Model: the Llama-3.1-70B shape (hidden 8192, 64 heads, 8 KV heads, intermediate 28672, vocab 128256, bf16)
with random weights (normal, std 0.02, each parameter from its own seeded generator); --layers sets the depth
(default: as many as fit in 55% of the GPUs' memory, at most 80). Workload: 32K context, batch 4, --new-tokens
decode steps. Reported per run: TTFT, decode tokens/s, peak memory per GPU, cache bytes per GPU, and
greedy_equal: the same model (same seed, so the same weights) on one GPU gives the same greedy tokens with
the same cache (--eq-context x --eq-batch prompt). --capacity adds the full 80-layer model: built and run at a
short context, then the largest cache that fits is computed from measured numbers (see capacity_80_layers).

Device handling is kvcomp_hf's own (the Triton launches make the layer's device current), nothing here.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends are set before torch is imported).

Under tensor parallelism each rank holds num_key_value_heads / world KV heads and its own KVCompCache, so
granularity "token" shares one (min, step) per token across the rank's heads only. TP loads a checkpoint
(transformers shards while loading): rank 0 draws random weights on its GPU and saves them to
--checkpoint-dir first (reused when present). The TP greedy check runs a small float32 model (see tp_equality).
"""

from __future__ import annotations

import os

for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_key] = _value  # before torch: multicast can take the host's GPUs out of service

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_generate beside this file
import bench_generate as bg  # noqa: E402

GIB = 2 ** 30
LLAMA31_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                   num_attention_heads=64, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                   rope_theta=500000.0, tie_word_embeddings=False)
SMALL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False)


def log(msg):
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(msg, flush=True)


def layer_bytes(arch: dict, dtype_bytes: int = 2) -> int:
    h, kv = arch["hidden_size"], arch["num_key_value_heads"] * arch["head_dim"]
    q = arch["num_attention_heads"] * arch["head_dim"]
    return dtype_bytes * (2 * h * q + 2 * h * kv + 3 * h * arch["intermediate_size"] + 2 * h)


def auto_layers(arch: dict, total_bytes: float, fraction: float = 0.55) -> int:
    embed = 2 * 2 * arch["vocab_size"] * arch["hidden_size"]
    return max(1, min(arch["num_hidden_layers"], int((fraction * total_bytes - embed) // layer_bytes(arch))))


# --------------------------------------------------------------------------------------------- models


def random_model(config, device_map: dict, dtype, std: float = 0.02, seed: int = 0, draw_on_cpu: bool = False):
    """A Llama with random weights placed by `device_map` (module prefix -> device), dispatched with accelerate
    hooks when it spans several devices. Every parameter is drawn from its own generator, seeded by
    (seed, parameter index), on its own device (or on the CPU with draw_on_cpu): the values then do not depend
    on where the other parameters went, so a single-device model and a device_map model built from one seed
    are the same model (GPUs of one kind draw the same numbers). Norm weights are ones."""
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlamaForCausalLM

    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config)
    for index, (name, param) in enumerate(list(model.named_parameters())):
        dev = _device_for(name, device_map)
        draw = torch.device("cpu") if draw_on_cpu else dev
        value = torch.empty(param.shape, dtype=dtype, device=draw)
        if param.dim() == 1:
            value.fill_(1.0)
        else:
            value.normal_(0.0, std, generator=torch.Generator(device=draw).manual_seed(seed * 1_000_003 + index))
        set_module_tensor_to_device(model, name, dev, value=value.to(dev), dtype=dtype)
        del value
    placed = {str(_as_device(d)) for d in device_map.values()}
    if len(placed) > 1:
        model = dispatch_model(model, device_map=device_map)
    else:
        model.to(_as_device(next(iter(device_map.values()))))  # buffers (rotary inv_freq) too
    model.generation_config.eos_token_id = None
    return model.eval()


def auto_device_map(config, devices: list, dtype, headroom: float = 0.45) -> dict:
    """accelerate's balanced map of whole decoder layers over `devices`, leaving `headroom` of each GPU for the
    cache and activations; refuses to spill onto the CPU or disk."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import LlamaForCausalLM

    if devices == ["cpu"]:
        return {"": "cpu"}
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config)
    max_memory = {d: int(torch.cuda.get_device_properties(d).total_memory * (1 - headroom)) for d in devices}
    max_memory = get_balanced_memory(model, max_memory=max_memory, dtype=dtype,
                                     no_split_module_classes=["LlamaDecoderLayer"])
    device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=dtype,
                                       no_split_module_classes=["LlamaDecoderLayer"])
    bad = [k for k, v in device_map.items() if v in ("cpu", "disk")]
    if bad:
        raise SystemExit(f"the model does not fit the GPUs with {headroom:.0%} headroom: {bad[:4]} -> cpu/disk; "
                         "lower --layers")
    return device_map


def spread_device_map(num_layers: int, devices: list) -> dict:
    """Decoder layers in equal runs over `devices` (for models small enough that "auto" keeps them on one)."""
    device_map = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0],
                  "model.norm": devices[-1], "lm_head": devices[-1]}
    for i in range(num_layers):
        device_map[f"model.layers.{i}"] = devices[i * len(devices) // num_layers]
    return device_map


def _as_device(dev) -> torch.device:
    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)


def _device_for(name: str, device_map: dict) -> torch.device:
    best = None
    for prefix, dev in device_map.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, dev)
    return _as_device(best[1])


# --------------------------------------------------------------------------------------------- runs


def timed_generate(model, ids, cache: str, new_tokens: int, devices: list, kvcomp_config=None):
    """generate() with timing; cache 'dynamic' (SDPA) or 'kvcomp' (default config unless given; Triton kernels on
    CUDA). Returns (row, generated tokens on the CPU, the cache)."""
    import kvcomp_hf
    from kvcomp_hf.compat import CACHE_KWARG, returned_cache
    from transformers import GenerationConfig

    kwargs = {}
    if cache == "kvcomp":
        model.set_attn_implementation("kvcomp")
        kwargs[CACHE_KWARG] = kvcomp_hf.KVCompCache(model.config, kvcomp_config or kvcomp_hf.KVCompConfig())
    else:
        model.set_attn_implementation("sdpa")
    gcfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                            pad_token_id=0, use_cache=True, return_dict_in_generate=True)
    cuda_devs = [d for d in devices if str(d) != "cpu"]
    for d in cuda_devs:
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
    timer = bg.StepTimer()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gcfg, streamer=timer,
                             **kwargs)
    for d in cuda_devs:
        torch.cuda.synchronize(d)
    t1 = time.perf_counter()
    st = timer.stamps
    steps = len(st) - 2
    decode = st[-1] - st[1] if steps > 0 else None
    batch, context = ids.shape
    row = {"cache": cache, "context": context, "batch": batch, "new_tokens": new_tokens,
           "ttft_s": round(st[1] - t0, 4), "total_s": round(t1 - t0, 3),
           "decode_tok_s": round(batch * steps / decode, 2) if decode else None,
           "decode_ms_per_step": round(1e3 * decode / steps, 3) if decode else None,
           "peak_mem_gib_per_gpu": {str(_as_device(d)): round(torch.cuda.max_memory_allocated(d) / GIB, 3)
                                    for d in cuda_devs},
           # weights + the finished cache as the allocator holds it (pool headroom included)
           "allocated_gib_per_gpu_after": {str(_as_device(d)): round(torch.cuda.memory_allocated(d) / GIB, 3)
                                           for d in cuda_devs}}
    pkv = returned_cache(out)
    row.update(cache_numbers(pkv))
    seqs = out.sequences[:, context:].cpu()
    del out, kwargs
    return row, seqs, pkv


def cache_numbers(pkv) -> dict:
    """Bytes the cache holds per device (kvcomp: every part, see KVCompCache.memory_report) and where its
    storage lives."""
    per_dev: dict[str, int] = {}
    for layer in pkv.layers:
        dev = str(layer.keys.device)
        if hasattr(layer, "memory_report"):
            nbytes = sum(sum(p.values()) for p in layer.memory_report()["parts"].values())
        else:
            nbytes = layer.keys.numel() * layer.keys.element_size() * 2
        per_dev[dev] = per_dev.get(dev, 0) + nbytes
    out = {"cache_bytes_per_device": per_dev, "cache_devices": sorted(per_dev), "cache_tokens": pkv.get_seq_length()}
    if hasattr(pkv, "memory_report"):
        rep = pkv.memory_report()
        out.update(cache_bytes=int(rep["compressed_bytes"]), bits_per_value=round(rep["bits_per_value"], 3),
                   storage_on_layer_device=all(layer.store.pool.device == layer.keys.device == layer.block_table.device
                                               for layer in pkv.layers))
    else:
        out.update(cache_bytes=sum(per_dev.values()), bits_per_value=8.0 * pkv.layers[0].keys.element_size())
    return out


def free_cuda(devices):
    gc.collect()
    for d in devices:
        if str(d) != "cpu":
            with torch.cuda.device(d):
                torch.cuda.empty_cache()


def first_mismatch(a: torch.Tensor, b: torch.Tensor):
    diff = (a != b).nonzero()
    return None if diff.numel() == 0 else [int(x) for x in diff[0]]


def equality_ids(config, args):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, config.vocab_size, (args.eq_batch, args.eq_context), generator=gen)


def single_device_reference(config, device, dtype, args, draw_on_cpu: bool) -> dict:
    """Greedy tokens per cache of the benchmark model (same seed, so the same weights) on one device."""
    single = random_model(config, {"": device}, dtype, draw_on_cpu=draw_on_cpu)
    ids = equality_ids(config, args).to(single.device)
    ref = {c: timed_generate(single, ids, c, args.eq_tokens, [device])[1] for c in args.caches}
    del single
    free_cuda([device])
    return ref


def compare_to_reference(model, config, devices, args, ref: dict) -> dict:
    ids = equality_ids(config, args).to(model.device)
    out = {}
    for cache in args.caches:
        row, seqs, pkv = timed_generate(model, ids, cache, args.eq_tokens, devices)
        mism = first_mismatch(seqs, ref[cache])
        out[cache] = {"greedy_equal": mism is None, "first_mismatch": mism, "cache_devices": row["cache_devices"],
                      "storage_on_layer_device": row.get("storage_on_layer_device")}
        del pkv
    free_cuda(devices)
    return out


# --------------------------------------------------------------------------------------------- device_map


def run_device_map(args, devices: list, dtype) -> dict:
    n_gpu = len([d for d in devices if d != "cpu"])
    if args.quick:
        arch, layers = dict(bg.TINY_LLAMA), args.layers or 2
    else:
        total = sum(torch.cuda.get_device_properties(i).total_memory for i in devices)
        arch, layers = dict(LLAMA31_70B), args.layers or auto_layers(LLAMA31_70B, total)
    config = bg.llama_config(arch, args.context + args.new_tokens + 256, num_hidden_layers=layers)
    draw_on_cpu = args.quick
    result = {"mode": "device_map=auto", "devices": [str(d) for d in devices], "layers": layers,
              "meta": run_meta(n_gpu)}
    ref = None
    if not args.skip_equality:
        weights = model_bytes(arch, layers)
        if n_gpu and weights > 0.8 * torch.cuda.get_device_properties(devices[0]).total_memory:
            log(f"equality check skipped: {weights / GIB:.0f} GiB of weights do not fit one GPU")
        else:
            t = time.perf_counter()
            ref = single_device_reference(config, devices[0], dtype, args, draw_on_cpu)
            log(f"single-device reference ({layers} layers on {devices[0]}) in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    device_map = auto_device_map(config, devices, dtype) if n_gpu else {"": "cpu"}
    model = random_model(config, device_map, dtype, draw_on_cpu=draw_on_cpu)
    layer_devs = layers_per_device(model)
    result.update(layers_per_device=layer_devs, build_s=round(time.perf_counter() - t, 1),
                  weights_gib_per_device=weights_per_device(model))
    log(f"model: {'tiny' if args.quick else 'Llama-70B shape'}, {layers} layers, weights GiB per device "
        f"{result['weights_gib_per_device']}, layers per device {layer_devs}")
    if ref is not None:
        reference = f"the same model (same seed) on {_as_device(devices[0])} alone, same cache and kernels"
        result["equality"] = {"reference": reference, "context": args.eq_context, "batch": args.eq_batch,
                              "new_tokens": args.eq_tokens, **compare_to_reference(model, config, devices, args, ref)}
        log(f"equality: {json.dumps(result['equality'])}")
    equal = {c: result["equality"][c]["greedy_equal"] for c in args.caches} if ref is not None else None
    rows = bench_rows(model, config, args, devices, equal)
    result["rows"] = rows
    if args.capacity and n_gpu:
        save(result, args)  # the timed rows survive whatever happens below
        del model
        free_cuda(devices)
        try:
            result["capacity_80_layers"] = capacity_80_layers(args, devices, dtype, result)
        except Exception as err:  # noqa: BLE001 - keep the measured rows; say what failed
            result["capacity_80_layers"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            log(f"capacity failed: {result['capacity_80_layers']['error']}")
    return result


def bench_rows(model, config, args, devices, greedy_equal: dict | None) -> list:
    """The timed runs: per cache a short warm-up (Triton compile, cuBLAS), then --context x --batch."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.context), generator=gen).to(model.device)
    rows = []
    for cache in args.caches:
        try:
            timed_generate(model, ids[:1, :320], cache, 4, devices)
            free_cuda(devices)
            row, _, pkv = timed_generate(model, ids, cache, args.new_tokens, devices)
            del pkv
        except torch.cuda.OutOfMemoryError as err:
            row = {"cache": cache, "oom": True, "note": str(err).splitlines()[0][:200]}
        free_cuda(devices)
        if greedy_equal is not None:
            row["greedy_equal"] = greedy_equal[cache]
        rows.append(row)
        log(json.dumps(row))
    return rows


def layers_per_device(model) -> dict:
    out: dict[str, int] = {}
    for layer in model.model.layers:
        dev = str(next(layer.parameters()).device)
        out[dev] = out.get(dev, 0) + 1
    return out


def model_bytes(arch: dict, layers: int, dtype_bytes: int = 2) -> int:
    return layers * layer_bytes(arch, dtype_bytes) + 2 * dtype_bytes * arch["vocab_size"] * arch["hidden_size"]


def weights_per_device(model) -> dict:
    out: dict[str, float] = {}
    for p in model.parameters():
        out[str(p.device)] = out.get(str(p.device), 0) + p.numel() * p.element_size()
    return {k: round(v / GIB, 3) for k, v in out.items()}


def capacity_80_layers(args, devices, dtype, bench: dict) -> dict:
    """The full 80-layer Llama-70B shape over the GPUs: build it, run each cache at a short context (it runs, and
    the free memory after the weights is measured), then compute the largest cache that fits on every GPU from
    - the cache memory per token per layer measured in the --layers run at --context x --batch (what the
      allocator holds after generate, minus the weights: pool headroom included),
    - the working memory that run needed beyond weights and cache (peak - allocated after, largest over GPUs),
      assumed to hold when a long prompt is prefilled in chunks of at most --context x --batch tokens,
    - per token, the largest transient a layer needs during chunked prefill, measured here: a DynamicCache layer
      grows by torch.cat (old and new K/V both live for a moment); a kvcomp layer is decoded to dense K/V for a
      prefill chunk (KVCompLayer.dense_kv), and its byte pool, when it grows, is copied (one layer's cache more).
    Computed, not run: a prefill of the predicted size would take minutes."""
    arch = dict(LLAMA31_70B)
    config = bg.llama_config(arch, 1 << 22, num_hidden_layers=arch["num_hidden_layers"])
    t = time.perf_counter()
    model = random_model(config, auto_device_map(config, devices, dtype, headroom=0.4), dtype)
    layers_per_dev = layers_per_device(model)
    out = {"layers": arch["num_hidden_layers"], "layers_per_device": layers_per_dev, "build_s":
           round(time.perf_counter() - t, 1), "weights_gib_per_device": weights_per_device(model), "short_runs": [],
           "method": capacity_80_layers.__doc__.split("\n", 1)[1].strip()}
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, config.vocab_size, (1, args.cap_context), generator=gen).to(model.device)
    transient = {}
    for cache in args.caches:
        row, _, pkv = timed_generate(model, ids, cache, 8, devices)
        out["short_runs"].append(row)
        layer = pkv.layers[0]
        dev = layer.keys.device
        tokens = layer.keys.shape[0] * (layer.keys.shape[2] if cache == "dynamic" else pkv.get_seq_length())
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        with torch.inference_mode():
            if cache == "dynamic":
                grown = torch.cat([layer.keys, layer.keys], 2), torch.cat([layer.values, layer.values], 2)
            else:
                grown = layer.dense_kv()
        torch.cuda.synchronize(dev)
        # bytes per token alive beyond the cache while the layer grows/decodes (per token of the layer's past)
        transient[cache] = (torch.cuda.max_memory_allocated(dev) - before) / (tokens * (2 if cache == "dynamic" else 1))
        del grown, pkv
        free_cuda(devices)
    free = {}
    for d in devices:
        free_b, _ = torch.cuda.mem_get_info(d)
        free[str(torch.device("cuda", d))] = free_b + torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)
    out["free_gib_per_device_after_weights"] = {k: round(v / GIB, 3) for k, v in free.items()}
    out["computed"] = fits_from_measurements(bench, free, layers_per_dev, transient, args.new_tokens)
    fits = out["computed"]
    del model
    free_cuda(devices)
    log(f"capacity (80 layers, computed): {json.dumps(fits)}")
    return out


def fits_from_measurements(bench: dict, free: dict, layers_per_dev: dict, transient: dict, new_tokens: int) -> dict:
    """Largest number of cached tokens (batch x sequence) per cache such that on every device
    weights (already out of `free`) + reserve + tokens x (layers there x cache bytes per token per layer
    + transient per token) fits. `bench`: the --layers run (rows with peak and allocated-after per device,
    weights per device); `free`: bytes free per device with the big model's weights loaded."""
    fits = {}
    weights = {d: w * GIB for d, w in bench["weights_gib_per_device"].items()}
    for row in bench["rows"]:
        if row.get("oom"):
            continue
        cache = row["cache"]
        tokens = row["cache_tokens"] * row["batch"]
        resident = sum(a * GIB - weights.get(d, 0) for d, a in row["allocated_gib_per_gpu_after"].items())
        per_token_layer = resident / (tokens * bench["layers"])  # what the allocator holds, not just the payload
        reserve = max(p * GIB - row["allocated_gib_per_gpu_after"][d] * GIB
                      for d, p in row["peak_mem_gib_per_gpu"].items())  # peak beyond weights + cache
        # kvcomp: a growing pool is copied (old and new alive for a moment): one more layer's cache per token
        extra = transient[cache] + (per_token_layer if cache == "kvcomp" else 0)
        per_dev = {d: max(0, int((free[d] - reserve) // (n * per_token_layer + extra)))
                   for d, n in layers_per_dev.items()}
        total = min(per_dev.values())
        fits[cache] = {"cache_bytes_per_token_per_layer": round(per_token_layer, 1),
                       "working_memory_reserve_gib": round(reserve / GIB, 3),
                       "transient_bytes_per_token": round(extra, 1), "tokens_fit_per_device": per_dev,
                       "tokens_fit": total, "max_batch_at_context": {
                           str(c): total // (c + new_tokens) for c in (32768, 131072)}}
    if "dynamic" in fits and "kvcomp" in fits and fits["dynamic"]["tokens_fit"]:
        fits["kvcomp_over_dynamic_tokens"] = round(fits["kvcomp"]["tokens_fit"] / fits["dynamic"]["tokens_fit"], 2)
    return fits


# --------------------------------------------------------------------------------------------- TP


def load_tp(path, dtype, mesh):
    """from_pretrained with tp_plan="auto" on an explicit device mesh: transformers would otherwise build the
    mesh on the machine's accelerator, also under a CPU (gloo) process group."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.distributed import DistributedConfig

        kw = {"distributed_config": DistributedConfig(tp_plan="auto")}
    except (ImportError, TypeError):
        kw = {"tp_plan": "auto"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", device_mesh=mesh,
                                                 **kw).eval()
    model.generation_config.eos_token_id = None
    return model


def write_checkpoint(config, path: Path, dtype, device) -> float:
    """Random weights drawn on `device` (fast on a GPU) and saved; returns seconds."""
    t = time.perf_counter()
    model = random_model(config, {"": device}, dtype)
    model.save_pretrained(path, max_shard_size="8GB")
    del model
    free_cuda([device])
    return time.perf_counter() - t


def run_tp(args, dtype) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    on_cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda", local) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if on_cuda else "gloo", rank=rank, world_size=world,
                            device_id=device if on_cuda else None)
    mesh = init_device_mesh(device.type, (world,))
    devices = [local] if on_cuda else ["cpu"]
    result = {"mode": "tp_plan=auto", "world_size": world}
    if not args.skip_equality:
        result["equality"] = tp_equality(args, mesh, device, rank, world)
        log(f"equality: {json.dumps(result['equality'])}")
    arch = dict(bg.TINY_LLAMA if args.quick else LLAMA31_70B)
    layers = args.layers or (2 if args.quick else args.tp_layers)
    config = bg.llama_config(arch, args.context + args.new_tokens + 256, num_hidden_layers=layers)
    ckpt = Path(args.checkpoint_dir) / ("tiny" if args.quick else f"llama70b-shape-{layers}l")
    if rank == 0 and not (ckpt / "config.json").is_file():
        result["checkpoint_write_s"] = round(write_checkpoint(config, ckpt, dtype, device), 1)
        log(f"wrote random checkpoint {ckpt} ({layers} layers) in {result['checkpoint_write_s']}s")
    dist.barrier()
    t = time.perf_counter()
    model = load_tp(ckpt, dtype, mesh)
    result.update(layers=layers, load_s=round(time.perf_counter() - t, 1),
                  kv_heads_per_rank=config.num_key_value_heads // world)
    log(f"loaded with tp_plan='auto' in {result['load_s']}s")
    rows = bench_rows(model, config, args, devices, result["equality"]["all_ranks"] if "equality" in result else None)
    for row in rows:
        row["rank"] = rank
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    dist.destroy_process_group()
    result["rows"] = [r for g in gathered for r in g]
    return result


def tp_equality(args, mesh, device, rank, world) -> dict:
    """A small model in float32 (tensor parallelism reorders the sums of the row-sharded layers; in float32 that
    moves logits by ~1e-6, far below the gaps greedy decoding sees, while bf16 rounding could flip tokens):
    greedy tokens under tp_plan="auto" against the same checkpoint loaded whole on this rank's device. kvcomp
    uses granularity "token_head", which quantises each head alone and so is the same format whether or not
    the heads are split over ranks ("token" shares a range across the heads a rank holds)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import kvcomp_hf

    arch = dict(bg.TINY_LLAMA if args.quick else SMALL)
    config = bg.llama_config(arch, 4096)
    ckpt = Path(args.checkpoint_dir) / ("eq-tiny" if args.quick else "eq-small")
    if rank == 0 and not (ckpt / "config.json").is_file():
        model = random_model(config, {"": "cpu"}, torch.float32, std=0.08)
        model.save_pretrained(ckpt)
        del model
    dist.barrier()
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    devices = [device] if device.type == "cuda" else ["cpu"]
    ids = equality_ids(config, args).to(device)
    kvcfg = kvcomp_hf.KVCompConfig(granularity="token_head")
    whole = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").to(device)
    whole.generation_config.eos_token_id = None
    ref = {c: timed_generate(whole, ids, c, args.eq_tokens, devices, kvcfg)[1] for c in args.caches}
    del whole
    tp = load_tp(ckpt, torch.float32, mesh)
    mine = {}
    for c in args.caches:
        _, seqs, pkv = timed_generate(tp, ids, c, args.eq_tokens, devices, kvcfg)
        mine[c] = {"first_mismatch": first_mismatch(seqs, ref[c]), "kv_heads": pkv.layers[0].keys.shape[1]}
        del pkv
    del tp
    free_cuda(devices)
    torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return {"model": f"{'tiny' if args.quick else 'small'} random Llama, float32 (hidden {arch['hidden_size']}, "
                     f"{arch['num_hidden_layers']} layers, {arch['num_key_value_heads']} KV heads)",
            "reference": "the same checkpoint loaded whole on each rank's device", "kvcomp_granularity": "token_head",
            "context": args.eq_context, "batch": args.eq_batch, "new_tokens": args.eq_tokens, "per_rank": gathered,
            "all_ranks": {c: all(g[c]["first_mismatch"] is None for g in gathered) for c in args.caches}}


# --------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (checks the code paths)")
    p.add_argument("--tp", action="store_true", help="tensor parallel (run under torchrun)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the 70B-shaped model (default auto)")
    p.add_argument("--tp-layers", type=int, default=8, help="layers of the TP checkpoint (written to disk first)")
    p.add_argument("--checkpoint-dir", default="/tmp/kvcomp_bench_ckpt")
    p.add_argument("--context", type=int, default=None, help="default 32768 (quick 320)")
    p.add_argument("--batch", type=int, default=None, help="default 4 (quick 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 64 (quick 6)")
    p.add_argument("--caches", default="dynamic,kvcomp")
    p.add_argument("--eq-context", type=int, default=None, help="equality check prompt length (default 2048)")
    p.add_argument("--eq-batch", type=int, default=2)
    p.add_argument("--eq-tokens", type=int, default=16)
    p.add_argument("--skip-equality", action="store_true")
    p.add_argument("--capacity", action="store_true",
                   help="also build the full 80-layer model and compute the largest cache that fits (GPUs only)")
    p.add_argument("--cap-context", type=int, default=8192, help="context of the 80-layer short runs")
    args = p.parse_args(argv)
    args.context = args.context or (320 if args.quick else 32768)
    args.batch = args.batch or (2 if args.quick else 4)
    args.new_tokens = args.new_tokens or (6 if args.quick else 64)
    args.eq_context = args.eq_context or (300 if args.quick else 2048)
    args.caches = args.caches.split(",")
    bad = [c for c in args.caches if c not in ("dynamic", "kvcomp")]
    if bad:
        p.error(f"--caches: unknown {bad}; allowed: dynamic, kvcomp")
    return args


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    bg.import_kvcomp()
    n_gpu = torch.cuda.device_count() if not args.quick else 0
    dtype = torch.bfloat16 if n_gpu else torch.float32
    if args.tp:
        if "WORLD_SIZE" not in os.environ:
            raise SystemExit("--tp runs under torchrun: torchrun --nproc-per-node N eval/bench_multigpu.py --tp")
        result = run_tp(args, dtype)
    else:
        if n_gpu == 1:
            log("note: one GPU visible; device_map='auto' puts everything on it (no multi-GPU split)")
        result = run_device_map(args, list(range(n_gpu)) if n_gpu else ["cpu"], dtype)
    result["meta"] = run_meta(n_gpu)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    if int(os.environ.get("RANK", "0")) == 0:
        log(markdown(result))
        save(result, args)
    return result


def run_meta(n_gpu: int) -> dict:
    import transformers

    return {"argv": sys.argv, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "transformers": transformers.__version__, "gpus": [torch.cuda.get_device_name(i) for i in range(n_gpu)],
            "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                   "NVSHMEM_DISABLE_NVLS")},
            "notes": [bg.WEIGHTS_NOTE, "kvcomp default config (rel_k 0.1, rel_v 0.2, token granularity) in the "
                      "timed rows."]}


def save(result: dict, args) -> None:
    if args.out and int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        log(f"wrote {args.out}")


def markdown(result) -> str:
    lines = [f"mode: {result['mode']}", "", "| cache | rank | context | batch | TTFT s | decode tok/s | ms/step | "
             "peak GiB per GPU | cache GiB | bits/value | greedy equal |", "|" + "---|" * 11]
    for r in result.get("rows", []):
        if r.get("oom"):
            lines.append(f"| {r['cache']} | {r.get('rank', '')} | | | OOM | | | | | | |")
            continue
        lines.append(f"| {r['cache']} | {r.get('rank', '')} | {r['context']} | {r['batch']} | {r['ttft_s']} | "
                     f"{r['decode_tok_s']} | {r['decode_ms_per_step']} | {r['peak_mem_gib_per_gpu']} | "
                     f"{r['cache_bytes'] / GIB:.3f} | {r['bits_per_value']} | {r.get('greedy_equal', '')} |")
    cap = result.get("capacity_80_layers", {}).get("computed")
    if cap:
        lines += ["", "80 layers, computed: " + ", ".join(
            f"{c}: {cap[c]['tokens_fit']} tokens" for c in ("dynamic", "kvcomp") if c in cap)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
