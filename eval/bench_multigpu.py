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
with random weights (normal, std 0.02); --layers sets the depth (default: as many as fit in 55% of the GPUs'
memory, at most 80). Workload: 32K context, batch 4, --new-tokens decode steps. Reported per run: TTFT,
decode tokens/s, peak memory per GPU, cache bytes per GPU. Before the big runs, a small model checks greedy
tokens: the multi-device run (Triton kernels on CUDA) against the single-device PyTorch path.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends are set before torch is imported).

Under tensor parallelism each rank holds num_key_value_heads / world KV heads and its own KVCompCache, so
granularity "token" shares one (min, step) per token across the rank's heads only. TP needs a checkpoint
(transformers shards while loading): rank 0 writes a random one to --checkpoint-dir first.
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
from kvcomp_hf.compat import CACHE_KWARG, returned_cache  # noqa: E402

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


# --------------------------------------------------------------------------------------------- device_map


def build_dispatched(config, devices: list, dtype, std=0.02, seed=0, headroom: float = 0.45):
    """Meta-device model, a balanced device map over `devices` (whole decoder layers), each parameter
    materialised with random values directly on its device, then accelerate's dispatch_model hooks."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory, set_module_tensor_to_device
    from transformers import LlamaForCausalLM

    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config)
    if devices == ["cpu"]:
        device_map = {"": "cpu"}
    else:
        max_memory = {d: int(torch.cuda.get_device_properties(d).total_memory * (1 - headroom)) for d in devices}
        max_memory = get_balanced_memory(model, max_memory=max_memory, dtype=dtype,
                                         no_split_module_classes=["LlamaDecoderLayer"])
        device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=dtype,
                                           no_split_module_classes=["LlamaDecoderLayer"])
        bad = [k for k, v in device_map.items() if v in ("cpu", "disk")]
        if bad:
            raise SystemExit(f"the model does not fit the GPUs with {headroom:.0%} headroom: {bad[:4]} -> cpu/disk; "
                             "lower --layers")
    gens = {}
    for name, param in list(model.named_parameters()):
        dev = _device_for(name, device_map)
        gen = gens.setdefault(str(dev), torch.Generator(device=dev).manual_seed(seed))
        value = torch.empty(param.shape, dtype=dtype, device=dev)
        value.fill_(1.0) if param.dim() == 1 else value.normal_(0.0, std, generator=gen)
        set_module_tensor_to_device(model, name, dev, value=value, dtype=dtype)
    model = dispatch_model(model, device_map=device_map) if devices != ["cpu"] else model.to("cpu")
    model.generation_config.eos_token_id = None
    return model.eval(), device_map


def _device_for(name: str, device_map: dict):
    best = None
    for prefix, dev in device_map.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, dev)
    dev = best[1]
    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)


def install_device_guard(model) -> int:
    """Make each decoder layer's CUDA device current while it runs. Triton launches on the *current*
    device, not on its arguments' device, so without this the kvcomp kernels of layers on cuda:1 would
    launch on cuda:0 (see the report: the fix belongs in kvcomp_hf). Returns the number of hooks."""
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            param = next(module.parameters())
            if param.device.type == "cuda":
                index = param.device.index

                def pre_hook(mod, args, kwargs, index=index):
                    torch.cuda.set_device(index)

                module.register_forward_pre_hook(pre_hook, with_kwargs=True)
                n += 1
    return n


# --------------------------------------------------------------------------------------------- runs


def timed_generate(model, ids, cache: str, new_tokens: int, devices: list, kvcomp_backend: str = "auto"):
    """generate() with timing; cache 'dynamic' or 'kvcomp' (default config). Returns (row, sequences)."""
    import kvcomp_hf
    from transformers import GenerationConfig

    first = ids.device
    kwargs = {}
    if cache == "kvcomp":
        model.set_attn_implementation("kvcomp")
        kwargs[CACHE_KWARG] = kvcomp_hf.KVCompCache(model.config, kvcomp_hf.KVCompConfig(),
                                                          backend=kvcomp_backend)
    else:
        model.set_attn_implementation("sdpa")
    gcfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                            pad_token_id=0, use_cache=True, return_dict_in_generate=True)
    cuda_devs = [d for d in devices if d != "cpu"]
    for d in cuda_devs:
        torch.cuda.reset_peak_memory_stats(d)
        torch.cuda.synchronize(d)
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
           "peak_mem_gib_per_gpu": {str(d): round(torch.cuda.max_memory_allocated(d) / GIB, 3) for d in cuda_devs}}
    pkv = returned_cache(out)
    per_dev: dict[str, int] = {}
    for layer in pkv.layers:
        dev = str(layer.keys.device)
        if hasattr(layer, "memory_report"):
            rep = layer.memory_report()
            nbytes = sum(sum(p.values()) for p in rep["parts"].values())
        else:
            nbytes = layer.keys.numel() * layer.keys.element_size() * 2
        per_dev[dev] = per_dev.get(dev, 0) + nbytes
    row["cache_bytes_per_device"] = per_dev
    row["cache_devices"] = sorted({str(layer.keys.device) for layer in pkv.layers})
    if hasattr(pkv, "memory_report"):
        rep = pkv.memory_report()
        row.update(cache_bytes=int(rep["compressed_bytes"]), bits_per_value=round(rep["bits_per_value"], 3))
        storage_ok = all(l.store.pool.device == l.keys.device == l.block_table.device for l in pkv.layers)
        row["storage_on_layer_device"] = storage_ok
    else:
        row.update(cache_bytes=sum(per_dev.values()), bits_per_value=8.0 * pkv.layers[0].keys.element_size())
    seqs = out.sequences[:, context:].cpu()
    del out, pkv, kwargs
    gc.collect()
    for d in cuda_devs:
        with torch.cuda.device(d):
            torch.cuda.empty_cache()
    return row, seqs


def first_mismatch(a: torch.Tensor, b: torch.Tensor):
    diff = (a != b).nonzero()
    return None if diff.numel() == 0 else [int(x) for x in diff[0]]


def equality_check(devices, dtype, args) -> dict:
    """Small model: multi-device (kvcomp auto backend = Triton on CUDA) vs single-device PyTorch path."""
    config = bg.llama_config(SMALL, 4096)
    gen = torch.Generator().manual_seed(1)
    ids_cpu = torch.randint(3, config.vocab_size, (2, args.eq_context), generator=gen)
    single_dev = devices[0]
    single, _ = build_dispatched(config, [single_dev], dtype, std=0.08)
    ids = ids_cpu.to(single.device)
    ref = {"dynamic": timed_generate(single, ids, "dynamic", args.eq_tokens, [single_dev])[1],
           "kvcomp": timed_generate(single, ids, "kvcomp", args.eq_tokens, [single_dev], kvcomp_backend="torch")[1]}
    del single
    gc.collect()
    if len(devices) > 1:  # a small model fits one GPU, so "auto" would not split it: spread layers by hand
        multi = _spread_layers(config, devices, dtype)
        if args.device_guard:
            install_device_guard(multi)
    else:
        multi, _ = build_dispatched(config, devices, dtype, std=0.08)
    ids = ids_cpu.to(multi.device)
    result = {"model": "small random Llama (4 layers, hidden 1024, 8 KV heads, head_dim 64)",
              "context": args.eq_context, "new_tokens": args.eq_tokens, "devices": [str(d) for d in devices]}
    for cache in ("dynamic", "kvcomp"):
        row, seqs = timed_generate(multi, ids, cache, args.eq_tokens, devices)
        mism = first_mismatch(seqs, ref[cache])
        result[cache] = {"equal_to_single_device": mism is None, "first_mismatch": mism,
                         "cache_devices": row["cache_devices"], "storage_on_layer_device":
                         row.get("storage_on_layer_device"),
                         "reference": "single device, " + ("PyTorch kvcomp path (backend='torch')"
                                                           if cache == "kvcomp" else "SDPA")}
    del multi
    gc.collect()
    return result


def _spread_layers(config, devices, dtype):
    n = config.num_hidden_layers
    device_map = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0],
                  "model.norm": devices[-1], "lm_head": devices[-1]}
    for i in range(n):
        device_map[f"model.layers.{i}"] = devices[i * len(devices) // n]
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlamaForCausalLM

    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    for name, param in list(model.named_parameters()):
        dev = _device_for(name, device_map)
        value = torch.empty(param.shape, dtype=dtype)
        value.fill_(1.0) if param.dim() == 1 else value.normal_(0.0, 0.08, generator=gen)
        set_module_tensor_to_device(model, name, dev, value=value.to(dev), dtype=dtype)
    model = dispatch_model(model, device_map=device_map)
    model.generation_config.eos_token_id = None
    return model.eval()


# --------------------------------------------------------------------------------------------- TP


def run_tp(args, dtype) -> dict:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    on_cuda = torch.cuda.is_available() and not args.quick
    if on_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if on_cuda else "gloo", rank=rank, world_size=world,
                            device_id=torch.device("cuda", local) if on_cuda else None)
    arch = dict(bg.TINY_LLAMA if args.quick else LLAMA31_70B)
    arch["num_key_value_heads"] = max(arch["num_key_value_heads"], world)
    layers = args.layers or (2 if args.quick else args.tp_layers)
    config = bg.llama_config(arch, args.context + args.new_tokens + 256, num_hidden_layers=layers)
    ckpt = Path(args.checkpoint_dir) / f"llama70b-shape-{layers}l" if not args.quick else \
        Path(args.checkpoint_dir) / "tiny"
    if rank == 0 and not (ckpt / "config.json").is_file():
        t = time.perf_counter()
        model = bg.random_llama(config, torch.device("cpu"), dtype)  # CPU: a 70B-layer shard fits host memory
        model.save_pretrained(ckpt)
        del model
        log(f"wrote random checkpoint {ckpt} ({layers} layers) in {time.perf_counter() - t:.0f}s")
    dist.barrier()
    try:
        from transformers.distributed import DistributedConfig

        kw = {"distributed_config": DistributedConfig(tp_plan="auto")}
    except (ImportError, TypeError):
        kw = {"tp_plan": "auto"}
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa", **kw).eval()
    model.generation_config.eos_token_id = None
    devices = [torch.device("cuda", local)] if on_cuda else ["cpu"]
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.context), generator=gen).to(model.device)
    rows, seqs = [], {}
    for cache in args.caches:
        try:
            timed_generate(model, ids[:1, :320], cache, 4, devices)  # warm-up: Triton compile
            row, seqs[cache] = timed_generate(model, ids, cache, args.new_tokens, devices)
            row["kv_heads_per_rank"] = config.num_key_value_heads // world
        except torch.cuda.OutOfMemoryError as err:
            row = {"cache": cache, "oom": True, "note": str(err).splitlines()[0][:200]}
        row["rank"] = rank
        rows.append(row)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    dist.destroy_process_group()
    return {"mode": "tp_plan=auto", "world_size": world, "layers": layers, "rows": [r for g in gathered for r in g],
            "tokens_equal_dynamic_vs_kvcomp": (first_mismatch(seqs["dynamic"], seqs["kvcomp"]) is None)
            if len(seqs) == 2 else None}


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
    p.add_argument("--eq-context", type=int, default=None, help="equality check prompt length (default 1000)")
    p.add_argument("--eq-tokens", type=int, default=16)
    p.add_argument("--skip-equality", action="store_true")
    p.add_argument("--no-device-guard", dest="device_guard", action="store_false",
                   help="do not make each layer's GPU current during its forward (tests kvcomp_hf's own handling)")
    args = p.parse_args(argv)
    args.context = args.context or (320 if args.quick else 32768)
    args.batch = args.batch or (2 if args.quick else 4)
    args.new_tokens = args.new_tokens or (6 if args.quick else 64)
    args.eq_context = args.eq_context or (300 if args.quick else 1000)
    args.caches = args.caches.split(",")
    return args


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    bg.import_kvcomp()
    import transformers

    n_gpu = torch.cuda.device_count() if not args.quick else 0
    dtype = torch.bfloat16 if n_gpu else torch.float32
    meta = {"argv": sys.argv, "torch": torch.__version__, "transformers": transformers.__version__,
            "gpus": [torch.cuda.get_device_name(i) for i in range(n_gpu)],
            "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                   "NVSHMEM_DISABLE_NVLS")},
            "notes": [bg.WEIGHTS_NOTE, "kvcomp default config (rel_k 0.1, rel_v 0.2, token granularity)."]}
    if args.tp:
        if "WORLD_SIZE" not in os.environ:
            raise SystemExit("--tp runs under torchrun: torchrun --nproc-per-node N eval/bench_multigpu.py --tp")
        result = run_tp(args, dtype)
    else:
        devices = list(range(n_gpu)) if n_gpu else ["cpu"]
        if n_gpu == 1:
            log("note: one GPU visible; device_map='auto' puts everything on it (no multi-GPU split)")
        result = {"mode": "device_map=auto", "devices": [str(d) for d in devices], "device_guard": args.device_guard}
        if not args.skip_equality:
            result["equality"] = equality_check(devices, dtype, args)
            log(f"equality: {json.dumps(result['equality'])}")
        if args.quick:
            arch, layers = dict(bg.TINY_LLAMA), args.layers or 2
        else:
            total = sum(torch.cuda.get_device_properties(i).total_memory for i in range(n_gpu))
            arch, layers = dict(LLAMA31_70B), args.layers or auto_layers(LLAMA31_70B, total)
        config = bg.llama_config(arch, args.context + args.new_tokens + 256, num_hidden_layers=layers)
        t = time.perf_counter()
        model, device_map = build_dispatched(config, devices, dtype)
        hooks = install_device_guard(model) if args.device_guard and n_gpu else 0
        layer_devs = {}
        for layer in model.model.layers:
            dev = str(next(layer.parameters()).device)
            layer_devs[dev] = layer_devs.get(dev, 0) + 1
        result.update(layers=layers, layers_per_device=layer_devs, build_s=round(time.perf_counter() - t, 1),
                      device_guard_hooks=hooks,
                      weights_gib=round(sum(p.numel() * p.element_size() for p in model.parameters()) / GIB, 2))
        log(f"model: Llama-70B shape, {layers} layers, {result['weights_gib']} GiB, layers per device {layer_devs}")
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(3, config.vocab_size, (args.batch, args.context), generator=gen).to(model.device)
        rows = []
        for cache in args.caches:
            try:
                timed_generate(model, ids[:1, :320], cache, 4, devices)  # warm-up: Triton compile, cuBLAS
                row, _ = timed_generate(model, ids, cache, args.new_tokens, devices)
            except torch.cuda.OutOfMemoryError as err:
                row = {"cache": cache, "oom": True, "note": str(err).splitlines()[0][:200]}
                gc.collect()
            rows.append(row)
            log(json.dumps(row))
        result["rows"] = rows
    result["meta"] = meta
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    if int(os.environ.get("RANK", "0")) == 0:
        log(markdown(result))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
            log(f"wrote {args.out}")
    return result


def markdown(result) -> str:
    lines = [f"mode: {result['mode']}", "", "| cache | rank | context | batch | TTFT s | decode tok/s | ms/step | "
             "peak GiB per GPU | cache GiB | bits/value |", "|" + "---|" * 10]
    for r in result.get("rows", []):
        if r.get("oom"):
            lines.append(f"| {r['cache']} | {r.get('rank', '')} | | | OOM | | | | | |")
            continue
        lines.append(f"| {r['cache']} | {r.get('rank', '')} | {r['context']} | {r['batch']} | {r['ttft_s']} | "
                     f"{r['decode_tok_s']} | {r['decode_ms_per_step']} | {r['peak_mem_gib_per_gpu']} | "
                     f"{r['cache_bytes'] / GIB:.3f} | {r['bits_per_value']} |")
    if "equality" in result:
        eq = result["equality"]
        lines.append("")
        lines.append("greedy tokens vs single device: " + ", ".join(
            f"{c}: {'equal' if eq[c]['equal_to_single_device'] else 'differ at ' + str(eq[c]['first_mismatch'])}"
            for c in ("dynamic", "kvcomp")))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
