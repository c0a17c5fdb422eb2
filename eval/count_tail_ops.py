"""Torch ops an eager decode step runs per layer for the cache's own bookkeeping, per config: what `tail_bits`
costs the host (eager decoding on a GPU launches about one kernel per op and is host-bound at short context).

    python -m eval.count_tail_ops --caches "kvcomp:smollm2-135m-instruct;kvcomp:smollm2-135m-instruct-tail8"

One KVCompLayer on the CPU with SmolLM2's attention shape (3 KV heads, head_dim 64, bf16) is prefilled with
--context random tokens, then appends one token: counted are the top-level aten ops of that `update` and of one
`tail()` (the tail in the model dtype that both attention paths read each step). Attention itself is not counted
(the fused kernel on a GPU, SDPA here), nor the model's own ops. With --kernels the counts are of the GPU's path:
the tail rows coded and decoded by kernels/tail_rows.py, each of whose launches counts as one op (the launches are
counted, not run: the values do not matter for the count).
"""

from __future__ import annotations

import argparse


class _CountedKernel:
    """Stands in for a Triton kernel: `kernel[grid](...)` counts a launch and runs nothing."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


def count(cache: str, context: int, heads: int = 3, head_dim: int = 64, kernels: bool = False) -> dict[str, int]:
    """cache: a kvcomp cache spec (eval.common.parse_cache_spec) -> {"update": ops, "tail": ops}; kernels: the
    tail rows on kernels/tail_rows.py (as on a GPU), each launch one op."""
    from unittest import mock

    import torch
    from torch.profiler import ProfilerActivity, profile

    from eval import common
    from kvcomp_hf.cache import KVCompLayer
    from kvcomp_hf.kernels import tail_rows

    encode, decode = _CountedKernel(), _CountedKernel()

    def ops(fn) -> int:
        before = encode.launches + decode.launches
        with profile(activities=[ProfilerActivity.CPU]) as prof, \
                mock.patch.object(tail_rows, "_encode_rows_kernel", encode), \
                mock.patch.object(tail_rows, "_decode_rows_kernel", decode):
            fn()
        aten = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
        return aten + encode.launches + decode.launches - before

    torch.manual_seed(0)
    layer = KVCompLayer(common.parse_cache_spec(cache).kvcomp_config())
    kv = [torch.randn(1, heads, context, head_dim, dtype=torch.bfloat16) for _ in range(2)]
    layer.update(*kv)
    layer.use_triton = kernels  # after the prefill, which stores its blocks through the PyTorch codec either way
    step = [torch.randn(1, heads, 1, head_dim, dtype=torch.bfloat16) for _ in range(2)]
    return {"update": ops(lambda: layer.update(*step)), "tail": ops(layer.tail)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caches", default="kvcomp:smollm2-135m-instruct;kvcomp:smollm2-135m-instruct-tail8",
                   help="';'-separated kvcomp cache specs (kvcomp:<preset> | kvcomp:<field>=<value>,...)")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--kernels", action="store_true", help="count the GPU's path (kernels/tail_rows.py launches)")
    args = p.parse_args(argv)
    print("| cache | ops in update (1 token) | ops in tail() | per layer and step |\n|---|---:|---:|---:|")
    for cache in args.caches.split(";"):
        n = count(cache, args.context, kernels=args.kernels)
        print(f"| {cache} | {n['update']} | {n['tail']} | {n['update'] + n['tail']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
