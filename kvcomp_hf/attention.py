"""The "kvcomp" attention function: dispatch between a KVCompCache layer and SDPA.

Prefill on an empty cache attends exactly over the new dense K/V (SDPA). Everything else
(decode, prefill onto a non-empty cache) is the layer's to read: KVCompLayer.attend (the fused
Triton kernel when it applies, otherwise the layer dequantised to dense; a static layer's decode
step is one capturable custom op). Ordinary tensors (any other cache) go straight to SDPA, so
"kvcomp" is a superset of "sdpa". This function never edits storage.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cache import CompressedKV


def kvcomp_attention_forward(module: torch.nn.Module, query: torch.Tensor, key, value, attention_mask,
                             scaling: float | None = None, dropout: float = 0.0, **kwargs):
    if isinstance(key, CompressedKV):
        layer = key.layer
        if getattr(layer, "is_static", False) and isinstance(attention_mask, torch.Tensor):
            attention_mask = attention_mask[..., :key.shape[2]]  # sized max_cache_len (get_mask_sizes)
        if key.dense is None:
            return layer.attend(query, attention_mask, scaling, module, dropout, **kwargs)
        key, value = key.dense, value.dense  # prefill on an empty cache: exact attention over the new tokens
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)
