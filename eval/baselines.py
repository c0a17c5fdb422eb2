"""Baseline KV caches to compare kvcomp against.

KIVICache: a KIVI-style (Liu et al., ICML 2024, arXiv 2402.02750) fake-quantised cache, written from the paper's
description: keys quantised per channel (min/max over groups of `group_size` tokens, per channel), values per
token (groups of `group_size` channels), asymmetric min-max integer quantisation at `nbits`, and a full-precision
residual: the most recent `residual_length` value tokens stay full precision; keys are quantised `residual_length`
tokens at a time (so between 0 and residual_length-1 of the most recent keys are full precision).
It stores the dequantised values densely (simulated quantisation: the accuracy is that of KIVI, the memory is not
actually saved) and reports the bits a real KIVI store would hold: `nbits` per quantised value plus one scale and one
zero per group, plus the full-precision residual, scales, zeros and residual counted in the model dtype (16 bits for
fp16/bf16, 32 bits for an fp32 CPU run), as kvcomp's memory_report counts its tail buffer.

hf-int2/hf-int4: transformers.QuantizedCache (quanto or hqq backend); see eval.common.make_cache.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

SCALE_BITS = 16  # one fp16 scale and one fp16 zero point per group (analytic estimates)
FP_BITS = 16     # the full-precision residual in a 16-bit deployment (analytic estimates)


def fake_quantize(x: torch.Tensor, nbits: int, dim: int) -> torch.Tensor:
    """Asymmetric min-max quantise-dequantise of x with one (scale, zero) per slice along `dim`.

    Every value is reconstructed within scale/2, scale = (max - min) / (2**nbits - 1) of its group.
    """
    xf = x.float()
    lo = xf.amin(dim=dim, keepdim=True)
    hi = xf.amax(dim=dim, keepdim=True)
    levels = (1 << nbits) - 1
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((xf - lo) / safe), 0, levels)
    return (q * scale + lo).to(x.dtype)


def quantize_keys_per_channel(k: torch.Tensor, nbits: int, group_size: int) -> torch.Tensor:
    """k: (..., T, D) with T a multiple of group_size; one (scale, zero) per channel per group of tokens."""
    *lead, t, d = k.shape
    if t % group_size:
        raise ValueError(f"key block of {t} tokens is not a multiple of group_size {group_size}")
    g = k.reshape(*lead, t // group_size, group_size, d)
    return fake_quantize(g, nbits, dim=-2).reshape(k.shape)


def quantize_values_per_token(v: torch.Tensor, nbits: int, group_size: int) -> torch.Tensor:
    """v: (..., T, D); one (scale, zero) per token per group of group_size channels."""
    *lead, t, d = v.shape
    gs = group_size if d % group_size == 0 else d
    g = v.reshape(*lead, t, d // gs, gs)
    return fake_quantize(g, nbits, dim=-1).reshape(v.shape)


def kivi_bits_per_value(nbits: int, tokens: int, head_dim: int = 128, group_size: int = 32,
                        residual_length: int = 128, fp_bits: int = FP_BITS) -> float:
    """Bits per K/V value of a KIVI store of `tokens` tokens (prefill of that length, nothing generated);
    scales, zeros and the residual are `fp_bits` wide."""
    qk = (tokens // residual_length) * residual_length
    qv = max(tokens - residual_length, 0)
    gs_v = group_size if head_dim % group_size == 0 else head_dim
    per_q_k = nbits + 2 * fp_bits / group_size
    per_q_v = nbits + 2 * fp_bits / gs_v
    bits = qk * per_q_k + (tokens - qk) * fp_bits + qv * per_q_v + (tokens - qv) * fp_bits
    return bits / (2 * tokens) if tokens else float(fp_bits)


class KIVILayer(DynamicLayer):
    """One layer of KIVICache; `keys`/`values` hold the dequantised store (what attention reads)."""

    def __init__(self, nbits: int = 2, group_size: int = 32, residual_length: int = 128, **kwargs):
        super().__init__()
        if nbits not in (1, 2, 3, 4, 8):
            raise ValueError(f"nbits must be one of 1, 2, 3, 4, 8, got {nbits}")
        if residual_length % group_size:
            raise ValueError(f"residual_length {residual_length} must be a multiple of group_size {group_size}")
        self.nbits = nbits
        self.group_size = group_size
        self.residual_length = residual_length
        self.n_quant_k = 0  # the first n_quant_k tokens of keys are quantised
        self.n_quant_v = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Attention sees the store as it was (quantised past + full-precision residual) plus the new tokens in
        full precision; afterwards the store quantises whatever has left the residual window."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        total = keys.shape[-2]
        new_qk = (total // self.residual_length) * self.residual_length
        new_qv = max(total - self.residual_length, 0)
        store_k, store_v = keys, values
        if new_qk > self.n_quant_k:
            store_k = keys.clone()
            store_k[..., self.n_quant_k:new_qk, :] = quantize_keys_per_channel(
                keys[..., self.n_quant_k:new_qk, :], self.nbits, self.group_size)
            self.n_quant_k = new_qk
        if new_qv > self.n_quant_v:
            store_v = values.clone()
            store_v[..., self.n_quant_v:new_qv, :] = quantize_values_per_token(
                values[..., self.n_quant_v:new_qv, :], self.nbits, self.group_size)
            self.n_quant_v = new_qv
        self.keys, self.values = store_k, store_v
        return keys, values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        n = self.get_seq_length()
        # tokens that were quantised stay quantised; a re-grown key block is quantised again from its start
        self.n_quant_k = min(self.n_quant_k, (n // self.residual_length) * self.residual_length)
        self.n_quant_v = min(self.n_quant_v, n)

    def memory(self) -> dict[str, Any]:
        if not self.is_initialized or self.keys.numel() == 0:
            return {"k": (0, 0), "v": (0, 0), "values_per_token": 0}
        b, h, t, d = self.keys.shape
        per_tok = b * h * d
        fp = 8 * self.keys.element_size()
        gs_v = self.group_size if d % self.group_size == 0 else d
        k_bits = self.n_quant_k * per_tok * (self.nbits + 2 * fp / self.group_size) + (t - self.n_quant_k) * per_tok * fp
        v_bits = self.n_quant_v * per_tok * (self.nbits + 2 * fp / gs_v) + (t - self.n_quant_v) * per_tok * fp
        return {"k": (k_bits, t * per_tok), "v": (v_bits, t * per_tok), "tokens": t, "fp_bits": fp}


class KIVICache(Cache):
    """KIVI-style fake-quantised KV cache (see the module docstring). One per sequence."""

    def __init__(self, config=None, nbits: int = 2, group_size: int = 32, residual_length: int = 128,
                 num_layers: int | None = None):
        if num_layers is None:
            if config is None:
                raise ValueError("KIVICache needs a model config or num_layers")
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            num_layers = text.num_hidden_layers
        self.nbits, self.group_size, self.residual_length = nbits, group_size, residual_length
        super().__init__(layers=[KIVILayer(nbits, group_size, residual_length) for _ in range(num_layers)])

    def memory_report(self) -> dict[str, Any]:
        k_bits = v_bits = 0.0
        k_vals = v_vals = 0
        tokens = 0
        fp = FP_BITS
        for layer in self.layers:
            m = layer.memory()
            fp = m.get("fp_bits", fp)
            k_bits += m["k"][0]
            v_bits += m["v"][0]
            k_vals += m["k"][1]
            v_vals += m["v"][1]
            tokens = max(tokens, m.get("tokens", 0))

        def part(bits, vals):
            return {"dense_bytes": vals * fp // 8, "compressed_bytes": bits / 8,
                    "bits_per_value": bits / vals if vals else None}

        dense = (k_vals + v_vals) * fp // 8
        comp = (k_bits + v_bits) / 8
        return {"tokens": tokens, "dense_bytes": dense, "compressed_bytes": comp,
                "bits_per_value": (k_bits + v_bits) / (k_vals + v_vals) if k_vals + v_vals else None,
                "compression_ratio": dense / comp if comp else None,
                "k": part(k_bits, k_vals), "v": part(v_bits, v_vals),
                "method": f"kivi{self.nbits}", "group_size": self.group_size, "fp_bits": fp,
                "residual_length": self.residual_length}


def hf_quantized_bits_per_value(cache, group_size: int = 64) -> float | None:
    """Bits/value of a transformers QuantizedCache: int payload + fp16 scale and zero per group + fp residual."""
    total_bits = 0.0
    total_vals = 0
    for layer in getattr(cache, "layers", []):
        n = getattr(layer, "cumulative_length", 0)
        if not n or layer.keys is None:
            continue
        resid = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
        # right after quantising, the residual buffer is an empty 1-d tensor: take the shape from the quantised part
        shaped = layer.keys if layer.keys.dim() == 4 else getattr(layer, "_quantized_keys", None)
        per_tok = shaped.shape[0] * shaped.shape[1] * shaped.shape[3] if shaped is not None and shaped.dim() == 4 else 0
        if per_tok == 0:
            continue
        q = n - resid
        fp = 8 * layer.keys.element_size()
        total_bits += 2 * (q * per_tok * (layer.nbits + 2 * fp / group_size) + resid * per_tok * fp)
        total_vals += 2 * n * per_tok
    return total_bits / total_vals if total_vals else None
