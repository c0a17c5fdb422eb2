"""Bits/value of kvcomp configs by part, from the bytes the codec writes for a model's real K/V.

One forward per window fills a DynamicCache; every config then encodes each layer's complete 64-token
blocks with the reference codec (rotated first when the config says so) and the bytes are split into
payload (+ alignment padding), pack minimums + widths, per-token min + step, segment offsets + sizes,
repacking permutation, block-table entry and the 16-bit tail, as KVCompCache.memory_report counts them for
a bf16 model, at --bits-at tokens (the windows' bytes per block, a 128-token tail). Accuracy does not depend
on repack or pack_size (attention is invariant to the token order inside a block, packing is lossless), so
this answers those levers without running the model per config.

    python -m eval.bits_breakdown --tokens 2048 --windows 2 --out eval/results/bits-smollm2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from eval import common, perplexity
from kvcomp_hf import codec
from kvcomp_hf.rotation import LayerRotation

PARTS = ("payload", "pack min+width", "token min+step", "offsets", "perm", "block table", "tail")


def layer_parts(k: torch.Tensor, v: torch.Tensor, cfg, layer: int) -> dict[str, float]:
    """Bytes by part of the complete blocks of one layer's k, v [1, H, T, D], per block (tail excluded)."""
    _, h, t, d = k.shape
    nb = (t - 128) // 64
    if cfg.rotation == "hadamard":
        rot = LayerRotation(cfg.rotation_seed, layer, h, d, k.device)
        k, v = rot.rotate(k.float(), 0), rot.rotate(v.float(), 1)
    blocks = [x[0, :, :nb * 64].reshape(h, nb, 64, d).transpose(0, 1).contiguous() for x in (k, v)]
    enc, fmt = codec.encode_blocks(*blocks, cfg)
    meta = codec.metadata_bytes_per_block(fmt, torch.bfloat16)
    pack_meta = (fmt.meta_bytes(0) + fmt.meta_bytes(1)) * h * nb
    return {"payload": (int(enc.seg_bytes.sum()) - pack_meta) / nb, "pack min+width": pack_meta / nb,
            "token min+step": 2 * (meta["token_min"] + meta["token_step"]),
            "offsets": 2 * (meta["seg_offset"] + meta["seg_bytes"]),
            "perm": 64 if cfg.repack != "none" else 0, "block table": 4}  # arrival order keeps no permutation


def breakdown(caches: list, specs: list[str], bits_at: int) -> dict[str, dict[str, float]]:
    out = {}
    for spec in specs:
        cfg = common.parse_cache_spec(spec).kvcomp_config()
        total = {p: 0.0 for p in PARTS}
        values = 0
        nb_at = (bits_at - 128) // 64
        for cache in caches:
            for i, layer in enumerate(cache.layers):
                k, v = layer.keys, layer.values
                parts = layer_parts(k, v, cfg, i)
                for p, b in parts.items():
                    total[p] += b * nb_at
                h, d = k.shape[1], k.shape[3]
                total["tail"] += (bits_at - nb_at * 64) * h * d * 2 * 2
                values += bits_at * h * d * 2
        row = {p: 8 * b / values for p, b in total.items()}
        row["total"] = sum(row.values())
        out[spec] = row
        print(f"{spec}: " + ", ".join(f"{p} {b:.3f}" for p, b in row.items()), flush=True)
    return out


def markdown(rows: dict[str, dict[str, float]], bits_at: int) -> str:
    lines = [f"| config | bits/value at {bits_at} | " + " | ".join(PARTS) + " |",
             "|---|---:|" + "---:|" * len(PARTS)]
    for spec, r in rows.items():
        lines.append(f"| {spec} | {r['total']:.3f} | " + " | ".join(f"{r[p]:.3f}" for p in PARTS) + " |")
    return "\n".join(lines)


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--specs", required=True, help="';'-separated kvcomp specs")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--text", default="pydoc")
    p.add_argument("--bits-at", type=int, default=8192)
    args = p.parse_args(argv)
    from transformers import DynamicCache

    model, tokenizer = common.load_model(args.model, args.gguf_file, args.device, args.dtype, "sdpa")
    text_name, text = common.load_text(args.text, min_words=args.tokens, order=common.PERPLEXITY_ORDER)
    caches = []
    for ids in perplexity.token_windows(tokenizer, text, args.tokens, args.windows):
        cache = DynamicCache(config=model.config)
        model(torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True)
        caches.append(cache)
    rows = breakdown(caches, [s for s in args.specs.split(";") if s], args.bits_at)
    out = Path(args.out or "eval/results/bits")
    out.mkdir(parents=True, exist_ok=True)
    meta = common.run_metadata(args)
    common.write_json(out / "bits_breakdown.json", {"model": common.model_label(args.model, args.gguf_file),
                                                    "text": text_name, "tokens": args.tokens,
                                                    "windows": args.windows, "bits_at": args.bits_at,
                                                    "rows": rows, "meta": meta})
    (out / "bits_breakdown.md").write_text(
        f"# Bits/value by part at {args.bits_at} tokens: {common.model_label(args.model, args.gguf_file)}, "
        f"K/V of {args.windows} x {args.tokens} tokens of {text_name}\n\n{markdown(rows, args.bits_at)}\n\n"
        f"Command: `{meta['command']}`\n", encoding="utf-8")
    print(markdown(rows, args.bits_at))
    return 0


if __name__ == "__main__":
    sys.exit(main())
