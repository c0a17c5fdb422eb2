#!/usr/bin/env python
"""lm-eval (0.4.13) with kvcomp and the other cache specs: a registered model "hf-kvcomp" and a launcher.

Launcher (loads the model once, evaluates every cache on the same tasks and documents):

    python -m eval.lm_eval_model --model <hub id or dir> [--gguf-file F] --tasks kvcomp_fixture_gen,... \\
        --caches full,kvcomp --include-path eval/lm_eval_tasks --out runs/lm_eval [--limit N] \\
        [--num-fewshot K] [--batch-size 1] [--apply-chat-template] [--gen-kwargs '{"max_gen_toks": 64}'] \\
        [--metadata '{"context_repeat": 8}'] [--loglik-chunk 64]

    writes <out>/results.json (cache -> task -> metrics, plus bits_per_value and cache-use counters per cache),
    <out>/results.md, and <out>/<cache>/lm_eval_raw.json (lm-eval's own results object).

The stock lm-eval CLI with this model registered:

    python -m eval.lm_eval_model lm-eval --model hf-kvcomp \\
        --model_args pretrained=<dir>,cache=kvcomp,loglik_chunk=64 --tasks ... --include_path eval/lm_eval_tasks

    model_args: cache=<spec> (a cache spec of eval/common/specs.py, default kvcomp; lm-eval splits model_args
    at commas, so write the commas inside a spec as ';', e.g. cache=kvcomp:rel_k=0.1;rel_v=0.2, or pass
    --model_args as a JSON object), loglik_chunk=<tokens>,
    middle_truncation=True (keep head and tail of over-long prompts instead of HFLM's left truncation),
    plus every HFLM argument. A kvcomp cache sets attn_implementation="kvcomp".

How the cache is used:
  * generate_until: every generate() call gets a fresh cache of the spec (past_key_values=...).
  * loglikelihood / multiple_choice / loglikelihood_rolling: the scored sequence runs through a fresh cache too,
    in chunks of `loglik_chunk` tokens (default 64): each chunk is a forward pass that appends to the cache and
    attends over what the cache holds through the model's attention implementation, so every chunk after the
    first reads the compressed past (as decoding does). The stock HFLM does one cache-less forward pass, which
    never sees KV compression. loglik_chunk=0 keeps a single pass with the cache attached (a prefill on an empty
    cache is exact, so this measures nothing but the plumbing). `full` uses a DynamicCache on the same chunked
    path, so differences between caches come from the cache alone.
  * batch size 1 is the default (KIVI issue #18: left padding changes quantised-cache results).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from eval import common
from kvcomp_hf.compat import CACHE_KWARG, cache_kwargs

DEFAULT_LOGLIK_CHUNK = 64
TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"


@register_model("hf-kvcomp")
class KVCompLM(HFLM):
    """HFLM whose generate and loglikelihood calls run through a fresh cache of `cache` (a cache spec)."""

    def __init__(self, pretrained="", cache: str = "kvcomp", loglik_chunk: int | str = DEFAULT_LOGLIK_CHUNK,
                 middle_truncation: bool | str = False, **kwargs):
        spec = common.parse_cache_spec(str(cache))
        # set before HFLM.__init__, which may already call _model_call (batch_size="auto")
        self.cache_spec = spec
        self.loglik_chunk = int(loglik_chunk)
        self.middle_truncation = str(middle_truncation).lower() in ("1", "true", "yes")
        self.kv_stats: dict[str, Any] = {"generate_calls": 0, "loglik_calls": 0, "loglik_forward_passes": 0,
                                         "bpv_weighted_sum": 0.0, "bpv_tokens": 0}
        if isinstance(pretrained, str):
            if spec.kind == "kvcomp":
                kwargs.setdefault("attn_implementation", "kvcomp")
                import kvcomp_hf  # noqa: F401  (registers the attention implementation)
            if "gguf_file" not in kwargs or not kwargs.get("gguf_file"):
                gguf = common.detect_gguf_file(pretrained) if Path(pretrained).is_dir() else None
                if gguf:
                    kwargs["gguf_file"] = gguf
        super().__init__(pretrained=pretrained, **kwargs)
        if spec.kind == "kvcomp":
            self._ensure_kvcomp_attention()

    def _ensure_kvcomp_attention(self) -> None:
        import kvcomp_hf  # noqa: F401

        cfg = self.model.config
        impl = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "_attn_implementation", None)
        if impl != "kvcomp":
            self.model.set_attn_implementation("kvcomp")

    # -- bookkeeping ------------------------------------------------------------------------------

    def _new_cache(self, max_cache_len: int):
        return common.make_cache(self.cache_spec, self.model, max_cache_len=max_cache_len)

    def _record(self, cache, tokens: int) -> None:
        """Accumulate bits/value weighted by tokens: the cache's own report, else the spec's estimate."""
        bpv = None
        if cache is not None and hasattr(cache, "memory_report"):
            try:
                bpv = common.cache_bits_per_value(cache)
            except Exception:  # noqa: BLE001 - a measurement must not stop the evaluation
                bpv = None
        if bpv is None:
            bpv = common.cache_bits_per_value(self.cache_spec, self.model, tokens=tokens)
        if bpv is not None and tokens > 0:
            self.kv_stats["bpv_weighted_sum"] += float(bpv) * tokens
            self.kv_stats["bpv_tokens"] += tokens

    @property
    def bits_per_value(self) -> float | None:
        n = self.kv_stats["bpv_tokens"]
        return round(self.kv_stats["bpv_weighted_sum"] / n, 4) if n else None

    # -- truncation -------------------------------------------------------------------------------

    def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
        """middle_truncation=True: keep the first half and the last half of an over-long prompt's tokens
        (LongBench-style, but on the final, possibly chat-templated, prompt) instead of HFLM's left truncation."""
        if not (self.middle_truncation and left_truncate_len):
            return super().tok_batch_encode(strings, padding_side=padding_side, left_truncate_len=left_truncate_len,
                                            truncation=truncation)
        ids, mask = super().tok_batch_encode(strings, padding_side=padding_side, left_truncate_len=None,
                                             truncation=truncation)
        if ids.shape[1] <= left_truncate_len:
            return ids, mask
        rows = []
        for row, m in zip(ids, mask):
            real = row[m.bool()]
            if real.numel() > left_truncate_len:
                head = left_truncate_len // 2
                real = torch.cat([real[:head], real[real.numel() - (left_truncate_len - head):]])
            rows.append(real)
        width = max(r.numel() for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        new_ids = torch.full((len(rows), width), pad, dtype=ids.dtype)
        new_mask = torch.zeros((len(rows), width), dtype=mask.dtype)
        for i, r in enumerate(rows):
            sl = slice(width - r.numel(), width) if padding_side == "left" else slice(0, r.numel())
            new_ids[i, sl] = r
            new_mask[i, sl] = 1
        return new_ids, new_mask

    # -- generation -------------------------------------------------------------------------------

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        cache = self._new_cache(max_length)
        if cache is not None:
            generation_kwargs[CACHE_KWARG] = cache
        if self.cache_spec.kind == "static":
            generation_kwargs["disable_compile"] = self.cache_spec.variant != "compiled"
        with common.sdpa_backends(self.cache_spec):
            out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        self.kv_stats["generate_calls"] += 1
        self._record(cache, int(out.shape[1]) * int(out.shape[0]))
        return out

    # -- loglikelihood ----------------------------------------------------------------------------

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if attn_mask is not None or labels is not None:  # seq2seq path: unchanged
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        from transformers import DynamicCache

        cache = self._new_cache(inps.shape[1])
        if cache is None:
            cache = DynamicCache(config=self.model.config)
        chunk = self.loglik_chunk if self.loglik_chunk > 0 else inps.shape[1]
        logits = []
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None), \
                common.sdpa_backends(self.cache_spec):
            for start in range(0, inps.shape[1], chunk):
                out = self.model(input_ids=inps[:, start:start + chunk], **cache_kwargs(cache), use_cache=True)
                logits.append(out.logits)
                self.kv_stats["loglik_forward_passes"] += 1
        self.kv_stats["loglik_calls"] += 1
        self._record(None if self.cache_spec.kind == "full" else cache, int(inps.numel()))
        return torch.cat(logits, dim=1)


# ============================================================================================= launcher

def _parse_json_arg(text: str | None) -> dict | None:
    if not text:
        return None
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    out: dict[str, Any] = {}
    for item in text.split(","):
        k, v = item.split("=", 1)
        out[k.strip()] = common.parse_value(v.strip())
    return out


def _metrics_of(results: dict) -> dict[str, dict[str, Any]]:
    """lm-eval's results[task] minus its bookkeeping keys: {task: {"acc,none": 0.5, ...}}."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {k: v for k, v in metrics.items() if k != "alias" and not isinstance(v, str)}
    return out


def run(args: argparse.Namespace, model=None, tokenizer=None) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    common.set_seed(args.seed)
    specs = common.parse_cache_list(args.caches)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    include = [str(Path(p)) for p in (args.include_path or [])]
    if model is None:
        model, tokenizer = common.load_model(args.model, args.gguf_file, args.device, args.dtype)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = _parse_json_arg(args.metadata)
    gen_kwargs = _parse_json_arg(args.gen_kwargs)
    summary: dict[str, Any] = {"model": common.model_label(args.model or "", args.gguf_file), "tasks": tasks,
                               "caches": [s.name for s in specs], "results": {}, "bits_per_value": {},
                               "kv_dtype": common.kv_dtype(model),
                               "cache_use": {}, "meta": common.run_metadata(args)}
    # indexing lm-eval's ~thousands of built-in task files takes seconds: once for all caches (or skip them)
    task_manager = TaskManager(include_path=include or None, include_defaults=not args.only_include_path,
                               metadata=metadata)
    for spec in specs:
        batch_size = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
        lm = KVCompLM(pretrained=model, tokenizer=tokenizer, cache=spec.name, loglik_chunk=args.loglik_chunk,
                      batch_size=batch_size, max_length=args.max_length, middle_truncation=args.middle_truncation)
        res = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=task_manager,
            apply_chat_template=args.apply_chat_template, gen_kwargs=gen_kwargs, log_samples=args.log_samples,
            random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
            fewshot_random_seed=args.seed, metadata=metadata, bootstrap_iters=0)
        if res is None:
            continue
        cache_dir = out_dir / common_dirname(spec.name)
        common.write_json(cache_dir / "lm_eval_raw.json",
                          json.loads(json.dumps(res, default=handle_non_serializable, ensure_ascii=False)))
        summary["results"][spec.name] = _metrics_of(res)
        summary["bits_per_value"][spec.name] = lm.bits_per_value
        summary["cache_use"][spec.name] = {k: v for k, v in lm.kv_stats.items() if not k.startswith("bpv_")}
    common.write_json(out_dir / "results.json", summary)
    (out_dir / "results.md").write_text(render_markdown(summary), encoding="utf-8")
    return summary


def common_dirname(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name.replace("=", "-")).strip("_") or "cache"


def render_markdown(summary: dict[str, Any]) -> str:
    caches = summary["caches"]
    rows: list[tuple[str, str]] = []
    for c in caches:
        for task, metrics in summary["results"].get(c, {}).items():
            for m in metrics:
                if "_stderr" in m:
                    continue
                if (task, m) not in rows:
                    rows.append((task, m))
    lines = [f"# lm-eval: {summary['model']}", "", "| task | metric | " + " | ".join(caches) + " |",
             "|---|---|" + "---:|" * len(caches)]
    for task, m in rows:
        cells = []
        for c in caches:
            v = summary["results"].get(c, {}).get(task, {}).get(m)
            cells.append(f"{v:.4f}" if isinstance(v, (int, float)) else "–")
        lines.append(f"| {task} | {m} | " + " | ".join(cells) + " |")
    bpv = summary["bits_per_value"]
    lines += ["", f"| {common.bits_header(summary.get('kv_dtype'))} | "
              + " | ".join("–" if bpv.get(c) is None else f"{bpv[c]:.2f}" for c in caches)
              + " |", "|---|" + "---:|" * len(caches), ""]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--tasks", required=True, help="comma list of lm-eval task or group names")
    p.add_argument("--include-path", action="append", default=None,
                   help=f"extra task directory (repeatable); the fixture tasks live in {TASKS_DIR}")
    p.add_argument("--only-include-path", action="store_true",
                   help="load only the tasks under --include-path, not lm-eval's built-in ones (faster start)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", default=1, help="lm-eval batch size (default 1)")
    p.add_argument("--max-length", type=int, default=None, help="HFLM max_length (context window used by lm-eval)")
    p.add_argument("--apply-chat-template", action="store_true")
    p.add_argument("--gen-kwargs", default=None, help="k=v,... or a JSON object, merged into generation_kwargs")
    p.add_argument("--metadata", default=None, help="JSON object passed to the tasks (e.g. RULER lengths)")
    p.add_argument("--loglik-chunk", type=int, default=DEFAULT_LOGLIK_CHUNK,
                   help="tokens per forward pass when scoring through the cache (0 = one pass)")
    p.add_argument("--middle-truncation", action="store_true",
                   help="truncate over-long generation prompts in the middle (head + tail) instead of on the left")
    p.add_argument("--log-samples", action="store_true", help="keep per-sample outputs in lm_eval_raw.json")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "lm-eval":  # the stock CLI, with hf-kvcomp registered
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm-eval"] + argv[1:]
        cli_evaluate()
        return None
    args = build_parser().parse_args(argv)
    if not args.out:
        raise SystemExit("--out is required")
    summary = run(args)
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    return summary


if __name__ == "__main__":
    main()
