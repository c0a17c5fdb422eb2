"""Generation for the evaluation scripts: chat prompts, stop tokens, greedy decoding with a fresh cache of a
spec, and the one timed generate() the speed benchmarks share (time to first token and decode speed)."""

from __future__ import annotations

import time
from typing import Any, Iterable

import torch

from eval.common.accounting import cache_report
from eval.common.specs import CacheSpec, make_cache, parse_cache_spec, sdpa_backends
from kvcomp_hf.compat import CACHE_KWARG


def chat_prompt_ids(tokenizer, prompt: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of a user message, through the chat template when the tokenizer has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return list(ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def eos_ids(tokenizer, model=None) -> list[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        eid = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eid, int):
            ids.add(eid)
        elif isinstance(eid, (list, tuple)):
            ids.update(int(i) for i in eid)
    for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if hasattr(tokenizer, "convert_tokens_to_ids") else None
        if isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None):
            ids.add(tid)
    return sorted(ids)


@torch.no_grad()
def greedy_generate(model, tokenizer, input_ids: list[int] | torch.Tensor, max_new_tokens: int,
                    spec: str | CacheSpec = "full", stop_ids: Iterable[int] | None = None,
                    min_new_tokens: int = 0) -> tuple[str, dict]:
    """Greedy decode with a fresh cache of `spec`; returns (text, info) where info has the cache report."""
    spec = parse_cache_spec(spec)
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    input_ids = input_ids.to(model.device)
    cache = make_cache(spec, model, max_cache_len=int(input_ids.shape[1]) + max_new_tokens)
    stop = list(stop_ids) if stop_ids is not None else eos_ids(tokenizer, model)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  attention_mask=torch.ones_like(input_ids), use_cache=True,
                                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
                                  (stop[0] if stop else 0))
    if stop:
        kwargs["eos_token_id"] = stop
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if cache is not None:
        kwargs[CACHE_KWARG] = cache
    if spec.kind == "static":
        kwargs["disable_compile"] = spec.variant != "compiled"
    with sdpa_backends(spec):
        out = model.generate(input_ids, **kwargs, temperature=None, top_p=None, top_k=None)
    new = out[0, input_ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    info = {"prompt_tokens": int(input_ids.shape[1]), "new_tokens": int(new.numel()),
            "cache": cache_report(cache, int(out.shape[1]), model)}
    return text, info


# --------------------------------------------------------------------------------------------- timing


class StepTimer:
    """A generate() streamer that records the host clock at each put (the prompt, then every token).
    generate copies each token to the host before put, so each stamp follows a device sync."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def synchronize(devices: Iterable[torch.device | str | int]) -> None:
    """Wait for every CUDA device in `devices` (CPU entries are skipped)."""
    for d in devices:
        if torch.device(d).type == "cuda":
            torch.cuda.synchronize(d)


def timed_generate(model, ids: torch.Tensor, devices: Iterable = (), **generate_kwargs) -> tuple[Any, dict]:
    """model.generate(ids, streamer=<StepTimer>, **generate_kwargs) between two syncs of `devices`.

    Returns (generate's output, timing): ttft_s = call start to the first token on the host (prefill and the
    first sampling); the decode figures cover the remaining tokens: decode_tok_s counts every sequence of the
    batch (batch x steps / decode seconds), decode_ms_per_step is the mean step, _median the median gap.
    """
    devices = list(devices)
    timer = StepTimer()
    synchronize(devices)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, streamer=timer, **generate_kwargs)
    synchronize(devices)
    t_end = time.perf_counter()
    stamps = timer.stamps  # [prompt, token 1, ..., token n]
    steps = len(stamps) - 2
    gaps = [b - a for a, b in zip(stamps[1:-1], stamps[2:])]
    decode_s = stamps[-1] - stamps[1] if steps > 0 else None
    batch = ids.shape[0]
    timing = {"ttft_s": round((stamps[1] if len(stamps) > 1 else t_end) - t0, 4),
              "decode_steps": max(steps, 0),
              "decode_tok_s": round(batch * steps / decode_s, 2) if decode_s else None,
              "decode_ms_per_step": round(1e3 * decode_s / steps, 3) if decode_s else None,
              "decode_ms_per_step_median": round(1e3 * sorted(gaps)[len(gaps) // 2], 3) if gaps else None,
              "total_s": round(t_end - t0, 3)}
    return out, timing
