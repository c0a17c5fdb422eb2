"""What a cache costs: bits per stored K/V value (everything included) and the bytes its tensors occupy."""

from __future__ import annotations

from typing import Any

import torch

from eval.common.specs import CacheSpec, parse_cache_spec


def cache_bits_per_value(cache_or_spec, model=None, tokens: int | None = None) -> float | None:
    """Bits per stored K/V value, everything included.

    A cache object with memory_report() (KVCompCache, KIVICache) reports what it actually holds.
    A spec (or None = full cache) is estimated analytically: full = the model dtype's bits (16 for fp16/bf16,
    and also 16 when the model runs in fp32, because that is what a GPU deployment stores);
    kivi needs `tokens` (the residual window matters); kvcomp without a cache object: None (data dependent).
    """
    if cache_or_spec is None:
        return 16.0
    if hasattr(cache_or_spec, "memory_report") or type(cache_or_spec).__name__ == "QuantizedCache":
        bpv = cache_report(cache_or_spec).get("bits_per_value")
        return float(bpv) if bpv is not None else None
    if isinstance(cache_or_spec, (str, CacheSpec)):
        spec = parse_cache_spec(cache_or_spec)
        if spec.kind in ("full", "static"):
            return 16.0
        if spec.kind == "kivi":
            from eval.baselines import kivi_bits_per_value

            head_dim = None
            if model is not None:
                cfg = model.config if hasattr(model, "config") else model
                head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            return kivi_bits_per_value(spec.nbits, tokens=tokens or 4096, head_dim=head_dim or 128)
        if spec.kind == "hf-quant":
            # int payload + fp16 scale and zero per group of 64 (both K and V), residual ignored at long length
            return spec.nbits + 2 * 16 / 64
        return None
    # a plain transformers cache without a report: full precision
    return 16.0


def cache_report(cache, tokens: int | None = None) -> dict[str, Any]:
    """memory_report() of a cache when it has one; {"bits_per_value": 16} for the default cache."""
    if cache is not None and hasattr(cache, "memory_report"):
        try:
            rep = dict(cache.memory_report())
        except Exception as err:  # noqa: BLE001 - never lose a measurement over the report
            return {"error": repr(err)}
        return {k: (v if isinstance(v, (int, float, str, bool, dict, list, type(None))) else str(v))
                for k, v in rep.items()}
    if cache is not None and type(cache).__name__ == "QuantizedCache":
        from eval.baselines import hf_quantized_bits_per_value

        return {"bits_per_value": hf_quantized_bits_per_value(cache), "tokens": tokens}
    return {"bits_per_value": 16.0, "tokens": tokens}


def tensor_bytes(obj, seen: set, depth: int = 0) -> int:
    """Bytes of all tensors reachable from a cache layer (storages counted once)."""
    if depth > 4 or obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor and \
                not isinstance(obj, torch.nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen, depth + 1) for n in names)
        if obj.device.type == "meta":
            return 0
        key = (obj.untyped_storage().data_ptr(), obj.device)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x, seen, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x, seen, depth + 1) for x in obj.values())
    module = type(obj).__module__ or ""
    if hasattr(obj, "__dict__") and module.startswith(("kvcomp_hf", "transformers.cache_utils", "optimum", "hqq")):
        return sum(tensor_bytes(v, seen, depth + 1) for k, v in vars(obj).items()
                   if k not in ("model_config", "config"))
    return 0


def cache_numbers(cache, model, batch: int, tokens: int) -> dict:
    """cache_bytes: what the cache holds (kvcomp: memory_report, everything included); cache_alloc_bytes:
    the storage its tensors occupy (kvcomp's byte pool is sized for the worst case); bits/value."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = torch.finfo(model.dtype).bits // 8
    dense = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * head_dim * tokens * elem
    seen: set = set()
    alloc = sum(tensor_bytes(layer, seen) for layer in cache.layers) if cache is not None else 0
    out = {"dense_cache_bytes": dense, "cache_alloc_bytes": alloc}
    if hasattr(cache, "memory_report"):
        rep = cache.memory_report()
        out.update(cache_bytes=int(rep["compressed_bytes"]), bits_per_value=round(rep["bits_per_value"], 3),
                   compression_ratio=round(rep["compression_ratio"], 3))
    else:
        out.update(cache_bytes=alloc, bits_per_value=round(8 * elem * alloc / dense, 3) if dense else None,
                   compression_ratio=round(dense / alloc, 3) if alloc else None)
    return out
