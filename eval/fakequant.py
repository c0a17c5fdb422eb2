"""Fast accuracy-per-bit screen: kvcomp's quantiser applied as fake quantisation in one forward pass.

Teacher-forcing through a KVCompCache in 64-token chunks re-decodes the compressed blocks at every chunk;
on a CPU that takes minutes per config. This screen computes the same attention in one forward pass over
the window: query i, in the chunk starting at s = 64 * floor(i / 64), reads token j through the codec
(rotation, codec.quantize, codec.dequantize, rotation back) when the cache would hold j compressed at that
chunk, i.e. S <= j < S + 64 * floor((s + 64 - S - R) / 64) with S = sink_tokens, R = residual_length (the
update compresses before attending, leaving the first S and the last R..R+63 tokens exact), and exactly
otherwise. codec.dequantize(codec.quantize(x)) is what decode_blocks returns
for the stored bytes (bit packing and repacking are lossless), so this equals eval/perplexity.py
--chunk 64 up to floating-point order.

Bits/value are counted from the bytes the codec writes for the window's compressed blocks
(encode_blocks: payload, pack minimums and widths, padding) plus per-block metadata (token min in bf16,
step, segment offsets and sizes, the permutation when repack is not "none", block-table entry) and the
bf16 tail, as KVCompCache.memory_report counts them for a 16-bit model, both at the window's length and
extrapolated to --bits-at tokens (the same bytes per block, a tail of R + (bits_at - R) % 64 tokens).

Levers beyond KVCompConfig fields, appended to a kvcomp spec with "|":
    edge=N*F   the first and last N layers use rel_k, rel_v times F
    sink=S     sink_tokens=S (the first S tokens stay exact; blocks start after them)
    resid=R    R recent tokens stay exact instead of residual_length (a screen for values below
               KVCompConfig's minimum)

    python -m eval.fakequant --tokens 2048 --windows 2 --out eval/results/fakequant-smollm2-2k
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from eval import common, perplexity
from kvcomp_hf import codec
from kvcomp_hf.config import KVCompConfig
from kvcomp_hf.rotation import LayerRotation

ATTN = "kvcomp_fakequant"
CHUNK = 64


@dataclasses.dataclass
class Scheme:
    config: KVCompConfig | None  # None: the exact (full) cache
    edge: tuple[int, float] | None = None
    resid: int | None = None  # None: the config's residual_length

    @property
    def sink(self) -> int:
        return self.config.sink_tokens

    @property
    def residual(self) -> int:
        return self.resid if self.resid is not None else self.config.residual_length


def parse_scheme(spec: str) -> Scheme:
    base, *opts = spec.split("|")
    if base == "full":
        return Scheme(None)
    scheme = Scheme(common.parse_cache_spec(base).kvcomp_config())
    for opt in opts:
        key, _, val = opt.partition("=")
        if key == "edge":
            n, f = val.split("*")
            scheme.edge = (int(n), float(f))
        elif key == "sink":
            scheme.config = dataclasses.replace(scheme.config, sink_tokens=int(val))
        elif key == "resid" and int(val) >= 1:
            scheme.resid = int(val)
        else:
            raise ValueError(f"lever must be edge=N*F, sink=S or resid=R (R >= 1), got {opt!r} in {spec!r}")
    return scheme


class State:
    scheme: Scheme = Scheme(None)
    n_layers: int = 0
    bits: list = []  # per layer: (stored bytes of the compressed blocks, n_blocks, H, D)


def layer_config(scheme: Scheme, layer: int, n_layers: int) -> KVCompConfig:
    cfg = scheme.config
    if scheme.edge and (layer < scheme.edge[0] or layer >= n_layers - scheme.edge[0]):
        cfg = dataclasses.replace(cfg, rel_k=cfg.rel_k * scheme.edge[1], rel_v=cfg.rel_v * scheme.edge[1])
    return cfg


def fake_quant(x: torch.Tensor, cfg: KVCompConfig, kv: int, rot: LayerRotation | None) -> torch.Tensor:
    """x [1, H, T, D] -> what the cache returns for it (rotated back)."""
    bits = codec.bits_for_rel((cfg.rel_k, cfg.rel_v)[kv])
    xr = rot.rotate(x, kv) if rot else x
    q, lo, step = codec.quantize(xr, (cfg.rel_k, cfg.rel_v)[kv], bits, cfg.granularity)
    xh = codec.dequantize(q, lo, step)
    return rot.unrotate(xh, kv) if rot else xh


def block_bytes(k: torch.Tensor, v: torch.Tensor, cfg: KVCompConfig, rot: LayerRotation | None, n_blocks: int) -> int:
    """Bytes the cache stores for the first n_blocks blocks of k, v [1, H, T, D] after the sink tokens
    (16-bit model)."""
    if n_blocks == 0:
        return 0
    h, d = k.shape[1], k.shape[3]
    kr, vr = (rot.rotate(k, 0), rot.rotate(v, 1)) if rot else (k, v)
    s = cfg.sink_tokens
    blocks = [x[0, :, s:s + n_blocks * 64].reshape(h, n_blocks, 64, d).transpose(0, 1) for x in (kr, vr)]
    enc, fmt = codec.encode_blocks(blocks[0].contiguous(), blocks[1].contiguous(), cfg)
    meta = sum(codec.metadata_bytes_per_block(fmt, torch.bfloat16).values()) * 2  # K and V
    perm = codec.BLOCK_SIZE if cfg.repack != "none" else 0  # the cache keeps no permutation for arrival order
    return int(enc.seg_bytes.sum()) + n_blocks * (meta + perm + 4)  # + block-table entry


def compressed_before(positions: torch.Tensor, residual: int, sinks: int) -> torch.Tensor:
    """Tokens the cache holds compressed (after the sinks) when the chunk of each query position attends: the
    update stores the chunk's tokens, then compresses every complete block between the `sinks` first and the
    `residual` most recent tokens."""
    s = positions // CHUNK * CHUNK
    return torch.clamp((s + CHUNK - sinks - residual) // 64 * 64, min=0)


def fakequant_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    scheme = State.scheme
    if scheme.config is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    layer = module.layer_idx
    cfg = layer_config(scheme, layer, State.n_layers)
    b, h, t, d = key.shape
    rot = LayerRotation(cfg.rotation_seed, layer, h, d, key.device) if cfg.rotation == "hadamard" else None
    kf, vf = key.float(), value.float()
    kh, vh = fake_quant(kf, cfg, 0, rot), fake_quant(vf, cfg, 1, rot)
    pos = torch.arange(t, device=key.device)
    first = scheme.sink
    comp = (pos[None, :] >= first) & (pos[None, :] < first + compressed_before(pos, scheme.residual, first)[:, None])
    n_blocks = int(max((t - first - scheme.residual) // 64, 0))
    State.bits.append((block_bytes(kf, vf, cfg, rot, n_blocks), n_blocks, h, d))
    group = query.shape[1] // h
    qf = query.float()
    kx, kq, vx, vq = (x.repeat_interleave(group, 1) for x in (kf, kh, vf, vh))
    scale = scaling if scaling is not None else d ** -0.5
    scores = torch.where(comp, qf @ kq.transpose(-1, -2), qf @ kx.transpose(-1, -2)) * scale
    causal = pos[None, :] <= pos[:, None]
    p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = (p * comp) @ vq + (p * ~comp) @ vx
    return out.transpose(1, 2).to(query.dtype), None


def window_bits(t: int, sink: int, bits_at: int, residual: int) -> tuple[float, float]:
    """All-in bits/value of the window (at its length) and at bits_at tokens (the window's bytes per block,
    the tail the cache holds at bits_at, sink tokens included)."""
    win = at = values_win = values_at = 0.0
    nb_at = (bits_at - sink - residual) // 64
    tail_at = bits_at - nb_at * 64
    for nbytes, nb, h, d in State.bits:
        token_bytes = h * d * 2 * 2  # K and V of one token in bf16
        win += nbytes + (t - nb * 64) * token_bytes
        at += (nbytes / nb if nb else 0.0) * nb_at + tail_at * token_bytes
        values_win += t * h * d * 2
        values_at += bits_at * h * d * 2
    return 8 * win / values_win, 8 * at / values_at


@torch.no_grad()
def evaluate(model, windows: list[list[int]], specs: list[str], bits_at: int, log=print) -> dict[str, Any]:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN, fakequant_attention)
    AttentionMaskInterface.register(ATTN, sdpa_mask)
    model.set_attn_implementation(ATTN)
    State.n_layers = model.config.num_hidden_layers
    ref = []
    for ids in windows:
        State.scheme = Scheme(None)
        x = torch.tensor([ids], device=model.device)
        ref.append(torch.log_softmax(model(x).logits[0, :-1].float(), -1))
    results = {}
    for spec in specs:
        t0 = time.time()
        scheme = parse_scheme(spec)
        nll, kl, top1, bpv, bpv_at, ref_nll = [], [], [], [], [], []
        for ids, rl in zip(windows, ref):
            State.scheme, State.bits = scheme, []
            x = torch.tensor([ids], device=model.device)
            lp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
            tgt = x[0, 1:, None]
            nll.append(-lp.gather(-1, tgt)[:, 0])
            ref_nll.append(-rl.gather(-1, tgt)[:, 0])
            kl.append((rl.exp() * (rl - lp)).sum(-1))
            top1.append((lp.argmax(-1) == rl.argmax(-1)).double())
            if scheme.config is not None:
                b_win, b_at = window_bits(len(ids), scheme.sink, bits_at, scheme.residual)
                bpv.append(b_win)
                bpv_at.append(b_at)
        nll_all, ref_all = torch.cat(nll), torch.cat(ref_nll)
        r = {"delta_nll": (nll_all.mean() - ref_all.mean()).item(), "kl": torch.cat(kl).mean().item(),
             "top1_agreement": torch.cat(top1).mean().item(), "nll": nll_all.mean().item(),
             "delta_nll_per_window": [(a.mean() - b.mean()).item() for a, b in zip(nll, ref_nll)],
             "bits_per_value_window": sum(bpv) / len(bpv) if bpv else 16.0,
             "bits_per_value": sum(bpv_at) / len(bpv_at) if bpv_at else 16.0}
        results[spec] = r
        log(f"{spec}: {r['bits_per_value']:.3f} bits/value at {bits_at} ({r['bits_per_value_window']:.3f} in the "
            f"window), dNLL {r['delta_nll']:+.4f} {['%+.4f' % w for w in r['delta_nll_per_window']]}, "
            f"KL {r['kl']:.4f}, top-1 {100 * r['top1_agreement']:.1f}% ({time.time() - t0:.0f}s)")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--specs", default="", help="';'-separated kvcomp specs, each optionally with |edge=N*F, |sink=S, |resid=R")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--text", default="pydoc")
    p.add_argument("--bits-at", type=int, default=8192, help="context length the all-in bits/value is given at")
    p.add_argument("--merge", nargs="*", default=[],
                   help="only merge: fakequant.json files of earlier runs and eval/perplexity.py results of KIVI "
                        "(same windows; KIVI's bits/value recomputed at --bits-at) into --out, with the figure")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args)
    specs = [s for s in args.specs.split(";") if s]
    for spec in specs:  # a bad spec fails now, not after the model has run the ones before it
        parse_scheme(spec)
    model, tokenizer = common.load_model(args.model, args.gguf_file, args.device, args.dtype)
    text_name, text = common.load_text(args.text, min_words=args.tokens, order=common.PERPLEXITY_ORDER)
    windows = perplexity.token_windows(tokenizer, text, args.tokens, args.windows)
    out = Path(args.out or "eval/results/fakequant")
    out.mkdir(parents=True, exist_ok=True)
    results = evaluate(model, windows, specs, args.bits_at)
    common.write_json(out / "fakequant.json", {
        "suite": "fakequant", "model": common.model_label(args.model, args.gguf_file), "text": text_name,
        "text_sha256": common.text_sha256(text), "tokens": args.tokens, "windows": len(windows),
        "bits_at": args.bits_at, "results": results, "meta": common.run_metadata(args)})
    return 0


def family(spec: str) -> str:
    if spec.startswith("kivi"):
        return "KIVI (perplexity.py, same windows)"
    if "|" in spec or any(f in spec for f in ("repack=none", "pack_size", "granularity=token_head", "edge")):
        return "kvcomp levers"
    if "=" not in spec:
        return "kvcomp presets (old)"
    return "kvcomp rotated" if "rotation=hadamard" in spec else "kvcomp not rotated"


LOG_LINE = re.compile(r"^(?P<spec>\S+): (?P<bits>[\d.]+) bits/value at \d+ \((?P<win>[\d.]+) in the window\), "
                      r"dNLL (?P<dnll>[-+\d.]+) \[(?P<per>[^\]]*)\], KL (?P<kl>[\d.]+), top-1 (?P<top1>[\d.]+)%")


def parse_log(text: str) -> dict[str, dict]:
    """Results from the progress lines evaluate() prints (one per config)."""
    out = {}
    for line in text.splitlines():
        m = LOG_LINE.match(line.strip())
        if m:
            out[m["spec"]] = {"bits_per_value": float(m["bits"]), "bits_per_value_window": float(m["win"]),
                              "delta_nll": float(m["dnll"]), "kl": float(m["kl"]),
                              "top1_agreement": float(m["top1"]) / 100,
                              "delta_nll_per_window": [float(x.strip(" '")) for x in m["per"].split(",")]}
    return out


def merge(args) -> int:
    """One fakequant.json (+ figure) from several runs and KIVI baselines."""
    import json

    from eval import plot_frontier
    from eval.baselines import kivi_bits_per_value

    results, first = {}, None
    for path in args.merge:
        if path.endswith(".log"):  # the progress lines of a run stopped before it wrote its JSON
            results.update(parse_log(Path(path).read_text()))
            continue
        d = json.loads(Path(path).read_text())
        if d.get("suite") == "fakequant":
            first = first or d
            results.update(d["results"])
        else:  # eval/perplexity.py: KIVI rows, bits at bits_at for SmolLM2's head_dim 64
            for name, r in d["results"].items():
                if name.startswith("kivi"):
                    nbits = int(name[4:])
                    results[name] = {**{k: r[k] for k in ("delta_nll", "kl", "top1_agreement", "nll")},
                                     "bits_per_value": kivi_bits_per_value(nbits, args.bits_at, head_dim=64)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first = first or {"model": "SmolLM2-135M-Instruct.Q4_1", "text": args.text, "tokens": args.tokens,
                      "windows": args.windows, "bits_at": args.bits_at, "meta": common.run_metadata(args)}
    doc = {**first, "suite": "perplexity", "method": "fakequant", "results": results,
           "families": {s: family(s) for s in results}, "merged_from": args.merge}
    common.write_json(out / "frontier.json", doc)
    lines = [f"| config | family | bits/value at {first['bits_at']} | ΔNLL | KL | top-1 |", "|---|---|---:|---:|---:|---:|"]
    for s, r in sorted(results.items(), key=lambda kv: (family(kv[0]), kv[1]["bits_per_value"])):
        lines.append(f"| {s.replace('|', chr(92) + '|')} | {family(s)} | {r['bits_per_value']:.3f} | "
                     f"{r['delta_nll']:+.4f} | {r['kl']:.4f} | {100 * r['top1_agreement']:.1f}% |")
    (out / "frontier.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    plot_frontier.main([str(out / "frontier.json"), "--ppl-metric", "delta_nll,kl", "--out", str(out / "frontier.png"),
                        "--title", f"SmolLM2-135M, {first['windows']} x {first['tokens']} tokens (CPU, fake quantisation); "
                                   f"bits/value at {first['bits_at']} tokens"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
