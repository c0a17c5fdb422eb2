"""Torch ops an eager decode step runs per layer for the cache's own bookkeeping, per config: what `tail_bits`
costs the host (eager decoding on a GPU launches about one kernel per op and is host-bound at short context).

    python -m eval.count_tail_ops --caches "kvcomp:smollm2-135m-instruct;kvcomp:smollm2-135m-instruct-tail8"

One KVCompLayer on the CPU with SmolLM2's attention shape (3 KV heads, head_dim 64, bf16) is prefilled with
--context random tokens, then appends one token: counted are the top-level aten ops of that `update` and of one
`tail()` (the tail in the model dtype that both attention paths read each step). Attention itself is not counted
(the fused kernel on a GPU, SDPA here), nor the model's own ops.
"""

from __future__ import annotations

import argparse


def count(cache: str, context: int, heads: int = 3, head_dim: int = 64) -> dict[str, int]:
    """cache: a kvcomp cache spec (eval.common.parse_cache_spec) -> {"update": ops, "tail": ops}."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from eval import common
    from kvcomp_hf.cache import KVCompLayer

    def ops(fn) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)

    torch.manual_seed(0)
    layer = KVCompLayer(common.parse_cache_spec(cache).kvcomp_config())
    kv = [torch.randn(1, heads, context, head_dim, dtype=torch.bfloat16) for _ in range(2)]
    layer.update(*kv)
    step = [torch.randn(1, heads, 1, head_dim, dtype=torch.bfloat16) for _ in range(2)]
    return {"update": ops(lambda: layer.update(*step)), "tail": ops(layer.tail)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caches", default="kvcomp:smollm2-135m-instruct;kvcomp:smollm2-135m-instruct-tail8",
                   help="';'-separated kvcomp cache specs (kvcomp:<preset> | kvcomp:<field>=<value>,...)")
    p.add_argument("--context", type=int, default=8192)
    args = p.parse_args(argv)
    print("| cache | ops in update (1 token) | ops in tail() | per layer and step |\n|---|---:|---:|---:|")
    for cache in args.caches.split(";"):
        n = count(cache, args.context)
        print(f"| {cache} | {n['update']} | {n['tail']} | {n['update'] + n['tail']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
