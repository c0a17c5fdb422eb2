"""Calibrate a kvcomp preset for a model: the most compressive config within an accuracy budget.

1. Perplexity screen: every (rel_k, rel_v, pack_size, repack) of the grid is teacher-forced through the cache over
   --ppl-tokens tokens of real text (eval/perplexity.py), beside the full cache; a config passes when its NLL
   increase is at most --max-nll-increase nats (default 0.02).
2. Synthetic check: configs that pass, fewest bits/value first, run the RULER-style synthetic suite
   (eval/synthetic.py) at --lengths; the first whose average score is within --max-score-drop percent (relative,
   default 1%) of the full cache's on every length is chosen.
3. configs/<name>.yaml is written: `config:` (KVCompConfig fields), `calibrated: true`, and the provenance
   (measured numbers of the full cache and of the choice, the screened grid, command, text data, date).

    python -m eval.calibrate --model meta-llama/Llama-3.1-8B-Instruct --name llama-3.1-8b-instruct \\
        --lengths 4096,8192 --samples 20 --out eval/results/calib-llama31

Work files (perplexity grid, synthetic predictions) go to --out and are reused when the command is re-run.

Quick mode (--quick): minutes on one GPU or a CPU. A grid of rotated configs (rotation="hadamard", per-token
scales) is screened by eval/fakequant.py (one forward pass per config and window, --ppl-windows windows of
--ppl-tokens tokens, default 2 x 2048); the config with the fewest bits/value all-in (at --bits-at tokens)
whose NLL increase is within budget is written, with its provenance. No synthetic check.

    python -m eval.calibrate --quick --model meta-llama/Llama-3.1-8B-Instruct --name llama-3.1-8b-instruct

From frontier runs (--from-frontier, a comma list of eval/frontier.py's perplexity.json, e.g. one per text): the
kvcomp config with the fewest bits/value all-in whose NLL increase is within --max-nll-increase in every run is
written, with the runs' provenance. No model is loaded. The budget may name a cache of the runs: `kivi4` means at
most KIVI-4's NLL increase in each run.

    python -m eval.calibrate --from-frontier eval/results/frontier-smollm2-8k/perplexity.json \
        --max-nll-increase 0.01 --name smollm2-135m-instruct --model-id HuggingFaceTB/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

from eval import common, perplexity, synthetic

CONFIGS_DIR = common.REPO_ROOT / "configs"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.\-]+", "-", name.lower()).strip("-")


def grid_specs(rel_ks, rel_vs, packs, repacks, base: dict[str, Any] | None = None) -> list[common.CacheSpec]:
    specs = []
    for rk, rv, pk, rp in itertools.product(rel_ks, rel_vs, packs, repacks):
        body = f"rel_k={rk},rel_v={rv},pack_size={pk},repack={rp}"
        for key, val in (base or {}).items():
            body += f",{key}={val}"
        specs.append(common.parse_cache_spec(f"kvcomp:{body}"))
    return specs


def config_of(spec: common.CacheSpec) -> dict[str, Any]:
    return spec.kvcomp_config().to_dict()


def screen_perplexity(model, tokenizer, specs, args, work: Path) -> dict[str, dict[str, Any]]:
    """NLL increase, KL, top-1 and bits/value of every spec vs the full cache (cached in work/ppl_grid.jsonl)."""
    store = common.ResumableJsonl(work / "ppl_grid.jsonl", key="cache")
    text_name, text = common.load_text(args.text, min_words=args.ppl_tokens, order=common.PERPLEXITY_ORDER)
    windows = perplexity.token_windows(tokenizer, text, args.ppl_tokens, args.ppl_windows)
    full = common.parse_cache_spec("full")
    todo = [sp for sp in specs if sp.name not in store]
    for i in range(0, len(todo), args.ppl_batch):
        batch = todo[i:i + args.ppl_batch]
        per_window = [perplexity.evaluate_window(model, ids, [full] + batch, args.ppl_chunk,
                                                 progress_desc=f"ppl grid {i + len(batch)}/{len(todo)}")
                      for ids in windows]
        res = perplexity.summarise(per_window, ["full"] + [sp.name for sp in batch])
        if "full" not in store:
            store.append({"cache": "full", **{k: v for k, v in res["full"].items() if k != "cache_report"}})
        for sp in batch:
            r = res[sp.name]
            store.append({"cache": sp.name, "config": config_of(sp), "nll": r["nll"], "perplexity": r["perplexity"],
                          "delta_nll": r["delta_nll"], "kl": r["kl"], "top1_agreement": r["top1_agreement"],
                          "bits_per_value": r["bits_per_value"]})
    if "full" not in store:  # every spec was cached but not the reference (cannot happen unless edited)
        raise RuntimeError(f"{work / 'ppl_grid.jsonl'} lacks the full-cache row; delete it and re-run")
    out = {r["cache"]: r for r in store.records}
    out["_data"] = {"text": text_name, "text_sha256": common.text_sha256(text), "tokens": args.ppl_tokens,
                    "windows": len(windows), "chunk": args.ppl_chunk}
    return out


def synthetic_scores(model, tokenizer, suite, samples, spec, preds, tasks, lengths) -> dict[str, float]:
    records = synthetic.run_samples(model, tokenizer, suite, samples, [spec], preds, desc=f"synthetic {spec.name}")
    agg = synthetic.aggregate(records, [spec.name], tasks, lengths)
    return {L: agg["scores"][spec.name][L]["avg"] for L in agg["scores"][spec.name]}


def within_budget(scores: dict[str, float], full: dict[str, float], max_drop_pct: float) -> bool:
    for L, ref in full.items():
        got = scores.get(L)
        if got is None:
            return False
        if ref > 0 and (ref - got) / ref * 100 > max_drop_pct:
            return False
        if ref == 0 and got < 0:
            return False
    return True


def write_preset(path: Path, chosen: dict[str, Any], provenance: dict[str, Any], model_id: str) -> None:
    import yaml

    header = (f"# kvcomp preset for {model_id}, calibrated by eval/calibrate.py.\n"
              f"# Re-generate with:\n#   {provenance['command']}\n")
    provenance = json.loads(json.dumps(provenance, default=str))  # plain types only in the YAML
    chosen = json.loads(json.dumps(chosen, default=str))
    doc = {"calibrated": True, "model": model_id,
           "source": "eval/calibrate.py: most compressive config within the accuracy budget "
                     f"(perplexity NLL increase <= {_nats(provenance['budget']['max_nll_increase'])}, "
                     + (f"synthetic score drop <= {provenance['budget']['max_score_drop_pct']}% relative)"
                        if provenance["budget"]["max_score_drop_pct"] is not None else "no synthetic check)"),
           "config": chosen, "provenance": provenance}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False, width=120), encoding="utf-8")


def _nats(budget: float | str) -> str:
    return f"{budget} nats" if isinstance(budget, (int, float)) else budget


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


# rotated, with the default's sink tokens; around the SmolLM2 frontier (eval/results/frontier-smollm2-8k)
QUICK_GRID = [(0.12, 0.3), (0.1, 0.3), (0.08, 0.3), (0.08, 0.25), (0.07, 0.2), (0.0666667, 0.142857), (0.06, 0.2),
              (0.05, 0.15), (0.05, 0.1), (0.035, 0.07)]


def run_quick(args: argparse.Namespace) -> dict[str, Any]:
    """Fake-quantisation screen of QUICK_GRID (rotated, per-token scales); writes the preset."""
    from eval import fakequant

    model_id = args.model_id or common.model_label(args.model, args.gguf_file)
    name = args.name or slug(model_id.split("/")[-1])
    output = Path(args.output) if args.output else CONFIGS_DIR / f"{name}.yaml"
    model, tokenizer = common.load_model(args.model, args.gguf_file, args.device, args.dtype)
    text_name, text = common.load_text(args.text, min_words=args.ppl_tokens, order=common.PERPLEXITY_ORDER)
    windows = perplexity.token_windows(tokenizer, text, args.ppl_tokens, args.ppl_windows)
    specs = {f"kvcomp:rel_k={k},rel_v={v},rotation=hadamard,granularity=token": (k, v) for k, v in QUICK_GRID}
    res = fakequant.evaluate(model, windows, list(specs), args.bits_at)
    ok = [s for s in specs if res[s]["delta_nll"] <= args.max_nll_increase]
    meta = common.run_metadata(args)
    result = {"model": model_id, "name": name, "quick": True, "results": res, "meta": meta}
    if not ok:
        print("no config of the quick grid meets the budget; run the full calibration", file=sys.stderr)
        return result
    best = min(ok, key=lambda s: res[s]["bits_per_value"])
    chosen = common.parse_cache_spec(best).kvcomp_config().to_dict()
    provenance = {
        "command": meta["command"], "date": datetime.date.today().isoformat(), "device": meta["device"],
        "torch": meta["torch"], "transformers": meta["transformers"], "git_commit": meta.get("git_commit"),
        "method": "eval/calibrate.py --quick: eval/fakequant.py screen (no synthetic check)",
        "budget": {"max_nll_increase": args.max_nll_increase, "max_score_drop_pct": None},
        "data": {"perplexity": {"text": text_name, "text_sha256": common.text_sha256(text),
                                "tokens": args.ppl_tokens, "windows": len(windows)}},
        "measured": {"chosen": {"bits_per_value_at": args.bits_at, **{k: _round(res[best][k], 4) for k in
                                ("bits_per_value", "delta_nll", "kl", "top1_agreement")}}},
        "grid": [{"rel_k": specs[s][0], "rel_v": specs[s][1], "bits_per_value": _round(res[s]["bits_per_value"]),
                  "delta_nll": _round(res[s]["delta_nll"], 4), "kl": _round(res[s]["kl"], 4)} for s in specs],
    }
    write_preset(output, chosen, provenance, model_id)
    result["chosen"] = best
    print(f"chosen {best}: {res[best]['bits_per_value']:.3f} bits/value at {args.bits_at} tokens, "
          f"dNLL {res[best]['delta_nll']:+.4f}; wrote {output}")
    return result


def _nll_budget(text: str) -> float | str:
    """--max-nll-increase: nats, or the name of a cache measured in the same frontier run (e.g. kivi4)."""
    try:
        return float(text)
    except ValueError:
        return text


def run_from_frontier(args: argparse.Namespace) -> dict[str, Any]:
    """The fewest-bits kvcomp config within budget on every one of the eval/frontier.py runs given (e.g. one per
    text); writes the preset. Its bits/value and NLL increase are the largest over the runs."""
    paths = [Path(p) for p in args.from_frontier.split(",")]
    runs = [json.loads(p.read_text()) for p in paths]
    budget = args.max_nll_increase
    per_run = []  # {config: result} of each run's kvcomp configs within budget
    for path, run_ in zip(paths, runs):
        if run_.get("suite") != "perplexity":
            raise ValueError(f"--from-frontier needs eval/frontier.py's perplexity.json, got suite "
                             f"{run_.get('suite')!r} in {path}")
        if isinstance(budget, str) and run_["results"].get(budget, {}).get("delta_nll") is None:
            raise ValueError(f"--max-nll-increase {budget!r} is no number and no cache measured in {path} "
                             f"(measured: {sorted(run_['results'])})")
        limit = run_["results"][budget]["delta_nll"] if isinstance(budget, str) else budget
        per_run.append({c: r for c, r in run_["results"].items()  # per-layer levers ("|edge=...") are no config
                        if c.startswith("kvcomp") and "|" not in c and r.get("delta_nll") is not None
                        and r["delta_nll"] <= limit})
    ok = [c for c in per_run[0] if all(c in rows for rows in per_run)]
    if not ok:
        raise ValueError(f"no kvcomp config has an NLL increase <= {budget} in every one of {args.from_frontier}")
    worst = {c: {k: max(rows[c][k] for rows in per_run) for k in ("bits_per_value", "delta_nll")} for c in ok}
    # bits within 0.01 of each other are equal (e.g. fixed V fields at two rels of one width: the values the cache
    # feeds later layers move K's pack widths by ~0.0003 bits/value): the more accurate of them
    best = min(ok, key=lambda c: (round(worst[c]["bits_per_value"], 2), worst[c]["delta_nll"]))
    model_id = args.model_id or runs[0].get("model") or "model"
    name = args.name or slug(model_id.split("/")[-1])
    output = Path(args.output) if args.output else CONFIGS_DIR / f"{name}.yaml"
    chosen = common.parse_cache_spec(best).kvcomp_config().to_dict()
    meta = common.run_metadata(args)

    def measured_by(path, run_):
        return {"file": path.as_posix(), **{k: run_.get("meta", {}).get(k) for k in
                                            ("command", "date", "device", "torch", "transformers")}}

    def data(path, run_):
        return {k: run_.get(k) for k in ("text", "text_sha256", "tokens", "windows", "chunk")}

    def grid(path, run_):
        rows = {c: r for c, r in run_["results"].items() if r.get("delta_nll") is not None}
        return [{"cache": c, "bits_per_value": _round(r["bits_per_value"]), "delta_nll": _round(r["delta_nll"], 4),
                 "kl": _round(r.get("kl"), 4)} for c, r in sorted(rows.items(), key=lambda kv: kv[1]["bits_per_value"])]

    def chosen_row(path, run_):
        return {k: _round(run_["results"][best].get(k), 4)
                for k in ("bits_per_value", "delta_nll", "kl", "top1_agreement")}

    def each(part):  # a list over the runs; one run keeps the shape of the presets written before
        got = [part(p, r) for p, r in zip(paths, runs)]
        return got[0] if len(got) == 1 else got

    provenance = {
        "command": meta["command"], "date": datetime.date.today().isoformat(),
        "method": "eval/calibrate.py --from-frontier: fewest bits/value among the kvcomp configs within budget in "
                  + ("" if len(runs) == 1 else "every one of ") + ", ".join(p.as_posix() for p in paths),
        "measured_by": each(measured_by),
        "budget": {"max_nll_increase": budget if not isinstance(budget, str) else f"{budget}'s in the same run",
                   "max_score_drop_pct": None},
        "data": {"perplexity": each(data)}, "measured": {"chosen": each(chosen_row)}, "grid": each(grid),
    }
    write_preset(output, chosen, provenance, model_id)
    print(f"chosen {best}: {worst[best]['bits_per_value']:.3f} bits/value, dNLL {worst[best]['delta_nll']:+.4f} "
          f"(the largest over {len(runs)} run(s)); wrote {output}")
    return {"model": model_id, "name": name, "chosen": best, "config": chosen}


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.set_seed(args.seed)
    if args.from_frontier:
        return run_from_frontier(args)
    if args.quick:
        return run_quick(args)
    model_id = args.model_id or common.model_label(args.model, args.gguf_file)
    name = args.name or slug(model_id.split("/")[-1])
    work = Path(args.out or f"eval/results/calibrate-{name}")
    work.mkdir(parents=True, exist_ok=True)
    output = Path(args.output) if args.output else CONFIGS_DIR / f"{name}.yaml"
    specs = grid_specs(floats(args.rel_k), floats(args.rel_v), [int(x) for x in args.pack_sizes.split(",")],
                       args.repacks.split(","),
                       base={"granularity": args.granularity} if args.granularity else None)
    model, tokenizer = common.load_model(args.model, args.gguf_file, args.device, args.dtype)

    # 1. perplexity screen
    ppl = screen_perplexity(model, tokenizer, specs, args, work) if not args.skip_ppl else {}
    rows = []
    for sp in specs:
        r = ppl.get(sp.name, {})
        rows.append({"cache": sp.name, "config": config_of(sp), "bits_per_value": r.get("bits_per_value"),
                     "delta_nll": r.get("delta_nll"), "kl": r.get("kl"), "top1_agreement": r.get("top1_agreement"),
                     "ppl_ok": args.skip_ppl or (r.get("delta_nll") is not None
                                                 and r["delta_nll"] <= args.max_nll_increase)})
    # most compressive first: measured bits/value, else (no perplexity screen) the larger error bounds first
    rows.sort(key=lambda r: (r["bits_per_value"] if r["bits_per_value"] is not None else 99,
                             -(r["config"]["rel_k"] + r["config"]["rel_v"]), r["cache"]))

    # 2. synthetic check, most compressive first
    tasks = [t for t in args.tasks.split(",") if t]
    lengths = [int(x) for x in args.lengths.split(",") if x]
    chosen = None
    full_scores: dict[str, float] = {}
    syn_data: dict[str, Any] = {}
    if not args.skip_synthetic:
        suite = synthetic.SyntheticSuite(tokenizer, args.haystack, args.seed)
        samples = suite.samples(tasks, lengths, args.samples)
        preds = common.ResumableJsonl(work / "synthetic_predictions.jsonl", key=lambda r: (r["cache"], r["key"]))
        full_scores = synthetic_scores(model, tokenizer, suite, samples, common.parse_cache_spec("full"), preds,
                                       tasks, lengths)
        syn_data = {"haystack": suite.source_name, "haystack_sha256": suite.text_sha256, "tasks": tasks,
                    "lengths": lengths, "samples_per_task": args.samples, "seed": args.seed}
        tried = 0
        for row in rows:
            if not row["ppl_ok"]:
                continue
            if args.max_synthetic_tries and tried >= args.max_synthetic_tries:
                break
            tried += 1
            sp = common.parse_cache_spec(row["cache"])
            row["synthetic"] = synthetic_scores(model, tokenizer, suite, samples, sp, preds, tasks, lengths)
            row["synthetic_ok"] = within_budget(row["synthetic"], full_scores, args.max_score_drop)
            if row["synthetic_ok"]:
                chosen = row
                break
    else:
        chosen = next((r for r in rows if r["ppl_ok"]), None)

    result = {"model": model_id, "name": name, "rows": rows, "full": {"synthetic": full_scores,
              "perplexity": {k: v for k, v in ppl.get("full", {}).items() if k != "cache"}},
              "chosen": chosen, "kv_dtype": common.kv_dtype(model), "meta": common.run_metadata(args)}
    common.write_json(work / "calibration.json", result)
    if chosen is None:
        print("no config of the grid meets the budget; widen the grid towards smaller rel_k/rel_v", file=sys.stderr)
        return result

    provenance = {
        "command": result["meta"]["command"],
        "date": datetime.date.today().isoformat(),
        "device": result["meta"]["device"], "torch": result["meta"]["torch"],
        "transformers": result["meta"]["transformers"], "git_commit": result["meta"].get("git_commit"),
        "budget": {"max_nll_increase": args.max_nll_increase, "max_score_drop_pct": args.max_score_drop},
        "data": {"perplexity": ppl.get("_data"), "synthetic": syn_data or None},
        "measured": {
            "full": {"perplexity_nll": ppl.get("full", {}).get("nll"), "synthetic_avg": full_scores},
            "chosen": {"bits_per_value": chosen["bits_per_value"], "delta_nll": chosen["delta_nll"],
                       "kl": chosen["kl"], "top1_agreement": chosen["top1_agreement"],
                       "synthetic_avg": chosen.get("synthetic")},
        },
        "grid": [{"config": {k: r["config"][k] for k in ("rel_k", "rel_v", "pack_size", "repack")},
                  "bits_per_value": _round(r["bits_per_value"]), "delta_nll": _round(r["delta_nll"], 5),
                  **({"synthetic_avg": r["synthetic"]} if "synthetic" in r else {})} for r in rows],
    }
    write_preset(output, chosen["config"], provenance, model_id)
    print(f"chosen {chosen['cache']}: {chosen['bits_per_value']:.3f} bits/value, "
          f"dNLL {chosen['delta_nll'] if chosen['delta_nll'] is not None else float('nan'):+.4f}; wrote {output}")
    return result


def _round(x, nd=3):
    return None if x is None else round(float(x), nd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--name", default=None, help="preset name (configs/<name>.yaml); default: from the model name")
    p.add_argument("--model-id", default=None, help="model id recorded in the preset (default: from --model)")
    p.add_argument("--output", default=None, help="preset path (default configs/<name>.yaml)")
    p.add_argument("--budget", default=None,
                   help="shorthand 'score=<pct>,nll=<nats>' for --max-score-drop / --max-nll-increase")
    p.add_argument("--max-score-drop", type=float, default=1.0,
                   help="largest relative drop (percent) of the synthetic average at every length")
    p.add_argument("--max-nll-increase", type=_nll_budget, default=0.02,
                   help="largest perplexity NLL increase (nats); with --from-frontier also a cache of the runs, "
                        "e.g. kivi4: at most its NLL increase in each run")
    p.add_argument("--rel-k", default="0.025,0.05,0.1,0.15,0.2,0.3")
    p.add_argument("--rel-v", default="0.05,0.1,0.2,0.3,0.4")
    p.add_argument("--pack-sizes", default="16", help="comma list of 4, 8, 16")
    p.add_argument("--repacks", default="median", help="comma list of none, median")
    p.add_argument("--granularity", default=None, help="token | token_head (default: KVCompConfig's)")
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--ppl-windows", type=int, default=1)
    p.add_argument("--ppl-chunk", type=int, default=64)
    p.add_argument("--ppl-batch", type=int, default=8, help="grid configs evaluated in lockstep per pass")
    p.add_argument("--text", default="auto", help="perplexity text (see eval/perplexity.py)")
    p.add_argument("--haystack", default="auto", help="synthetic haystack text (see eval/synthetic.py)")
    p.add_argument("--tasks", default=",".join(synthetic.TASKS))
    p.add_argument("--lengths", default="4096,8192", help="synthetic lengths (the budget applies at each)")
    p.add_argument("--samples", type=int, default=20, help="synthetic samples per task and length")
    p.add_argument("--max-synthetic-tries", type=int, default=0,
                   help="stop after this many synthetic checks (0 = no limit)")
    p.add_argument("--skip-synthetic", action="store_true", help="choose on the perplexity budget alone")
    p.add_argument("--skip-ppl", action="store_true", help="choose on the synthetic budget alone")
    p.add_argument("--quick", action="store_true",
                   help="minutes: fake-quantisation screen of a rotated grid (--ppl-tokens 2048 --ppl-windows 2 "
                        "unless given), no synthetic check")
    p.add_argument("--bits-at", type=int, default=8192, help="--quick: context length bits/value are given at")
    p.add_argument("--from-frontier", default=None,
                   help="eval/frontier.py's perplexity.json: choose among its measured kvcomp configs (no model run)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.budget:
        for item in args.budget.split(","):
            key, _, val = item.partition("=")
            if key.strip() == "score":
                args.max_score_drop = float(val)
            elif key.strip() == "nll":
                args.max_nll_increase = _nll_budget(val)
            else:
                raise ValueError(f"--budget takes score=<pct>,nll=<nats>; got {item!r}")
    if isinstance(args.max_nll_increase, str) and not args.from_frontier:
        raise ValueError(f"--max-nll-increase takes nats (a number), got {args.max_nll_increase!r}; a cache's name "
                         "(e.g. kivi4) only with --from-frontier, whose runs measured it")
    if args.quick and "--ppl-tokens" not in (argv or sys.argv):
        args.ppl_tokens = 2048
    if args.quick and "--ppl-windows" not in (argv or sys.argv):
        args.ppl_windows = 2
    if args.skip_ppl and args.skip_synthetic:
        raise ValueError("--skip-ppl and --skip-synthetic together leave nothing to calibrate on")
    return args


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
