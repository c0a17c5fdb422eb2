"""What a cache costs: bits per stored K/V value (everything included) and the bytes its tensors occupy."""

from __future__ import annotations

from typing import Any

import torch

from eval.common.specs import CacheSpec, parse_cache_spec


def kv_dtype(model) -> str | None:
    """The dtype a full cache stores this model's K/V in (its own dtype), e.g. "bfloat16"; None without a model."""
    dtype = getattr(model, "dtype", None)
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else None


def kv_bits(model=None) -> int:
    """Bits of one K/V value in a full cache of this model; 16 when no model is given."""
    name = kv_dtype(model)
    return torch.finfo(getattr(torch, name)).bits if name else 16


def bits_header(dtype: str | None) -> str:
    """The bits/value column header. Every cache of a run is counted in the run's K/V dtype (a compressed
    cache's residual and scales too), so the full cache is that dtype's width; the header says which."""
    if not dtype:
        return "bits/value"
    return f"bits/value ({dtype} K/V: full = {torch.finfo(getattr(torch, dtype)).bits})"


def _stored_bits(cache) -> int | None:
    """Bits per value of a plain transformers cache (DynamicCache): the element size of its keys."""
    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.numel():
            return 8 * keys.element_size()
    return None


def cache_bits_per_value(cache_or_spec, model=None, tokens: int | None = None) -> float | None:
    """Bits per stored K/V value, everything included, in the K/V dtype of the run (see bits_header).

    A cache object with memory_report() (KVCompCache, KIVICache) reports what it actually holds, its
    residual and scales in the dtype the model gave it. A spec (or None = full cache) is estimated
    analytically: full = the model dtype's bits (16 without a model); kivi needs `tokens` (the residual
    window matters); kvcomp without a cache object: None (data dependent).
    """
    if cache_or_spec is None:
        return float(kv_bits(model))
    if hasattr(cache_or_spec, "memory_report") or type(cache_or_spec).__name__ == "QuantizedCache":
        bpv = cache_report(cache_or_spec).get("bits_per_value")
        return float(bpv) if bpv is not None else None
    if isinstance(cache_or_spec, (str, CacheSpec)):
        spec = parse_cache_spec(cache_or_spec)
        if spec.kind in ("full", "static"):
            return float(kv_bits(model))
        if spec.kind == "kivi":
            from eval.baselines import kivi_bits_per_value

            head_dim = None
            if model is not None:
                cfg = model.config if hasattr(model, "config") else model
                head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            return kivi_bits_per_value(spec.nbits, tokens=tokens or 4096, head_dim=head_dim or 128,
                                       fp_bits=kv_bits(model))
        if spec.kind == "hf-quant":
            # int payload + scale and zero per group of 64 (both K and V), residual ignored at long length
            return spec.nbits + 2 * kv_bits(model) / 64
        return None
    # a plain transformers cache without a report: full precision
    return float(_stored_bits(cache_or_spec) or kv_bits(model))


def cache_report(cache, tokens: int | None = None, model=None) -> dict[str, Any]:
    """memory_report() of a cache when it has one; for the default cache (an object, or None) its full-precision
    bits, from its keys or else the model's dtype."""
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
    return {"bits_per_value": float(_stored_bits(cache) or kv_bits(model)), "tokens": tokens}


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
