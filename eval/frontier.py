"""The accuracy-per-bit frontier in one run: perplexity through many caches, one after another in one process.

The full cache runs once per window (its next-token log-probabilities stay on the device); then every cache spec
is teacher-forced over the same --windows windows of --tokens tokens in --chunk-token steps, exactly as
eval/perplexity.py does, and compared with it on the device (NLL increase, KL, top-1). After the last chunk the
window's final token is stored too, so bits/value are those of a cache holding the whole window (8,192 tokens:
a 128-token kvcomp tail). Each finished spec is written at once (spec_<hash>.json), so a run stopped by
--time-budget keeps what it finished, and a re-run skips it. The merge writes

    <out>/perplexity.json   (suite "perplexity": what eval/plot_frontier.py reads)
    <out>/frontier.md       bits/value all-in, ΔNLL, KL, top-1, and the bits/value of each part of the cache
    <out>/frontier.png      bits/value against ΔNLL and against KL

Levers that are not KVCompConfig fields, appended to a kvcomp spec: "|edge=N*F": the first and last N layers use
rel_k and rel_v multiplied by F (e.g. "kvcomp:rotation=hadamard|edge=2*0.5"); "|tail=B": the uncompressed tail
simulated at B-bit integers (each arriving token quantised per (token, head) over head_dim, min and scale in
16 bits; the first sink_tokens stay exact), counted at that width in bits/value.
--backend torch runs kvcomp's store through the reference codec (the same bytes as the Triton store, which
its tests check; no kernel compilation per bit width).

    python -m eval.frontier --tokens 8192 --windows 2 --workers 6 --backend torch --out eval/results/frontier-smollm2

Cost (H200, 2026-12-01, SmolLM2, 6 workers on the GPU): ~100 s per kvcomp config for 2 x 8,192 tokens (each 64-token
chunk decodes the layer's blocks to dense through the reference decoder), 12-18 s for KIVI and QuantizedCache,
~17 s for the reference pass: the default list of 34 configs needs ~11 minutes with 6 workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from eval import common, perplexity
from kvcomp_hf.compat import cache_kwargs

ROT = "rotation=hadamard"
SINK = "sink_tokens=4"
FIXED = "layout=fixed,rel_k=0.0666667"  # 4-bit K in the fixed layout (rel 1/15 uses all 16 codes)
# (spec, family) in priority order (--workers take them round-robin; --time-budget cuts the end of the list).
# Every field that differs from KVCompConfig's defaults of any time is spelled out, except the layout: specs
# without one were measured "packed" up to 2026-12-06 (eval/results/frontier-smollm2-8k) and since measure
# layout "auto" (fixed_v where pack_size is 64 and repack none: the same quantised values, so the same ΔNLL,
# without V's pack metadata).
R4, R0, NR = f"{ROT},{SINK}", f"{ROT},sink_tokens=0", "rotation=none,sink_tokens=0"
DEFAULT_CACHES = [
    ("kvcomp:rel_k=0.1,rel_v=0.2,rotation=none,granularity=token,repack=median,pack_size=16,sink_tokens=0",
     "kvcomp old default (no rotation)"),
    (f"kvcomp:rel_k=0.1,rel_v=0.15,{R0}", "kvcomp rotated, 0 sink tokens"),
    (f"kvcomp:rel_k=0.08,rel_v=0.25,{R4}", "kvcomp rotated, 4 sink tokens"),
    ("kivi4", "KIVI"), ("hf-int4", "QuantizedCache"),
    (f"kvcomp:rel_k=0.0666667,rel_v=0.142857,{R4}", "kvcomp rotated, 4 sink tokens"),
    # the best two of the 2K screen between the preset and the fixed 4/4 point (KIVI-4's ΔNLL at <= 3.81 bits?)
    (f"kvcomp:rel_k=0.075,rel_v=0.125,{R4}", "kvcomp rotated, 4 sink tokens"),
    (f"kvcomp:rel_k=0.05,rel_v=0.2,{R4}", "kvcomp rotated, 4 sink tokens"),
    (f"kvcomp:rel_k=0.1,rel_v=0.25,{R4}", "kvcomp rotated, 4 sink tokens"),
    (f"kvcomp:rel_k=0.05,rel_v=0.25,{R4}", "kvcomp rotated, 4 sink tokens"),
    ("kivi2", "KIVI"), ("hf-int2", "QuantizedCache"),
    (f"kvcomp:rel_k=0.08,rel_v=0.3,{R4}", "kvcomp default (rotated, 4 sink tokens)"),
    (f"kvcomp:layout=packed,rel_k=0.08,rel_v=0.3,{R4}", "kvcomp packed layout (the default before 2026-12-06)"),
    # fixed V fields at the smallest rel of their width (same bytes, a smaller step): 2 bits from rel 0.2902, 3 from
    # 0.1355 (codec.bits_for_rel); the CPU screen of 2026-12-06 (eval/RESULTS.md) could not separate them from noise
    (f"kvcomp:rel_k=0.08,rel_v=0.2903,{R4}", "kvcomp rotated, 4 sink tokens"),
    (f"kvcomp:rel_k=0.0666667,rel_v=0.1355,{R4}", "kvcomp rotated, 4 sink tokens"),
    (f"kvcomp:rel_k=0.06,rel_v=0.2,{R4}", "kvcomp rotated, 4 sink tokens"),
    (f"kvcomp:{FIXED},rel_v=0.0666667,{R4}", "kvcomp fixed layout, 4 sink tokens"),
    ("kvcomp:smollm2-135m-instruct", "kvcomp SmolLM2 preset"),
    (f"kvcomp:rel_k=0.1,rel_v=0.3,{R4}", "kvcomp rotated, 4 sink tokens"),
    (f"kvcomp:rel_k=0.08,rel_v=0.25,{R0}", "kvcomp rotated, 0 sink tokens"),
    (f"kvcomp:rel_k=0.1,rel_v=0.2,{R4}", "kvcomp rotated, 4 sink tokens"),
    (f"kvcomp:rel_k=0.05,rel_v=0.15,{R4}", "kvcomp rotated, 4 sink tokens"),
    (f"kvcomp:rel_k=0.07,rel_v=0.15,{R4}", "kvcomp rotated, 4 sink tokens"),
    (f"kvcomp:rel_k=0.1,rel_v=0.2,{R0}", "kvcomp rotated, 0 sink tokens"),
    (f"kvcomp:{FIXED},rel_v=0.142857,{R4}", "kvcomp fixed layout, 4 sink tokens"),
    (f"kvcomp:rel_k=0.07,rel_v=0.1,{R0}", "kvcomp rotated, 0 sink tokens"),
    (f"kvcomp:rel_k=0.05,rel_v=0.1,{R0}", "kvcomp rotated, 0 sink tokens"),
    (f"kvcomp:rel_k=0.08,rel_v=0.25,{ROT},sink_tokens=1", "lever"),
    *[(f"kvcomp:rel_k={k},rel_v={v},{NR}", "kvcomp not rotated, 0 sink tokens") for k, v in ((0.1, 0.1), (0.07, 0.1), (0.05, 0.1))],
    (f"kvcomp:rel_k=0.15,rel_v=0.3,{R0}", "kvcomp rotated, 0 sink tokens"),
    (f"kvcomp:rel_k=0.12,rel_v=0.3,{R4}", "kvcomp rotated, 4 sink tokens"),
    (f"kvcomp:{FIXED},rel_v=0.333333,{R4}", "kvcomp fixed layout, 4 sink tokens"),
    (f"kvcomp:rel_k=0.08,rel_v=0.25,{R4}|edge=2*0.5", "lever"),
    (f"kvcomp:rel_k=0.08,rel_v=0.25,{R4},granularity=token_head", "lever"),
]
PARTS = [("payload", ("payload",)), ("pack min+width", ("pack_meta",)), ("token min+step", ("token_min", "token_step")),
         ("offsets", ("seg_offset", "seg_bytes")), ("perm", ("perm",)), ("block table", ("block_table",)),
         ("tail", ("tail",))]


def split_levers(spec: str) -> tuple[str, dict[str, Any]]:
    """'kvcomp:...|edge=N*F|tail=B' -> ('kvcomp:...', {"edge": (N, F), "tail": B}); other specs -> (spec, {})."""
    base, *options = spec.split("|")
    levers: dict[str, Any] = {}
    for opt in options:
        name, _, value = opt.partition("=")
        try:
            if name == "edge" and "*" in value:
                n, f = value.split("*")
                levers["edge"] = (int(n), float(f))
                continue
            if name == "tail" and 2 <= int(value) <= 8:
                levers["tail"] = int(value)
                continue
        except ValueError:
            pass
        raise ValueError(f"spec option must be 'edge=N*F' or 'tail=B' (B 2..8), got {opt!r} in {spec!r}")
    return base, levers


def make_cache(spec: str, model, backend: str = "auto"):
    """common.make_cache (a DynamicCache for "full"), kvcomp on `backend`, plus the levers (split_levers)."""
    base, levers = split_levers(spec)
    parsed = common.parse_cache_spec(base)
    if levers and parsed.kind != "kvcomp":
        raise ValueError(f"levers apply to kvcomp specs only, got {spec!r}")
    if parsed.kind == "kvcomp":
        import kvcomp_hf

        cache = kvcomp_hf.KVCompCache(model.config, parsed.kvcomp_config(), backend=backend)
    else:
        cache = common.make_cache(parsed, model)
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    if "edge" in levers:
        n, f = levers["edge"]
        layers = cache.layers
        for layer in layers[:n] + layers[-n:]:
            layer.config = dataclasses.replace(layer.config, rel_k=layer.config.rel_k * f,
                                               rel_v=layer.config.rel_v * f)
    if "tail" in levers:
        for layer in cache.layers:
            _integer_tail(layer, levers["tail"])
    return cache


def _integer_tail(layer, bits: int) -> None:
    """The |tail=B lever on one KVCompLayer: every arriving token (after the layer's rotation) is quantised per
    (token, head) to B bits, except the sequence's first sink_tokens, so the tail and the blocks compressed from it
    hold what an integer tail would; memory_report counts those tokens at B bits plus a 16-bit min and scale.
    B = 8 holds the values of the cache's own tail_bits=8 (tests/test_cache.py checks them bit for bit), which
    stores each token's min and max at the model dtype's width and keeps exact copies of the sinks beside it."""
    from eval.baselines import fake_quantize

    new_states, report = layer._new_states, layer.memory_report

    def quantised_states(key_states, value_states):
        exact = max(0, layer.config.sink_tokens - layer.get_seq_length())
        k, v = new_states(key_states, value_states)
        e = min(exact, k.shape[2])
        return tuple(torch.cat([x[:, :, :e], fake_quantize(x[:, :, e:], bits, dim=-1)], 2) for x in (k, v))

    def integer_report():
        r = report()
        if layer.is_initialized:
            b, h, t, d = layer.keys.shape
            exact = min(layer.config.sink_tokens, t)  # the sequence's first tokens lead the tail
            tail = b * h * (exact * d * layer.keys.element_size() + (t - exact) * (d * bits + 32) // 8)
            r["parts"]["k"]["tail"] = r["parts"]["v"]["tail"] = tail
        return r

    layer._new_states, layer.memory_report = quantised_states, integer_report


def _spec_file(out: Path, spec: str) -> Path:
    return out / f"spec_{hashlib.sha1(spec.encode()).hexdigest()[:12]}.json"


@torch.no_grad()
def teacher_force(model, ids: list[int], cache, chunk: int, ref: list[torch.Tensor] | None = None):
    """Feed `ids` through `cache` in chunks, then the final token (so the cache holds the whole window).
    Without `ref`: returns the log-probabilities of every chunk (on the device) and the per-position NLL.
    With `ref` (the full cache's chunks): returns per-position NLL, KL(ref || this) and top-1 agreement."""
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    n = x.shape[1]
    logps, nll, kl, top1 = [], [], [], []
    for i, s in enumerate(range(0, n - 1, chunk)):
        e = min(s + chunk, n - 1)
        out = model(input_ids=x[:, s:e], use_cache=True, **cache_kwargs(cache))
        lp = torch.log_softmax(out.logits[0].float(), dim=-1)
        nll.append(-lp.gather(-1, x[0, s + 1:e + 1, None])[:, 0])
        if ref is None:
            logps.append(lp)
        else:
            kl.append((ref[i].exp() * (ref[i] - lp)).sum(-1))
            top1.append(lp.argmax(-1) == ref[i].argmax(-1))
    model(input_ids=x[:, n - 1:], use_cache=True, **cache_kwargs(cache))
    cpu = [torch.cat(v).double().cpu() if v else None for v in (nll, kl, top1)]
    return (logps, cpu[0]) if ref is None else cpu


def run_specs(model, windows: list[list[int]], specs: list[str], args: argparse.Namespace, out: Path,
              extra: dict[str, Any], log=print) -> None:
    """The full cache once per window, then every spec not already in `out`, until --time-budget runs out."""
    t_start = time.time()
    refs = []
    for ids in windows:
        cache = make_cache("full", model)
        logps, nll = teacher_force(model, ids, cache, args.chunk)
        refs.append((logps, nll, common.cache_report(cache, len(ids), model)))
    log(f"reference (full cache): {len(windows)} x {len(windows[0])} tokens ({time.time() - t_start:.0f}s)")
    for spec in specs:
        if _spec_file(out, spec).exists():
            continue
        if time.time() - t_start > args.time_budget:
            log(f"time budget spent: {spec} not run")
            continue
        t0 = time.time()
        try:
            per_window = []
            for ids, (logps, ref_nll, ref_report) in zip(windows, refs):
                cache = make_cache(spec, model, args.backend)
                nll, kl, top1 = teacher_force(model, ids, cache, args.chunk, logps)
                per_window.append({"n_tokens": len(ids), "nll": {"full": ref_nll, spec: nll},
                                   "kl": {"full": torch.zeros_like(kl), spec: kl},
                                   "top1": {"full": torch.ones_like(top1, dtype=torch.bool), spec: top1.bool()},
                                   "reports": {"full": ref_report, spec: common.cache_report(cache, len(ids), model)}})
                del cache
        except Exception as err:  # noqa: BLE001 - one failing baseline must not cost the others
            log(f"FAILED {spec}: {err!r}")
            common.write_json(_spec_file(out, spec), {"cache": spec, "error": repr(err)})
            continue
        res = perplexity.summarise(per_window, ["full", spec])
        common.write_json(_spec_file(out, spec), {"cache": spec, "result": res[spec], "full": res["full"],
                                                  "seconds": time.time() - t0, **extra})
        log(f"done {spec}: {_num(res[spec]['bits_per_value'], '.3f')} bits/value, "
            f"dNLL {_num(res[spec]['delta_nll'], '+.4f')}, KL {_num(res[spec]['kl'], '.4f')} ({time.time() - t0:.0f}s)")


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def part_bits(report: dict[str, Any]) -> dict[str, float] | None:
    """Bits per K/V value of each part of a KVCompCache's memory_report (shared parts count once)."""
    if "parts" not in report.get("k", {}) or not report.get("bits_per_value"):
        return None
    n_values = 8 * report["compressed_bytes"] / report["bits_per_value"]
    groups = [report["k"]["parts"], report["v"]["parts"], report.get("shared_parts", {})]
    return {label: 8 * sum(g.get(key, 0) for g in groups for key in keys) / n_values for label, keys in PARTS}


def table(results: dict[str, Any], families: dict[str, str]) -> str:
    head = ["cache", "family", "bits/value", "ΔNLL", "KL", "top-1"] + [p for p, _ in PARTS]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    rows = sorted(results.items(), key=lambda kv: (families.get(kv[0], ""), kv[1]["bits_per_value"] or 99))
    for name, r in rows:
        if name == "full":
            continue
        parts = part_bits(r.get("cache_report", {})) or {}
        cells = [name.replace("|", "\\|"), families.get(name, ""), _num(r["bits_per_value"], ".3f"),
                 _num(r["delta_nll"], "+.4f"), _num(r["kl"], ".4f"), _num(100 * r["top1_agreement"], ".1f") + "%"]
        cells += [f"{parts[p]:.3f}" if p in parts else "" for p, _ in PARTS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Issue 12's targets (SmolLM2, 8K tokens, bits/value all-in), checked by every merge on the specs it has.
DEFAULT_TARGET = (3.2, 0.03)   # KVCompConfig(): <= 3.2 bits/value at ΔNLL <= 0.03 nats
PRESET_TARGET = (3.8, 0.01)    # a preset: ΔNLL <= 0.01 at <= 3.8 bits/value
STRETCH_TARGET = (2.5, 0.02)
BASELINE_SAVING = 0.25         # at equal ΔNLL, >= 25% fewer bits than each of these
SAVING_BASELINES = ("kivi4", "hf-int4")


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (bits, ΔNLL) points no other point beats on both, by rising bits (so ΔNLL falls)."""
    front: list[tuple[float, float]] = []
    for bits, nll in sorted(points):
        if not front or nll < front[-1][1]:
            front.append((bits, nll))
    return front


def _interp(pairs: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear y at x through (x, y) pairs sorted by x; None outside their range (no extrapolation)."""
    for (x0, y0), (x1, y1) in itertools.pairwise(pairs):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pairs[0][1] if len(pairs) == 1 and pairs[0][0] == x else None


def frontier_bits_at(front: list[tuple[float, float]], nll: float) -> float | None:
    """Bits/value kvcomp needs for ΔNLL `nll`, piecewise linear between its Pareto configs (None outside them)."""
    return _interp(sorted((d, b) for b, d in front), nll)


def frontier_nll_at(front: list[tuple[float, float]], bits: float) -> float | None:
    """ΔNLL of kvcomp at `bits` bits/value, piecewise linear between its Pareto configs (None outside them)."""
    return _interp(front, bits)


def _kvcomp_config(spec: str):
    """The KVCompConfig of a kvcomp spec that is a plain config (no '|' lever); None for anything else."""
    if not spec.startswith("kvcomp") or "|" in spec:
        return None
    try:
        return common.parse_cache_spec(spec).kvcomp_config()
    except ValueError:  # e.g. a preset this checkout no longer has
        return None


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Issue 12's targets checked on `results` (spec -> perplexity summary): rows of {key, target, measured, met}
    (key: "default", "stretch", a preset's spec or a baseline's name), the kvcomp Pareto front they use, and every
    baseline against that front at equal ΔNLL and at equal bits."""
    from kvcomp_hf import KVCompConfig

    pts = {s: (r["bits_per_value"], r["delta_nll"]) for s, r in results.items()
           if r.get("bits_per_value") is not None and r.get("delta_nll") is not None}
    configs = {s: c for s in pts if (c := _kvcomp_config(s)) is not None}
    front = pareto([pts[s] for s in configs])
    rows = []

    def check(key, target, spec, limits):  # limits: (max bits, max ΔNLL)
        bits, nll = pts[spec]
        rows.append({"key": key, "target": target, "measured": f"{bits:.3f} bits at {nll:+.4f}",
                     "met": bits <= limits[0] and nll <= limits[1]})

    for s in [s for s, c in configs.items() if c.to_dict() == KVCompConfig().to_dict()][:1]:
        check("default", f"default (`KVCompConfig()`, `{s}`): ≤ {DEFAULT_TARGET[0]} bits/value at ΔNLL ≤ "
                         f"{DEFAULT_TARGET[1]}", s, DEFAULT_TARGET)
    for s in (s for s in configs if "=" not in s):  # a preset by name
        check(s, f"preset `{s}`: ΔNLL ≤ {PRESET_TARGET[1]} at ≤ {PRESET_TARGET[0]} bits/value", s, PRESET_TARGET)
    baselines = []
    for s in (s for s in pts if not s.startswith("kvcomp") and s != "full"):
        bits, nll = pts[s]
        kv_bits = frontier_bits_at(front, nll) if front else None
        # less accurate than kvcomp's cheapest config and larger: kvcomp needs at most that config's bits there
        # (a bound, not an extrapolation)
        at_most = kv_bits is None and bool(front) and front[0][1] <= nll and front[0][0] < bits
        kv_bits = front[0][0] if at_most else kv_bits
        saving = None if kv_bits is None else 1 - kv_bits / bits
        baselines.append({"cache": s, "bits_per_value": bits, "delta_nll": nll, "kvcomp_bits_at_nll": kv_bits,
                          "kvcomp_bits_at_most": at_most, "fewer_bits": saving,
                          "kvcomp_nll_at_bits": frontier_nll_at(front, bits) if front else None})
        if s in SAVING_BASELINES:
            le, ge = ("≤ ", "≥ ") if at_most else ("", "")
            rows.append({"key": s, "target": f"≥ {BASELINE_SAVING:.0%} fewer bits than `{s}` at its ΔNLL ({nll:+.4f})",
                         "measured": "outside kvcomp's measured range" if kv_bits is None
                         else f"kvcomp {le}{kv_bits:.3f} bits against {bits:.3f}: {ge}{saving:.1%} fewer"
                         + (" (kvcomp's cheapest config is more accurate)" if at_most else ""),
                         "met": saving is not None and saving >= BASELINE_SAVING})
    if front:
        within = [b for b, d in front if d <= STRETCH_TARGET[1]]
        rows.append({"key": "stretch", "target": f"stretch: ≤ {STRETCH_TARGET[0]} bits/value at ΔNLL ≤ "
                                                 f"{STRETCH_TARGET[1]}",
                     "measured": f"fewest kvcomp bits within {STRETCH_TARGET[1]}: "
                                 + (f"{min(within):.3f}" if within else "none"),
                     "met": bool(within) and min(within) <= STRETCH_TARGET[0]})
    return {"rows": rows, "kvcomp_front": front, "baselines": baselines}


def targets_markdown(t: dict[str, Any], heading: str = "##") -> str:
    lines = [f"{heading} Targets of issue 12", "",
             "kvcomp's frontier: piecewise linear between the kvcomp configs no other kvcomp config beats on both "
             "bits/value and ΔNLL (" + ", ".join(f"{b:.3f} at {d:+.4f}" for b, d in t["kvcomp_front"]) + "); "
             "'|' levers are not configs and are left out.", "",
             "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {r['target']} | {r['measured']} | {'yes' if r['met'] else '**no**'} |" for r in t["rows"]]
    lines += ["", "| baseline | bits/value | ΔNLL | kvcomp bits at that ΔNLL | fewer bits | kvcomp ΔNLL at those bits |",
              "|---|---:|---:|---:|---:|---:|"]
    for b in t["baselines"]:
        le, ge = ("≤ ", "≥ ") if b.get("kvcomp_bits_at_most") else ("", "")
        lines.append(f"| {b['cache']} | {b['bits_per_value']:.3f} | {b['delta_nll']:+.4f} | "
                     f"{le}{_num(b['kvcomp_bits_at_nll'], '.3f')} | "
                     f"{'-' if b['fewer_bits'] is None else ge + format(b['fewer_bits'], '.1%')} | "
                     f"{_num(b['kvcomp_nll_at_bits'], '+.4f')} |")
    lines.append("\n'-': outside the range of the measured kvcomp configs (no extrapolation). '≤': the baseline "
                 "loses more than kvcomp's cheapest config, which has fewer bits: kvcomp needs at most those.")
    return "\n".join(lines)


def merge(out: Path, families: dict[str, str], args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    failed = {}
    text = None
    measured: dict[str, Any] = {}  # where and when the specs ran (a merge may run elsewhere, later)
    for f in sorted(out.glob("spec_*.json")):
        d = json.loads(f.read_text())
        if "error" in d:
            failed[d["cache"]] = d["error"]
            continue
        results.setdefault("full", {k: v for k, v in d["full"].items()})
        results[d["cache"]] = d["result"]
        text = text or (d["text"], d["text_sha256"])
        measured = measured or {k: v for k, v in d.get("measured", {}).items() if k != "git_commit"}
    names = ["full"] + [s for s in families if s in results]
    meta = common.run_metadata(args)
    meta.update(measured)
    if args.merge_only and args.run_command:
        meta["merge_command"], meta["command"] = meta["command"], args.run_command
        for key in ("git_commit", "python"):  # the merge's checkout and interpreter, not the measuring run's
            meta[f"merge_{key}"] = meta.pop(key, None)
    result = {"suite": "perplexity", "model": common.model_label(args.model, args.gguf_file),
              "text": text[0] if text else None, "text_sha256": text[1] if text else None, "tokens": args.tokens,
              "chunk": args.chunk, "windows": args.windows, "caches": names,
              "families": {n: families.get(n, "") for n in names}, "results": {n: results[n] for n in names},
              "failed": failed, "seconds": round(seconds, 1), "meta": meta}
    result["targets"] = targets({n: result["results"][n] for n in names if n != "full"})
    common.write_json(out / "perplexity.json", result)
    md = (f"# Frontier: {result['model']}, {result['text']}, {args.windows} x {args.tokens} tokens, chunk {args.chunk}, "
          f"{meta.get('device')}, {str(meta.get('date', ''))[:10]}\n\n"
          f"bits/value all-in (payload, pack metadata, per-token min/step, offsets, permutations, block tables, "
          f"uncompressed tail); the part columns are bits/value of each part (kvcomp only).\n\n"
          f"{table(result['results'], families)}\n\n"
          + (f"Failed: {failed}\n\n" if failed else "")
          + f"Command: `{result['meta']['command']}`\n\n"
          + targets_markdown(result["targets"]) + "\n")
    (out / "frontier.md").write_text(md, encoding="utf-8")
    print(md)
    return result


def run_share(specs: list[str], args: argparse.Namespace, out: Path) -> None:
    """Load the model and the windows, then run_specs."""
    model, tokenizer = common.load_model(args.model, args.gguf_file, args.device, args.dtype)
    text_name, text = common.load_text(args.text, min_words=args.tokens, order=common.PERPLEXITY_ORDER)
    windows = perplexity.token_windows(tokenizer, text, args.tokens, args.windows)
    meta = common.run_metadata(args)
    measured = {k: meta[k] for k in ("date", "device", "torch", "transformers") if k in meta}  # a carried copy has no git
    run_specs(model, windows, specs, args, out, {"text": text_name, "text_sha256": common.text_sha256(text),
                                                 "measured": measured}, log=lambda line: print(line, flush=True))


def run_workers(specs: list[str], args: argparse.Namespace, out: Path) -> None:
    """--workers processes on the same device, each with its own model and reference pass, taking the specs
    round-robin (so each starts with the most important ones): a small model leaves a GPU mostly idle while the
    host launches kernels. Their output goes to <out>/worker<i>.log."""
    import subprocess

    shares = [specs[i::args.workers] for i in range(args.workers)]
    procs = []
    for i, share in enumerate(s for s in shares if s):
        argv = [a for a in sys.argv[1:] if a != "--no-plot"]
        cmd = [sys.executable, "-m", "eval.frontier", *argv, "--workers", "1", "--no-plot",
               "--caches", ";".join(share)]
        log = open(out / f"worker{i}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    for p, log in procs:
        p.wait()
        log.close()


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(s, "") for s in args.caches.split(";") if s] if args.caches else DEFAULT_CACHES
    families = dict(pairs)
    for s in families:  # fail now on a bad spec, not after the reference pass
        common.parse_cache_spec(split_levers(s)[0])
    t0 = time.time()
    todo = [s for s in families if not _spec_file(out, s).exists()] if not args.merge_only else []
    if todo and args.workers > 1:
        run_workers(todo, args, out)
    elif todo:
        run_share(todo, args, out)
    merge(out, families, args, time.time() - t0)
    if not args.no_plot:
        from eval import plot_frontier

        title = f"{common.model_label(args.model, args.gguf_file)}, {args.text}, {args.windows} x {args.tokens} tokens"
        plot_frontier.main([str(out / "perplexity.json"), "--ppl-metric", "delta_nll,kl", "--out",
                            str(out / "frontier.png"), "--title", title])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(caches=None)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--text", default="pydoc")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="kvcomp's store and decode: Triton on CUDA (auto), or the PyTorch reference codec (torch)")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the device (see run_workers)")
    p.add_argument("--time-budget", type=float, default=3600,
                   help="seconds; no spec is started after this (the finished ones are kept)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--merge-only", action="store_true",
                   help="run nothing: merge the spec_*.json already in --out (e.g. copied back from a GPU run)")
    p.add_argument("--run-command", default=None,
                   help="--merge-only: the command that measured the specs (recorded as the command; the merge's own "
                        "as merge_command)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is None:
        args.out = "eval/results/frontier"
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
