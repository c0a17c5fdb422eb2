"""Bytes of the packing layouts on real K/V: SmolLM2-135M-Instruct (bundled GGUF) K/V of the first 2048 tokens
of the demo text, every layer, encoded with the reference codec. The quantiser (and so the error at a given
rel) does not depend on the layout, so bits/value at equal rel is bits/value at equal accuracy.

python eval/layout_bits.py --out eval/results/layout_bits.json"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kvcomp_hf import codec  # noqa: E402
from kvcomp_hf.config import KVCompConfig  # noqa: E402

LAYOUTS = [dict(pack_size=16, repack="median"), dict(pack_size=16, repack="none"), dict(pack_size=64, repack="none")]
RELS = [(0.1, 0.2), (0.05, 0.1)]


def collect_kv(tokens: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from kvcomp_hf.demo import offline_text, smollm2_dir

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=gguf).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=gguf)
    text = offline_text() if callable(offline_text) else offline_text
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers], ids.shape[1]


def blocks(x):
    b, h, t, d = x.shape
    nb = t // 64
    return x[:, :, :nb * 64].reshape(b, h, nb, 64, d).permute(0, 2, 1, 3, 4).reshape(b * nb, h, 64, d).bfloat16()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", default="eval/results/layout_bits.json")
    args = ap.parse_args()
    kv, n_tok = collect_kv(args.tokens)
    rows = []
    for rel_k, rel_v in RELS:
        for lay in LAYOUTS:
            cfg = KVCompConfig(rel_k=rel_k, rel_v=rel_v, **lay)
            seg = other = values = 0
            for k, v in kv:
                kb, vb = blocks(k), blocks(v)
                enc, fmt = codec.encode_blocks(kb, vb, cfg)
                seg += int(enc.seg_bytes.sum())
                n = kb.shape[0]
                meta = codec.metadata_bytes_per_block(fmt, torch.bfloat16)
                other += 2 * n * sum(meta.values()) + (n * 64 if cfg.repack != "none" else 0)  # perm only if used
                values += 2 * kb.numel()
            rows.append(dict(rel_k=rel_k, rel_v=rel_v, **lay, segment_bits_per_value=8 * seg / values,
                             bits_per_value=8 * (seg + other) / values))
            print(json.dumps(rows[-1]))
    out = dict(model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", tokens=n_tok,
               note="bits_per_value counts segments, per-token min/step, segment offsets/sizes, and the "
                    "repack permutation when the layout uses one", rows=rows)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
