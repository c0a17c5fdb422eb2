"""What the rotation (config.rotation="hadamard") costs on the GPU: the store's one batched matmul against
the Triton store kernel, the decode step's q rotation + output un-rotation against the fused kernel, and (first,
alone with --step-only) one layer's decode-step rotations by the float32 cuBLAS formula against kernels/rotate.py,
launched eagerly and replayed from a CUDA graph. (Since 2026-12-06 a decode step rotates only q in a launch of its
own: the static append rotates the new token's K and V and the combine kernel the output, so the step's four
rotations timed here are what the cache did before.)

    python -m eval.bench_rotation --out eval/results/bench_rotation.json
    python -m eval.bench_rotation --step-only --out eval/results/bench_rotation_step.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from eval.bench_kernels import capture_graph
from kvcomp_hf.cache import KVCompLayer
from kvcomp_hf.config import KVCompConfig
from kvcomp_hf.rotation import LayerRotation


def cuda_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def bench(batch: int, heads: int, q_heads: int, head_dim: int, context: int) -> dict:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn(batch, heads, context, head_dim, device=dev, generator=gen).to(torch.bfloat16)
    v = torch.randn(batch, heads, context, head_dim, device=dev, generator=gen).to(torch.bfloat16)
    layer = KVCompLayer(KVCompConfig(rotation="hadamard"))
    layer.update(k, v)
    rot, store = layer.rotation, layer.store
    block_k, block_v = k[:, :, :64].contiguous(), v[:, :, :64].contiguous()
    q = torch.randn(batch, q_heads, 1, head_dim, device=dev, generator=gen).to(torch.bfloat16)
    from kvcomp_hf.kernels import decode_attention

    def kernel_only():
        decode_attention(q, layer.keys, layer.values, store, layer.block_table, None, head_dim ** -0.5)

    out = {"batch": batch, "kv_heads": heads, "q_heads": q_heads, "head_dim": head_dim, "context": context}
    out["rotate_prefill_kv_ms"] = cuda_ms(lambda: (rot.rotate(k, 0), rot.rotate(v, 1)))
    out["store_prefill_ms"] = cuda_ms(lambda: store.add(k, v), reps=3)
    out["rotate_one_block_kv_ms"] = cuda_ms(lambda: (rot.rotate(block_k, 0), rot.rotate(block_v, 1)))
    out["store_one_block_ms"] = cuda_ms(lambda: store.add(block_k, block_v))
    out["decode_kernel_ms"] = cuda_ms(kernel_only)
    out["decode_with_rotation_ms"] = cuda_ms(lambda: layer.attend_fused(q, None, head_dim ** -0.5))
    out["rotate_q_and_output_ms"] = cuda_ms(lambda: rot.unrotate_output(rot.rotate_query(q)))
    return out


def graph_us(fn, calls: int = 32, reps: int = 20) -> float:
    """Microseconds per fn() when `calls` of them replay from one CUDA graph (a compiled decode step's setting)."""
    return cuda_ms(capture_graph(fn, calls).replay, reps) * 1000 / calls


def bench_step(batch: int, heads: int, q_heads: int, head_dim: int) -> dict:
    """One layer's decode-step rotations (the token's K and V, q, the output) by each route, in µs per layer."""
    from kvcomp_hf.kernels.rotate import hadamard_rotate

    dev = torch.device("cuda")
    rot = LayerRotation(0, 0, heads, head_dim, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    k, v = (torch.randn(batch, heads, 1, head_dim, device=dev, generator=gen).to(torch.bfloat16) for _ in "kv")
    q = torch.randn(batch, 1, q_heads, head_dim, device=dev, generator=gen).to(torch.bfloat16).transpose(1, 2)
    torch_route = {"k": lambda: (k.float() * rot._signs_for(0, heads)) @ rot.h,
                   "v": lambda: (v.float() * rot._signs_for(1, heads)) @ rot.h,
                   "q": lambda: (q.float() * rot._signs_for(0, q_heads)) @ rot.h,
                   "o": lambda: (q.float() @ rot.h) * rot._signs_for(1, q_heads)}
    triton_route = {"k": lambda: hadamard_rotate(k, rot.signs[0], rot.h_pm1, rot.scale, False),
                    "v": lambda: hadamard_rotate(v, rot.signs[1], rot.h_pm1, rot.scale, False),
                    "q": lambda: hadamard_rotate(q, rot.signs[0], rot.h_pm1, rot.scale, False),
                    "o": lambda: hadamard_rotate(q, rot.signs[1], rot.h_pm1, rot.scale, True)}
    out = {"batch": batch, "kv_heads": heads, "q_heads": q_heads, "head_dim": head_dim}
    for name, route in (("cublas_fp32", torch_route), ("triton", triton_route)):
        step = lambda: [f() for f in route.values()]  # noqa: E731
        out[f"{name}_eager_us"] = cuda_ms(step, reps=50) * 1000
        out[f"{name}_graph_us"] = graph_us(step)
    # the same values up to the float32 summation order: count outputs whose bf16 rounding differs
    diff = [(torch_route[x]().to(torch.bfloat16) != triton_route[x]()).float().mean().item() for x in "kvqo"]
    out["bf16_mismatch_fraction"] = max(diff)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="eval/results/bench_rotation.json")
    p.add_argument("--step-only", action="store_true", help="only the decode-step rotations (no prefill/store)")
    args = p.parse_args(argv)
    rows = [bench_step(1, 8, 32, 128), bench_step(8, 8, 32, 128), bench_step(1, 3, 9, 64), bench_step(1, 8, 32, 256)]
    if not args.step_only:
        rows += [bench(1, 3, 9, 64, 8192), bench(8, 8, 32, 128, 32768), bench(1, 8, 32, 256, 8192)]
    for r in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
