"""KVCompCache: a transformers Cache whose layers keep old tokens as immutable compressed blocks.

Per layer: a tail buffer of the most recent tokens in the model dtype, and a BlockStore
(kvcomp_hf/block_store.py) of compressed 64-token blocks (a byte pool + per-block metadata + the format),
addressed per sequence through a block table [batch, blocks]. The layer reads itself (KVCompLayer.attend:
the fused Triton kernel or the layer dequantised to dense); the "kvcomp" attention function only dispatches.
Beam reorder and batch selection permute table rows (blocks are shared, never copied); crop drops blocks and
re-opens a partial one into the tail.

With config.sink_tokens = S > 0 the first S tokens stay in the tail too: once a layer holds blocks,
its tail is [tokens 0..S-1, the most recent tokens] and the blocks hold the tokens in between.
Attention reads the layer in storage order (blocks, then the tail); it is invariant to the order of
the keys, so only a padding mask has to follow (KVCompLayer.storage_order); dense_kv returns arrival
order.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .block_store import BlockStore, device_context, fit_pending_pools
from .codec import BLOCK_SIZE, BlockFormat, decode_tail, encode_tail
from .config import BACKENDS, KVCompConfig, resolve_config
from .rotation import LayerRotation, hadamard_pm1, layer_signs

ATTN_IMPLEMENTATION = "kvcomp"
MAX_FUSED_QUERIES = 16  # decode and speculative verification; longer chunks take the dense path
COMPACT_SLACK = 0.25  # unreferenced blocks (beam reorder, batch selection, crop) may hold ~25% more slots


def _use_triton(backend: str, key_states: torch.Tensor, fmt: BlockFormat) -> bool:
    """Triton kernels on CUDA for fp16/bf16 K/V (backend "auto" or "triton"); the PyTorch reference path
    otherwise. float32 models take the PyTorch path: Triton 3.6 fails to compile some float32 variants
    of the kernels on the GPU (pack 4 decode, 2-bit V store)."""
    if backend == "torch":
        return False
    on_cuda = key_states.device.type == "cuda"
    d = fmt.head_dim
    supported = on_cuda and d >= 16 and d & (d - 1) == 0 and key_states.dtype in (torch.float16, torch.bfloat16)
    if backend == "triton" and not supported:
        raise ValueError(f"backend='triton' needs a CUDA device, a power-of-two head_dim >= 16 and fp16/bf16 "
                         f"K/V; got device {key_states.device}, head_dim {d}, dtype {key_states.dtype}")
    return supported


def _mask_is_boolean(mask) -> bool:
    return mask is None or (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4)


def _length_after_dynamic_crop(length: int, tokens_to_remove) -> int:
    """The length a DynamicLayer holding `length` tokens has after crop(tokens_to_remove): crop's meaning and its
    errors changed between transformers releases, so ask the installed DynamicLayer (over a broadcast view of one
    element, so the probe costs no memory)."""
    probe = DynamicLayer()
    probe.keys = probe.values = torch.zeros(1, 1, 1, 1, dtype=torch.bool).expand(1, 1, length, 1)
    probe.is_initialized = True
    probe.crop(tokens_to_remove)
    return probe.get_seq_length()


def _text_config(model_config):
    return model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config


def check_supported(model_config) -> None:
    """Raise a clear error for models whose attention kvcomp cannot serve correctly."""
    cfg = _text_config(model_config)
    name = getattr(cfg, "model_type", type(cfg).__name__)
    if getattr(model_config, "is_encoder_decoder", False):
        raise ValueError(f"kvcomp supports decoder-only models; {name} is encoder-decoder")
    if getattr(cfg, "kv_lora_rank", None) or getattr(cfg, "q_lora_rank", None):
        raise ValueError(f"kvcomp does not support MLA attention ({name} has kv_lora_rank/q_lora_rank); "
                         "use the default DynamicCache for this model")
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise ValueError(f"kvcomp supports only full-attention layers; {name} has layer types {other}. "
                             "Sliding-window, chunked and linear-attention layers would break the mask "
                             "through repacking; use the default DynamicCache for this model")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise ValueError(f"kvcomp does not support sliding-window attention ({name}: sliding_window="
                         f"{cfg.sliding_window}); use the default DynamicCache for this model")
    if getattr(cfg, "attention_chunk_size", None):
        raise ValueError(f"kvcomp does not support chunked attention ({name}: attention_chunk_size="
                         f"{cfg.attention_chunk_size})")


def _check_shape_and_backend(model_config, config: KVCompConfig, backend: str) -> None:
    """What can be known before the first forward: the model's head_dim must suit the block format, and
    backend="triton" needs a CUDA GPU and a head_dim the kernels take (dtype and device are checked at the
    first update, when the K/V arrive)."""
    cfg = _text_config(model_config)
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads and hasattr(cfg, "hidden_size")
                                                  else None)
    if not isinstance(head_dim, int):
        return
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads or 1
    name = getattr(cfg, "model_type", type(cfg).__name__)
    try:
        BlockFormat.from_config(config, kv_heads, head_dim)
    except ValueError as err:
        raise ValueError(f"kvcomp cannot store this model's K/V ({name}): {err}") from None
    if backend == "triton":
        if not torch.cuda.is_available():
            raise ValueError("backend='triton' needs a CUDA GPU and none is available; use backend='auto' or 'torch'")
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"backend='triton' needs a power-of-two head_dim >= 16; {name} has head_dim {head_dim} "
                             "(backend='auto' or 'torch' serve it)")


@dataclass
class CompressedKV:
    """What KVCompLayer.update returns in place of a dense K or V tensor.

    It has the logical shape [B, H_kv, kv_len, D] of the dense tensor; the "kvcomp" attention
    function reads the layer behind it. `dense` holds the new tokens when the cache was empty
    (prefill attends over them exactly)."""

    layer: KVCompLayer
    kind: str  # "k" or "v"
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    dense: torch.Tensor | None = None

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self):
        return len(self.shape)


class KVCompLayer(CacheLayerMixin):
    """One layer: tail buffer + compressed blocks + block table. The tail (keys, values) holds the model dtype, or
    with config.tail_bits the codec's stage-5 rows, beside exact copies of the sequence's first sink_tokens."""

    is_compileable = False
    is_croppable = True

    def __init__(self, config: KVCompConfig, model_config=None, backend: str = "auto", layer_idx: int = 0):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config = config
        self.layer_idx = layer_idx  # selects the layer's rotation (config.rotation)
        self.model_config = model_config
        self.backend = backend
        self._clear()

    def _clear(self):
        self.keys = self.values = None  # the tail buffer, [B, H, T, D] (tail_bits: uint8 rows, encode_tail)
        self.sink_keys = self.sink_values = None  # tail_bits: the first sink_tokens exact, [B, H, <= sinks, D]
        self.store: BlockStore | None = None
        self.block_table: torch.Tensor | None = None  # int32 [B, n_blocks]
        self.rotation: LayerRotation | None = None  # set: blocks and tail hold rotated K/V
        self.slots_after_compact = 0  # the store's slot count after the last compaction (see _maybe_compact)
        self.is_initialized = False

    # -- transformers layer contract ------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.fmt = BlockFormat.from_config(self.config, h, d)
        self.use_triton = _use_triton(self.backend, key_states, self.fmt)
        self.store = BlockStore(self.fmt, self.dtype, self.device, self.config.rel_k, self.config.rel_v,
                                self.config.rotation, self.use_triton)
        self.head_dim = d
        self.keys, self.values = self._encode(key_states.new_zeros(b, h, 0, d), value_states.new_zeros(b, h, 0, d))
        if self.config.tail_bits:
            self.sink_keys, self.sink_values = key_states.new_zeros(b, h, 0, d), value_states.new_zeros(b, h, 0, d)
        self.block_table = torch.zeros(b, 0, dtype=torch.int32, device=self.device)
        if self.config.rotation == "hadamard":
            self.rotation = LayerRotation(self.config.rotation_seed, self.layer_idx, h, d, self.device,
                                          kernel_on_cpu=self.use_triton)
        self.is_initialized = True

    def _new_states(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """What every update does first: check, initialise, convert to the cache dtype and rotate."""
        self._check_attention_implementation()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.keys.shape[0] or key_states.shape[1] != self.keys.shape[1] \
                or key_states.shape[3] != self.head_dim or value_states.shape != key_states.shape:
            raise ValueError(f"key/value states of shape {tuple(key_states.shape)}/{tuple(value_states.shape)} do not "
                             f"match the cache's [batch={self.keys.shape[0]}, kv_heads={self.keys.shape[1]}, *, "
                             f"head_dim={self.head_dim}]")
        new_k, new_v = key_states.to(self.dtype), value_states.to(self.dtype)
        if self.rotation is not None:  # stored in rotated coordinates from here on (tail and blocks)
            new_k, new_v = self.rotation.rotate(new_k, 0), self.rotation.rotate(new_v, 1)
        return new_k, new_v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        fit_pending_pools()  # the previous layer's prefill store, now that the GPU has passed it
        new_k, new_v = self._new_states(key_states, value_states)
        was_empty = self.get_seq_length() == 0
        if self.config.tail_bits:
            self._keep_sinks(new_k, new_v)
            new_k, new_v = self._encode(new_k, new_v)
        if self.keys.shape[2] or new_k is key_states or new_v is value_states:  # the tail never aliases the caller's
            new_k, new_v = torch.cat([self.keys, new_k], dim=2), torch.cat([self.values, new_v], dim=2)
        self.keys, self.values = new_k, new_v
        self._compress_full_blocks()
        shape = torch.Size((self.keys.shape[0], self.keys.shape[1], self.get_seq_length(), self.head_dim))
        dense_k, dense_v = (key_states, value_states) if was_empty else (None, None)
        return (CompressedKV(self, "k", shape, self.dtype, self.device, dense_k),
                CompressedKV(self, "v", shape, self.dtype, self.device, dense_v))

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.block_table.shape[1] * BLOCK_SIZE + self.keys.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        idx = indices.to(self.device)
        self.keys, self.values = self.keys[idx], self.values[idx]
        if self.config.tail_bits:
            self.sink_keys, self.sink_values = self.sink_keys[idx], self.sink_values[idx]
        self.block_table = self.block_table[idx]
        self._maybe_compact()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        self.keys = self.keys.repeat_interleave(repeats, dim=0)
        self.values = self.values.repeat_interleave(repeats, dim=0)
        if self.config.tail_bits:
            self.sink_keys = self.sink_keys.repeat_interleave(repeats, dim=0)
            self.sink_values = self.sink_values.repeat_interleave(repeats, dim=0)
        self.block_table = self.block_table.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove tokens from the end exactly as transformers' DynamicLayer.crop does on the installed version:
        a negative value removes that many tokens; a positive one keeps the first N tokens up to 5.19 (deprecated)
        and raises ValueError from 5.20; other arguments raise DynamicLayer's errors. Blocks past the cut are
        dropped; a block the cut falls inside is decompressed into the tail."""
        length = self.get_seq_length()
        new_length = _length_after_dynamic_crop(length, tokens_to_remove)
        if not self.is_initialized or new_length == length:
            return
        n_blocks = self.block_table.shape[1]
        s = self.n_sinks()
        if new_length >= s + n_blocks * BLOCK_SIZE:
            keep = new_length - n_blocks * BLOCK_SIZE
            self.keys, self.values = self.keys[:, :, :keep], self.values[:, :, :keep]
            if self.config.tail_bits:
                self.sink_keys, self.sink_values = self.sink_keys[:, :, :keep], self.sink_values[:, :, :keep]
            return
        keep_blocks = max(new_length - s, 0) // BLOCK_SIZE
        # the dropped blocks decoded between the sinks and the rest of the tail, in stored (rotated) coordinates
        k, v = self._dense(*self.tail(), self.block_table[:, keep_blocks:], self.dtype, rotated=True, sinks=s)
        keep = new_length - keep_blocks * BLOCK_SIZE
        k, v = k[:, :, :keep].contiguous(), v[:, :, :keep].contiguous()
        self.keys, self.values = self._encode(k, v)  # (tail_bits: the decoded blocks re-encoded)
        if self.config.tail_bits:
            self.sink_keys, self.sink_values = k[:, :, :s], v[:, :, :s]
        self.block_table = self.block_table[:, :keep_blocks]
        self._maybe_compact()

    def offload(self):
        raise NotImplementedError("kvcomp does not support cache offloading (it already compresses the cache)")

    def prefetch(self):
        raise NotImplementedError("kvcomp does not support cache offloading (it already compresses the cache)")

    # -- compression ----------------------------------------------------------------------------

    def n_sinks(self) -> int:
        """Sink tokens at the front of the tail: config.sink_tokens once the layer holds blocks, else 0 (a
        layer without blocks holds its tokens in arrival order)."""
        return self.config.sink_tokens if self.block_table.shape[1] else 0

    def storage_order(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., kv_len] over the layer's tokens in arrival order (a padding mask) -> the order attention
        reads them: blocks, then the tail (sinks first, see the module docstring)."""
        s = self.n_sinks()
        if s == 0:
            return x
        n = self.block_table.shape[1] * BLOCK_SIZE
        return torch.cat([x[..., s:s + n], x[..., :s], x[..., s + n:]], -1)

    def _encode(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tail tokens (K and V) in the model dtype -> as the tail stores them. tail_bits codes K and V in one pass
        (Triton: one launch; eager decoding runs this every layer and step, `python -m eval.count_tail_ops`)."""
        if not self.config.tail_bits:
            return k, v
        if self.use_triton:
            from kvcomp_hf.kernels.tail_rows import encode_rows
            return encode_rows(k, v)
        return tuple(encode_tail(torch.stack([k, v])).unbind(0))

    def _decode(self, k: torch.Tensor, v: torch.Tensor, sink_k: torch.Tensor | None = None,
                sink_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tail_bits rows (K and V) -> the model dtype, after the exact sinks sink_k, sink_v if given (without
        tail_bits the tail is held in the model dtype: k, v as they are)."""
        if not self.config.tail_bits:
            return k, v
        if self.use_triton:
            from kvcomp_hf.kernels.tail_rows import decode_rows
            return decode_rows(k, v, self.dtype, sink_k, sink_v)
        k, v = decode_tail(torch.stack([k, v]), self.dtype).unbind(0)
        if sink_k is None:
            return k, v
        return torch.cat([sink_k, k], 2), torch.cat([sink_v, v], 2)

    def _keep_sinks(self, new_k: torch.Tensor, new_v: torch.Tensor) -> None:
        """tail_bits: exact copies of the sequence's first sink_tokens, which the tail's rows only approximate (the
        copies hold min(sink_tokens, sequence length) tokens, so fewer than sink_tokens means all of them)."""
        n = min(self.config.sink_tokens - self.sink_keys.shape[2], new_k.shape[2])
        if n > 0:
            self.sink_keys = torch.cat([self.sink_keys, new_k[:, :, :n]], 2)
            self.sink_values = torch.cat([self.sink_values, new_v[:, :, :n]], 2)

    def tail(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tail [B, H, T, D] in the model dtype (tail_bits: the rows decoded, the sinks exact)."""
        if not self.config.tail_bits:
            return self.keys, self.values
        s = self.sink_keys.shape[2]
        return self._decode(self.keys[:, :, s:], self.values[:, :, s:], self.sink_keys, self.sink_values)

    def _compress_full_blocks(self) -> None:
        s = min(self.config.sink_tokens, self.keys.shape[2])  # the first tokens stay in the tail
        n_blocks = (self.keys.shape[2] - s - self.config.residual_length) // BLOCK_SIZE
        if n_blocks <= 0:
            return
        n_tokens = n_blocks * BLOCK_SIZE
        slots = self.store.add(*self._decode(self.keys[:, :, s:s + n_tokens], self.values[:, :, s:s + n_tokens]))
        self.block_table = torch.cat([self.block_table, slots], dim=1)
        # new tensors, so the compressed tokens' dense copy is freed
        self.keys = torch.cat([self.keys[:, :, :s], self.keys[:, :, s + n_tokens:]], 2)
        self.values = torch.cat([self.values[:, :, :s], self.values[:, :, s + n_tokens:]], 2)

    def _maybe_compact(self) -> None:
        """Free the blocks no row references any more, amortised. Beam reorder, batch selection and crop
        only rewrite the block table; the blocks they drop stay in the store until a compaction. Whether to
        compact is decided from host-side counts, so most calls cost nothing: compact when the rows certainly
        leave COMPACT_SLACK of the slots unreferenced (more slots than block-table entries), or when the store
        grew by COMPACT_SLACK since the last compaction (beams share blocks, so the host cannot count the
        unreferenced ones without a sync). So the store holds at most (1 + COMPACT_SLACK) times the slots it
        kept at its last compaction, syncs O(log n) times over a generation, and copies O(n) bytes in all."""
        n = self.store.n_slots if self.store is not None else 0
        if n == 0:
            return
        certain = n - self.block_table.numel()
        if certain >= COMPACT_SLACK * n or n >= (1 + COMPACT_SLACK) * self.slots_after_compact:
            self.block_table = self.store.compact(self.block_table)
            self.slots_after_compact = self.store.n_slots

    # -- reading --------------------------------------------------------------------------------

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
               module: torch.nn.Module | None = None, dropout: float = 0.0, **kwargs):
        """Attention of query [B, Hq, q_len, D] over the layer (blocks + tail) -> (out [B, q_len, Hq, D], weights).
        Decode-sized queries with a boolean (or no) mask take the fused Triton kernel when the layer uses it;
        everything else attends over the layer dequantised to dense (attend_dense). module: the model's
        attention module (num_key_value_groups, is_causal, scaling for scaling=None)."""
        decode_sized = query.shape[2] <= MAX_FUSED_QUERIES
        if decode_sized and self.use_triton and _mask_is_boolean(attention_mask):
            scale = scaling if scaling is not None else module.scaling
            return self.attend_fused(query, attention_mask, scale), None
        return self.attend_dense(query, attention_mask, scaling, module, dropout, exact=decode_sized, **kwargs)

    def attend_fused(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Triton flash-decoding over the compressed blocks + tail; returns [B, q_len, H_q, D]."""
        from kvcomp_hf.kernels import decode_attention

        rot = self.rotation  # the layer holds rotated K/V: rotate q once before, the output once (in the combine)
        q = query if rot is None else rot.rotate_query(query)
        # The kernel applies causality itself; the mask's last query row carries the padding of every key.
        kv_valid = None if attention_mask is None else self.storage_order(attention_mask[:, 0, -1, :])
        with device_context(query.device):
            out = decode_attention(q, *self.tail(), self.store, self.block_table, kv_valid, scaling, rotation=rot)
        return out.transpose(1, 2).contiguous()

    def attend_dense(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
                     module: torch.nn.Module | None = None, dropout: float = 0.0, exact: bool = True, **kwargs):
        """SDPA over the layer dequantised to dense -> (out [B, q_len, Hq, D], weights). Decode-sized queries
        (exact=True) run in float32 over the exactly decoded K/V, as the fused kernel computes (rounding decoded
        K/V to a 16-bit dtype first would add up to 2**-9 relative error on top of the error bound); long prefill
        chunks stay in the model dtype, for speed. A rotated layer is read in its stored coordinates: q is
        rotated once, the output rotated back once."""
        dtype = torch.float32 if exact else self.dtype
        mask = attention_mask
        if exact and isinstance(mask, torch.Tensor) and mask.is_floating_point():
            mask = mask.float()
        rot = self.rotation
        q = query.to(dtype) if rot is None else rot.rotate_query(query.to(dtype))
        key, value = self.dense_kv(dtype, rotated=True)
        out, weights = sdpa_attention_forward(module, q, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
        if rot is not None:  # out is [B, T, H_q, D]
            out = rot.unrotate_output(out.transpose(1, 2)).transpose(1, 2)
        return out.to(query.dtype), weights

    def dense_kv(self, dtype: torch.dtype | None = None, rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache dequantised in arrival order: [B, H, kv_len, D] each, in `dtype` (default: the
        model dtype; float32 keeps the decoded values exact). With a rotation, rotated=True returns the
        stored (rotated) coordinates, as attention reads them; otherwise K and V are rotated back."""
        return self._dense(*self.tail(), self.block_table, dtype, rotated, self.n_sinks())

    def _dense(self, tail_k, tail_v, block_table, dtype, rotated: bool, sinks: int = 0):
        """dense_kv of the blocks in block_table [B, nb] and the tail [B, H, T, D] (its first `sinks` tokens
        before the blocks)."""
        dtype = dtype or self.dtype
        unrotate = self.rotation is not None and not rotated
        work = torch.float32 if unrotate else dtype  # rotate back in float32, round once
        k, v = tail_k.to(work), tail_v.to(work)
        if block_table.shape[1] > 0:
            bk, bv = self.store.decode(block_table)                            # [B, nb, H, 64, D]
            b, nb, h, _, d = bk.shape
            bk = bk.permute(0, 2, 1, 3, 4).reshape(b, h, nb * BLOCK_SIZE, d).to(work)
            bv = bv.permute(0, 2, 1, 3, 4).reshape(b, h, nb * BLOCK_SIZE, d).to(work)
            k = torch.cat([k[:, :, :sinks], bk, k[:, :, sinks:]], 2)
            v = torch.cat([v[:, :, :sinks], bv, v[:, :, sinks:]], 2)
        if unrotate:
            k, v = self.rotation.unrotate(k, 0), self.rotation.unrotate(v, 1)
        return k.to(dtype), v.to(dtype)

    def _check_attention_implementation(self) -> None:
        if self.model_config is None:
            return
        impl = getattr(_text_config(self.model_config), "_attn_implementation", None)
        if impl != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"KVCompCache needs the model's attention implementation to be {ATTN_IMPLEMENTATION!r}, "
                f"got {impl!r}: load the model with attn_implementation={ATTN_IMPLEMENTATION!r} or call "
                f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r}) (after `import kvcomp_hf`)")

    def memory_report(self) -> dict:
        """Bytes the rows use, by part, for K and V (tail included), the dense equivalent, and what the
        layer's tensors occupy (`held`: allocated capacity and blocks no row references included)."""
        parts = {"k": {}, "v": {}, "shared": {}}
        if not self.is_initialized:
            return {"tokens": 0, "dense_bytes": {"k": 0, "v": 0}, "parts": parts, "held": {}, "unreferenced_blocks": 0}
        slots = torch.unique(self.block_table)
        nbytes = lambda t: t.numel() * t.element_size() if t is not None else 0  # noqa: E731
        tail_k, tail_v = nbytes(self.keys) + nbytes(self.sink_keys), nbytes(self.values) + nbytes(self.sink_values)
        held = {**self.store.allocated_bytes(), "pool_in_use": self.store.used_bytes(), "tail": tail_k + tail_v,
                "block_table": nbytes(self.block_table)}
        parts = self.store.bytes_of(slots)
        parts["k"]["tail"], parts["v"]["tail"] = tail_k, tail_v
        parts["shared"]["block_table"] = nbytes(self.block_table)
        b, h = self.keys.shape[:2]
        dense = b * h * self.get_seq_length() * self.head_dim * self.dtype.itemsize
        return {"tokens": self.get_seq_length(), "dense_bytes": {"k": dense, "v": dense}, "parts": parts,
                "held": held, "unreferenced_blocks": self.store.n_slots - slots.numel()}


class KVCompStaticLayer(KVCompLayer):
    """A kvcomp layer preallocated for max_cache_len tokens, whose decode step can be captured in a CUDA graph.

    A step that appends one token per row to a non-empty layer runs two custom ops (kernels/static_cache.py): the
    append launch writes the token into a ring-buffer tail and, when the tail is full, compresses its oldest block
    into the row's next slot (decided on the device); the decode launch attends over the blocks and the ring. The
    lengths live on the device (ctl), the grids are fixed, nothing is allocated, concatenated or read back, so
    transformers' auto-compile (a static cache) and torch.compile(mode="reduce-overhead") capture the step.
    Everything else (prefill, chunks, q_len > 1) runs eagerly and may sync, outside any compiled graph.

    Needs layout="fixed" (every segment has the same size, so slot s lives at a fixed pool offset) and the Triton
    kernels (a CUDA device with fp16/bf16 K/V and a power-of-two head_dim >= 16, or Triton's interpreter).
    Beam reorder permutes rows in place; crop and batch selection are not supported (use KVCompCache without
    max_cache_len for those). It keeps no sink tokens: its ring tail holds only the most recent tokens, so
    config.sink_tokens is set to 0 here (the first tokens are compressed like the others)."""

    is_compileable = True
    is_croppable = False
    is_static = True

    def __init__(self, config: KVCompConfig, model_config=None, backend: str = "auto", layer_idx: int = 0,
                 max_cache_len: int | None = None, shared: dict | None = None):
        if config.layout != "fixed":
            raise ValueError(f"a static KVCompCache (max_cache_len={max_cache_len}) needs layout='fixed' (fixed-size "
                             f"segments at fixed offsets; the 'fast' preset is one), got layout={config.layout!r}")
        if backend == "torch":
            raise ValueError("a static KVCompCache (max_cache_len set) runs the Triton kernels: use backend='auto' or "
                             "'triton', or drop max_cache_len for the PyTorch path")
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len <= 0:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        if model_config is None:
            raise ValueError("a static KVCompLayer needs the model config (its query heads size the decode scratch)")
        if config.tail_bits is not None:
            raise ValueError(f"a static KVCompCache (max_cache_len={max_cache_len}) keeps its ring tail in the model "
                             f"dtype: it needs tail_bits=None, got tail_bits={config.tail_bits!r}")
        self.max_cache_len = max_cache_len
        self.shared = shared if shared is not None else {}  # the layers' common tensors (decode scratch, tables)
        super().__init__(dataclasses.replace(config, sink_tokens=0), model_config, backend, layer_idx)

    def _clear(self):
        super()._clear()
        self.ring_k = self.ring_v = self.ctl = self.splits = self.scratch = self.stacks = None
        self.has_tokens = False  # host-side: a decode step needs a non-empty layer (prefill fills it eagerly)

    @torch.compiler.disable  # allocation and host-side setup: a compiled prefill chunk must not trace it
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        from kvcomp_hf.kernels.decode_attention import _num_sms, choose_tuning
        from kvcomp_hf.kernels.static_cache import scratch_values

        b, h, _, d = key_states.shape
        dtype, device = key_states.dtype, key_states.device
        interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if not (device.type == "cuda" or interpreted) or d < 16 or d & (d - 1) \
                or dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"a static KVCompCache needs a CUDA device, fp16/bf16 K/V and a power-of-two head_dim "
                             f">= 16; got device {device}, dtype {dtype}, head_dim {d}")
        self.dtype, self.device, self.head_dim = dtype, device, d
        st = self.store = BlockStore.from_config(self.config, h, d, dtype, device, use_triton=True)
        self.fmt = st.fmt
        self.use_triton = True
        self.nb_max = nb_max = -(-self.max_cache_len // BLOCK_SIZE)
        n_slots = b * nb_max
        self.slot_bytes = st.fixed_slot_bytes()
        self.ring = -(-(self.config.residual_length + BLOCK_SIZE) // BLOCK_SIZE) * BLOCK_SIZE
        # Every layer's storage is one slice of the cache's stacked tensors, and the tensors equal in every layer
        # (block table, split counts, segment offsets, the ±1 matrix, the scratch) are one tensor: a decode step
        # passes the stacked tensors and its layer index to the custom ops, so Dynamo checks each tensor once per
        # step, not once per layer (eval.count_guards).
        stacks = self._shared(("stacks", device, b), lambda: self._stack_storage(st, n_slots, key_states))
        self.stacks, self.li = stacks, self.layer_idx
        st.use_slots(stacks, self.li)
        self.ring_k, self.ring_v, self.ctl = (stacks[name][self.li] for name in ("ring_k", "ring_v", "ctl"))
        self.keys, self.values = self.ring_k, self.ring_v  # (dtype and storage accounting read these)
        self.block_table = stacks["block_table"]
        # the split counts the eager decode would choose at each block count (same splits: same rounding)
        sms = _num_sms(device)
        splits = [choose_tuning(d, b, h, nb).splits(b, h, nb, sms) for nb in range(nb_max + 1)]
        self.splits = self._shared(("splits", b, h, nb_max), lambda: torch.tensor(splits, dtype=torch.int64,
                                                                                 device=device))
        self.max_splits = max(ns for ns, _ in splits)
        group = _text_config(self.model_config).num_attention_heads // h
        need = scratch_values(b, h, group, d, self.max_splits, self.ring)
        if self.shared.get(device) is None or self.shared[device].numel() < need:
            self.shared[device] = torch.empty(need, dtype=torch.float32, device=device)
        self.scratch = self.shared[device]
        if self.config.rotation == "hadamard":
            # a decode step rotates through kernels (q: kernels/rotate.py; K, V: the append; the output: the
            # combine), which take the signs per KV head and the ±1 matrix: the stacked ones
            self.rotation = LayerRotation(self.config.rotation_seed, self.layer_idx, h, d, device, kernel_on_cpu=True,
                                          signs=stacks["signs"][self.li], h_pm1=stacks["h_pm1"])
        # fixed addresses: CUDA graphs neither copy nor re-record them (the rotation's matrix and signs too: the
        # H200 profile of a compiled Llama-3.1-8B step shows 130 host-to-graph copies per step, ~0.9 ms of host
        # time; these are the layer tensors left unmarked)
        for t in (*stacks.values(), self.splits, self.scratch):
            torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def _stack_storage(self, st: BlockStore, n_slots: int, key_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cache's storage for all its layers (built by the first layer): the stores' pools and token
        statistics, rings, lengths (ctl: [kv_len, blocks per row, done counter, 0] per layer) and rotation signs,
        each [layers, ...], and the tensors equal in every layer."""
        layers = _text_config(self.model_config).num_hidden_layers
        b, h, _, d = key_states.shape
        stacks = st.preallocate_fixed(n_slots, layers)
        stacks["ring_k"] = key_states.new_zeros(layers, b, h, self.ring, d)
        stacks["ring_v"] = key_states.new_zeros(layers, b, h, self.ring, d)
        stacks["ctl"] = torch.zeros(layers, 4, dtype=torch.int64, device=self.device)
        stacks["block_table"] = torch.arange(n_slots, dtype=torch.int32, device=self.device).view(b, self.nb_max)
        if self.config.rotation == "hadamard":
            seed = self.config.rotation_seed
            stacks["signs"] = torch.stack([layer_signs(seed, i, h, d) for i in range(layers)]).to(self.device)
            stacks["h_pm1"] = hadamard_pm1(d).to(self.device)
        return stacks

    def _shared(self, key: tuple, build) -> torch.Tensor:
        """The cache's one tensor for `key` (read-only in decode steps), built by the first layer that asks."""
        if key not in self.shared:
            self.shared[key] = build()
        return self.shared[key]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[2] != 1 or not self.has_tokens:
            new_k, new_v = self._new_states(key_states, value_states)  # (self.keys is the ring)
            return self._append_eagerly(new_k, new_v, key_states, value_states)
        fmt, sk = self.fmt, self.stacks  # a decode step: the append kernel rotates the token itself
        torch.ops.kvcomp.static_append(key_states, value_states, self.li, sk["ring_k"], sk["ring_v"], sk["ctl"],
                                       sk["pool"], sk["token_min"], sk["token_step"], self.config.residual_length,
                                       self.config.rel_k, self.config.rel_v, fmt.bits_k, fmt.bits_v,
                                       fmt.granularity == "token", *self._rotation_operands())
        b, h, _, d = self.ring_k.shape
        shape = torch.Size((b, h, self.max_cache_len, d))  # the length is on the device (ctl)
        return (CompressedKV(self, "k", shape, self.dtype, self.device),
                CompressedKV(self, "v", shape, self.dtype, self.device))

    @torch.compiler.disable
    def _append_eagerly(self, new_k, new_v, key_states, value_states):
        """Append any number of tokens with host-side lengths (prefill, chunks, q_len > 1): the full blocks go
        through store_blocks into their fixed slots, the rest into the ring."""
        length, nb = (int(x) for x in self.ctl[:2].tolist())
        q = new_k.shape[2]
        if length + q > self.max_cache_len:
            raise ValueError(f"the static KVCompCache holds at most max_cache_len={self.max_cache_len} tokens; "
                             f"{length} + {q} new do not fit: build it with a larger max_cache_len")
        ring_rows = lambda start, n: (start + torch.arange(n, device=self.device)) % self.ring  # noqa: E731
        tail = length - nb * BLOCK_SIZE
        rows = ring_rows(nb * BLOCK_SIZE, tail)
        k = torch.cat([self.ring_k[:, :, rows], new_k], 2)
        v = torch.cat([self.ring_v[:, :, rows], new_v], 2)
        n = max(0, (tail + q - self.config.residual_length) // BLOCK_SIZE)
        if n:
            self._store(k[:, :, :n * BLOCK_SIZE], v[:, :, :n * BLOCK_SIZE], nb)
        rows = ring_rows((nb + n) * BLOCK_SIZE, tail + q - n * BLOCK_SIZE)
        self.ring_k[:, :, rows] = k[:, :, n * BLOCK_SIZE:]
        self.ring_v[:, :, rows] = v[:, :, n * BLOCK_SIZE:]
        self.ctl[:2] = torch.tensor([length + q, nb + n])
        self.has_tokens = True
        b, h, _, d = new_k.shape
        shape = torch.Size((b, h, length + q, d))
        dense_k, dense_v = (key_states, value_states) if length == 0 else (None, None)
        return (CompressedKV(self, "k", shape, self.dtype, self.device, dense_k),
                CompressedKV(self, "v", shape, self.dtype, self.device, dense_v))

    def _store(self, k: torch.Tensor, v: torch.Tensor, nb: int) -> None:
        """Compress k, v [B, H, n*64, D] into blocks nb.. of every row (slots b * nb_max + nb..)."""
        from kvcomp_hf.kernels import store_blocks

        st = self.store
        with device_context(self.device):
            for row in range(k.shape[0]):
                slot = row * self.nb_max + nb
                st.pool_used.fill_(slot * self.slot_bytes)  # store_blocks appends at pool_used: the slot's offset
                store_blocks(k[row:row + 1], v[row:row + 1], st, slot)

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
               module: torch.nn.Module | None = None, dropout: float = 0.0, **kwargs):
        """A decode step (q_len 1) is one custom op with the lengths on the device, capturable in a CUDA graph;
        longer queries (eager, outside compiled graphs) attend over the layer dequantised to the model dtype."""
        if query.shape[2] != 1:
            return self._attend_chunk(query, attention_mask, scaling, module, dropout, **kwargs)
        from kvcomp_hf.kernels.rotate import hadamard_rotate

        scale = scaling if scaling is not None else module.scaling
        rot, sk = self.rotation, self.stacks
        # q is rotated with the stacked signs, indexed in the step (not the layer's own view: one tensor to check)
        q = query if rot is None else hadamard_rotate(query, sk["signs"][self.li, 0], sk["h_pm1"], rot.scale, False)
        kv_valid = None
        if attention_mask is not None:  # the last query row carries the padding of every key
            kv_valid = attention_mask[:, 0, -1, :]
            if kv_valid.dtype != torch.bool:  # an additive mask: 0 where attended
                kv_valid = kv_valid == 0
        fmt = self.fmt
        out = torch.ops.kvcomp.static_decode(q, self.li, sk["ring_k"], sk["ring_v"], sk["ctl"], self.splits, sk["pool"],
                                             sk["seg_offset"], sk["token_min"], sk["token_step"], sk["block_table"],
                                             kv_valid, self.scratch, scale, fmt.bits_k, fmt.bits_v,
                                             fmt.granularity == "token", self.max_splits, *self._rotation_operands())
        return out.transpose(1, 2).contiguous(), None

    def _rotation_operands(self) -> tuple:
        """(stacked signs, ±1 matrix, scale) of the static ops, (None, None, 1.0) for a layer without rotation."""
        if self.rotation is None:
            return None, None, 1.0
        return self.stacks["signs"], self.stacks["h_pm1"], self.rotation.scale

    @torch.compiler.disable  # transformers compiles chunked prefill too: chunks run eagerly, as documented
    def _attend_chunk(self, query, attention_mask, scaling, module, dropout, **kwargs):
        return self.attend_dense(query, attention_mask, scaling, module, dropout, exact=False, **kwargs)

    def _lengths(self) -> tuple[int, int]:
        """(tokens, blocks per row), read from the device."""
        length, nb = (int(x) for x in self.ctl[:2].tolist())
        return length, nb

    def get_seq_length(self):
        # a 0-d device tensor, as transformers' StaticLayer: reading it never syncs inside a compiled step. Indexed
        # from the stacked lengths, not through the layer's view of them: a compiled step whose graph took both as
        # inputs would see aliased inputs that the custom ops mutate, and inductor then skips CUDA graphs
        return self.stacks["ctl"][self.li, 0] if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Empty the layer and keep its storage (compiled graphs keep their addresses)."""
        if self.is_initialized:
            self.ctl.zero_()
            self.has_tokens = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: permute the rows in place (their slots, ring and metadata), keeping every address."""
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.device)
        b = self.ring_k.shape[0]
        st = self.store
        for t in (self.ring_k, self.ring_v, st.pool.view(b, -1), st.token_min.view(b, -1), st.token_step.view(b, -1)):
            t.copy_(t[idx])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a static KVCompCache cannot change its batch; use KVCompCache without max_cache_len")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a static KVCompCache cannot change its batch; use KVCompCache without max_cache_len")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a static KVCompCache cannot be cropped; use KVCompCache without max_cache_len")

    def dense_kv(self, dtype: torch.dtype | None = None, rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        length, nb = self._lengths()
        rows = (nb * BLOCK_SIZE + torch.arange(length - nb * BLOCK_SIZE, device=self.device)) % self.ring
        return self._dense(self.ring_k[:, :, rows], self.ring_v[:, :, rows], self.block_table[:, :nb], dtype, rotated)

    def memory_report(self) -> dict:
        parts = {"k": {}, "v": {}, "shared": {}}
        if not self.is_initialized:
            return {"tokens": 0, "dense_bytes": {"k": 0, "v": 0}, "parts": parts, "held": {}, "unreferenced_blocks": 0}
        length, nb = self._lengths()
        b, h, _, d = self.ring_k.shape
        elem = self.ring_k.element_size()
        parts = self.store.bytes_of(self.block_table[:, :nb].reshape(-1))
        tail = b * h * (length - nb * BLOCK_SIZE) * d * elem
        parts["k"]["tail"] = parts["v"]["tail"] = tail
        parts["shared"]["block_table"] = b * nb * self.block_table.element_size()
        held = {**self.store.allocated_bytes(), "pool_in_use": b * nb * self.slot_bytes,
                "tail": 2 * self.ring_k.numel() * elem, "block_table": self.block_table.numel() * 4,
                "ctl": self.ctl.numel() * 8 + self.splits.numel() * 8}
        if self.li:  # the tensors every layer shares are counted once, with layer 0
            st = self.store
            held["slot_metadata"] -= st.seg_offset.numel() * 8 + st.seg_bytes.numel() * 4
            held["block_table"] = 0
            held["ctl"] -= self.splits.numel() * 8
        dense = b * h * length * d * elem
        return {"tokens": length, "dense_bytes": {"k": dense, "v": dense}, "parts": parts, "held": held,
                "unreferenced_blocks": 0}


class KVCompCache(Cache):
    """A transformers Cache that stores K/V compressed (kvcomp).

    KVCompCache(model.config)                              # default config
    KVCompCache(model.config, KVCompConfig(rel_k=0.1))     # explicit config
    KVCompCache(model.config, {"preset": "smollm2-135m-instruct", "rel_v": 0.25})
    KVCompCache(model.config, "smollm2-135m-instruct")     # a preset by name
    model.generate(ids, cache=cache)   # transformers >= 5.24; past_key_values=cache on 5.17-5.23
                                       # (kvcomp_hf.cache_kwargs(cache) spells it for the installed version)
    Use a fresh cache for every generate() call: a cache passed in is continued, not reset.
    backend: "auto" (Triton kernels on CUDA, PyTorch elsewhere), "torch" or "triton".
    max_cache_len=N: a static cache (KVCompStaticLayer, layout="fixed" only) preallocated for N tokens per row,
    whose decode steps transformers' auto-compile and torch.compile(mode="reduce-overhead") capture in CUDA graphs;
    generate(cache_implementation="kvcomp", cache_config={..., "static": True}) sizes it for the call."""

    def __init__(self, config=None, kvcomp_config: KVCompConfig | dict | str | None = None, backend: str = "auto",
                 max_cache_len: int | None = None, **overrides):
        if config is None:
            raise ValueError("KVCompCache needs the model config: KVCompCache(model.config, KVCompConfig(...))")
        if isinstance(config, (KVCompConfig, dict, str)):
            raise ValueError("KVCompCache's first argument is the model config (model.config); "
                             "pass the KVCompConfig, preset name or dict second")
        check_supported(config)
        self.kvcomp_config = resolve_config(kvcomp_config, **overrides)
        _check_shape_and_backend(config, self.kvcomp_config, backend)
        n_layers = _text_config(config).num_hidden_layers
        if max_cache_len is None:
            layers = [KVCompLayer(self.kvcomp_config, config, backend, layer_idx=i) for i in range(n_layers)]
        else:
            shared: dict = {}
            layers = [KVCompStaticLayer(self.kvcomp_config, config, backend, layer_idx=i, max_cache_len=max_cache_len,
                                        shared=shared) for i in range(n_layers)]
        super().__init__(layers=layers)

    def memory_report(self) -> dict:
        """Bytes the cache uses and holds, against what a DynamicCache would hold, for K, V and both.

        compressed_bytes (and bits_per_value, compression_ratio) counts everything the cache's rows
        use: bit-packed payload, pack minimums and widths (and alignment padding), per-token min and
        step, segment offsets, repacking permutations, block tables and the uncompressed tail buffer.
        held_bytes counts what the cache's tensors occupy: the byte pools and per-block arrays as
        allocated (growth headroom, and blocks no row references any more until the next compaction,
        see KVCompLayer._maybe_compact), tails and block tables; held_parts splits it (pool_in_use is
        the part of the pools that holds blocks, referenced or not), unreferenced_blocks counts those
        blocks."""
        reports = [layer.memory_report() for layer in self.layers]
        out = {"tokens": max((r["tokens"] for r in reports), default=0), "layers": len(reports)}
        held_parts: dict[str, int] = {}
        for r in reports:
            for key, value in r["held"].items():
                held_parts[key] = held_parts.get(key, 0) + value
        out["held_bytes"] = sum(value for key, value in held_parts.items() if key != "pool_in_use")
        out["held_parts"] = held_parts
        out["unreferenced_blocks"] = sum(r["unreferenced_blocks"] for r in reports)
        parts_total: dict[str, dict[str, int]] = {"k": {}, "v": {}, "shared": {}}
        for r in reports:
            for group, parts in r["parts"].items():
                for key, value in parts.items():
                    parts_total[group][key] = parts_total[group].get(key, 0) + value
        shared = sum(parts_total["shared"].values())
        elem = _element_size(self)
        for name in ("k", "v"):
            dense = sum(r["dense_bytes"][name] for r in reports)
            held = sum(parts_total[name].values()) + shared / 2  # block tables and perms serve K and V alike
            out[name] = _ratios(dense, held, elem)
            out[name]["parts"] = parts_total[name]
        out.update(_ratios(out["k"]["dense_bytes"] + out["v"]["dense_bytes"],
                           out["k"]["compressed_bytes"] + out["v"]["compressed_bytes"], elem))
        out["shared_parts"] = parts_total["shared"]
        out["config"] = self.kvcomp_config.to_dict()
        out["storage_layout"] = self.kvcomp_config.storage_layout  # "auto" resolved
        return out


def _ratios(dense: int, held: float, element_size: int) -> dict:
    n_values = dense // element_size if element_size else 0
    return {"dense_bytes": dense, "compressed_bytes": held,
            "bits_per_value": 8 * held / n_values if n_values else 0.0,
            "compression_ratio": dense / held if held else 0.0}


def _element_size(cache: KVCompCache) -> int:
    for layer in cache.layers:
        if layer.is_initialized:
            return layer.dtype.itemsize
    return 0
