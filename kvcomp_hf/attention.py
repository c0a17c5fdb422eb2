"""The "kvcomp" attention function: attention over a KVCompCache layer's compressed past + tail.

Prefill on an empty cache attends exactly over the new dense K/V (SDPA). Everything else
(decode, prefill onto a non-empty cache) attends over the compressed blocks + the tail buffer:
on CUDA with the fused Triton kernel when it applies, otherwise by dequantising the layer to dense
in PyTorch. Ordinary tensors (any other cache) go straight to SDPA, so "kvcomp" is a superset of
"sdpa". This function never edits storage.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cache import CompressedKV


def kvcomp_attention_forward(module: torch.nn.Module, query: torch.Tensor, key, value, attention_mask,
                             scaling: float | None = None, dropout: float = 0.0, **kwargs):
    if not isinstance(key, CompressedKV):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if key.dense is not None:
        k, v = key.dense, value.dense
    else:
        k, v = key.layer.dense_kv()
    return sdpa_attention_forward(module, query, k, v, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
