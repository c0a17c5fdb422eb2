"""What the rotation (config.rotation="hadamard") costs on the GPU: the store's one batched matmul against
the Triton store kernel, and the decode step's q rotation + output un-rotation against the fused kernel.

    python -m eval.bench_rotation --out eval/results/bench_rotation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kvcomp_hf.cache import KVCompLayer
from kvcomp_hf.config import KVCompConfig


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="eval/results/bench_rotation.json")
    args = p.parse_args(argv)
    rows = [bench(1, 3, 9, 64, 8192), bench(8, 8, 32, 128, 32768), bench(1, 8, 32, 256, 8192)]
    for r in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
