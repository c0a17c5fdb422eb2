"""The "kvcomp" attention function: attention over a KVCompCache layer's compressed past + tail.

Prefill on an empty cache attends exactly over the new dense K/V (SDPA). Everything else
(decode, prefill onto a non-empty cache) attends over the compressed blocks + the tail buffer:
on CUDA with the fused Triton kernel when it applies, otherwise by dequantising the layer to dense
in PyTorch. Ordinary tensors (any other cache) go straight to SDPA, so "kvcomp" is a superset of
"sdpa". This function never edits storage.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cache import CompressedKV


MAX_FUSED_QUERIES = 16  # decode and speculative verification; longer chunks take the dense path


def kvcomp_attention_forward(module: torch.nn.Module, query: torch.Tensor, key, value, attention_mask,
                             scaling: float | None = None, dropout: float = 0.0, **kwargs):
    if isinstance(key, CompressedKV):
        layer = key.layer
        static = getattr(layer, "is_static", False)
        if static and isinstance(attention_mask, torch.Tensor):  # sized max_cache_len (get_mask_sizes)
            attention_mask = attention_mask[..., :key.shape[2]]
        if key.dense is not None:  # prefill on an empty cache: exact attention over the new tokens
            key, value = key.dense, value.dense
        elif static and query.shape[2] == 1:  # a capturable decode step (KVCompStaticLayer.update)
            scale = scaling if scaling is not None else module.scaling
            return static_attention(layer, query, attention_mask, scale), None
        else:
            decode_sized = query.shape[2] <= MAX_FUSED_QUERIES and not static
            if decode_sized and layer.use_triton and _mask_is_boolean(attention_mask):
                scale = scaling if scaling is not None else module.scaling
                return fused_attention(layer, query, attention_mask, scale), None
            return _dense_attention(module, layer, query, attention_mask, scaling, dropout, decode_sized, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _dense_attention(module, layer, query, attention_mask, scaling, dropout, exact: bool, **kwargs):
    """SDPA over the layer dequantised to dense. Decode-sized queries (exact=True) run in float32 over the
    exactly decoded K/V, as the fused kernel computes (rounding decoded K/V to a 16-bit dtype first would
    add up to 2**-9 relative error on top of the error bound); long prefill chunks stay in the model dtype,
    for speed. A rotated layer is read in its stored coordinates: q is rotated once, the output rotated
    back once."""
    dtype = torch.float32 if exact else layer.dtype
    mask = attention_mask
    if exact and isinstance(mask, torch.Tensor) and mask.is_floating_point():
        mask = mask.float()
    rot = layer.rotation
    q = query.to(dtype) if rot is None else rot.rotate_query(query.to(dtype))
    key, value = layer.dense_kv(dtype, rotated=True)
    out, weights = sdpa_attention_forward(module, q, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    if rot is not None:  # out is [B, T, H_q, D]
        out = rot.unrotate_output(out.transpose(1, 2)).transpose(1, 2)
    return out.to(query.dtype), weights


def _mask_is_boolean(mask) -> bool:
    return mask is None or (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4)


def fused_attention(layer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Triton flash-decoding over the layer's compressed blocks + tail; returns [B, q_len, H_q, D]."""
    from kvcomp_hf.kernels import decode_attention

    store = layer.store
    rot = layer.rotation  # the layer holds rotated K/V: rotate q once before, the output once after
    q = query if rot is None else rot.rotate_query(query)
    # The kernel applies causality itself; the mask's last query row carries the padding of every key.
    kv_valid = None if attention_mask is None else layer.storage_order(attention_mask[:, 0, -1, :])
    # Triton launches on the current device (device_map="auto"); on the CPU the interpreter runs it (tests)
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        out = decode_attention(q, layer.keys, layer.values, store.pool, store.seg_offset, store.token_min,
                               store.token_step, store.perm, layer.block_table, kv_valid, scaling, layer.fmt)
    if rot is not None:
        out = rot.unrotate_output(out)
    return out.transpose(1, 2).contiguous()


def static_attention(layer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """A KVCompStaticLayer's decode step (q_len 1): one custom op, lengths on the device; returns [B, 1, H_q, D]."""
    rot = layer.rotation
    q = query if rot is None else rot.rotate_query(query)
    kv_valid = None
    if attention_mask is not None:  # the last query row carries the padding of every key
        kv_valid = attention_mask[:, 0, -1, :]
        if kv_valid.dtype != torch.bool:  # an additive mask: 0 where attended
            kv_valid = kv_valid == 0
    fmt = layer.fmt
    out = torch.ops.kvcomp.static_decode(q, layer.ring_k, layer.ring_v, layer.ctl, layer.splits, layer.store.pool,
                                         layer.store.seg_offset, layer.store.token_min, layer.store.token_step,
                                         layer.block_table, kv_valid, layer.scratch, scaling, fmt.bits_k,
                                         fmt.bits_v, fmt.granularity == "token", layer.max_splits)
    if rot is not None:
        out = rot.unrotate_output(out)
    return out.transpose(1, 2).contiguous()
