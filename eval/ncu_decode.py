"""One Llama-3.1-8B-shaped layer (32 q heads, 8 KV heads, D=128, bf16) compressed with the default config, then
a few fused decode calls: a target for Nsight Compute (the H200 run in kernels/NOTES.md):

ncu --clock-control none -k regex:_decode_kernel -s 2 -c 1 --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section SchedulerStats python -m eval.ncu_decode --context 32768 --batch 8"""

from __future__ import annotations

import argparse
import math

import torch

from kvcomp_hf.block_store import BlockStore
from kvcomp_hf.config import KVCompConfig
from kvcomp_hf.kernels import decode_attention, store_blocks

from eval.bench_kernels import _config_value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--config", default="", help="KVCompConfig overrides, e.g. layout=fixed,rel_k=0.0667,rel_v=0.143")
    args = ap.parse_args()
    B, Hq, H, D, ctx = args.batch, 32, 8, 128, args.context
    cfg = KVCompConfig.from_dict({k: _config_value(v) for k, v in
                                  (kv.split("=") for kv in args.config.split(",") if kv)})
    nb = (ctx - cfg.residual_length) // 64
    k = torch.randn(B, H, ctx, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, H, ctx, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    store = BlockStore.from_config(cfg, H, D, torch.bfloat16, torch.device("cuda"), use_triton=True)
    store.reserve(B * nb, store.max_bytes(B * nb))
    store_blocks(k[:, :, :nb * 64], v[:, :, :nb * 64], store, 0)
    bt = torch.arange(B * nb, dtype=torch.int32, device="cuda").view(B, nb)
    for _ in range(4):
        decode_attention(q, k[:, :, nb * 64:], v[:, :, nb * 64:], store, bt, None, 1 / math.sqrt(D))
    torch.cuda.synchronize()
    print("ok")


if __name__ == "__main__":
    main()
