"""Reference codec in PyTorch: the executable specification of kvcomp's compressed block format.

The Triton kernels (kvcomp_hf.kernels) must produce and read exactly these bytes.

Pipeline for one block of `block_size` = 64 tokens of one sequence (K and V of all KV heads):

0. Rotate (config.rotation == "hadamard"): the K and V this codec encodes are the model's K and V
   of layer l in rotated coordinates, x_rot = (x ⊙ s_{l,kv,h}) · H_D per KV head h, with the sign
   vectors and the block-diagonal Hadamard matrix H_D of kvcomp_hf.rotation (rebuilt from
   config.rotation_seed and l). The cache applies it before stage 1 (its uncompressed tail holds
   rotated K/V too), and readers rotate q and un-rotate the attention output: stages 1-4 and the
   kernels never see the rotation. "none": x_rot = x.

1. Quantise (per token, or per token and KV head: `granularity`). For each group of values x
   with minimum m and maximum M (computed in the model dtype, so m is exact):
       step = bf16_round_toward_zero(rel * (M - m))        # rel*(M-m) computed in float32
       q    = clamp(round_half_even((x - m) / step), 0, 2**bits - 1)    # float32 arithmetic
       x̂    = m + step * q                                  # |x - x̂| <= step / 2 <= rel*(M-m)/2
   step == 0 (a constant group) gives q = 0 and x̂ = m exactly. `bits` depends only on rel:
   bits_for_rel(rel). The group's m is stored in the model dtype, step as bfloat16.
   A group without a finite range (it holds a NaN or ±inf, or M - m overflows float32) is stored
   as m = NaN, step = NaN, q = 0: it decodes as NaN (attention over it is NaN, as with a full
   cache holding an inf), and the packs, bit widths and error bound of every other group are
   unaffected.

2. Repack ("median"): one permutation of the 64 tokens, shared by K and V and all heads, sorts
   tokens by the lower median of their quantised V integers (over all heads and channels),
   descending, ties broken by ascending original index. perm[j] = original in-block index of the
   token stored at position j. "none" stores the identity. Attention is invariant to a joint
   permutation of K and V rows (K is post-RoPE), and the mask follows the tokens through perm.

3. Bit-pack, separately for each (block, K|V, KV head): a *segment*. With D = head_dim and
   P = pack_size, the permuted 64 x D integers form n_packs = (64 / P) * D packs of P tokens x 1
   channel; pack i = p * D + c covers tokens p*P .. p*P+P-1 of channel c. For each pack:
       pmin = min(values), L = bit_length(max - pmin)   (0 <= L <= bits; L = 0: no payload)
   Segment layout (all bit streams little-endian: field bit k sits at stream bit (offset + k),
   stream bit n is bit (n % 8) of byte (n // 8)):
       [pack mins  : n_packs fields of `bits` bits, pack order]
       [pack widths: n_packs fields of width_bits(bits) = bit_length(bits) bits, pack order]
       [zero padding up to a multiple of 4 bytes: the payload starts on a 32-bit word]
       [payload    : pack after pack in pack order; value j of pack i (token p*P + j) is an
                     L_i-bit field at payload bit (P * sum_{i' < i} L_i' + j * L_i)]
       [zero padding up to a multiple of 4 bytes]
   n_packs is a multiple of 8 (head_dim % 8 == 0), so both metadata sections end on a byte.
   With pack_size 64 (the default) a pack is one channel of the whole block: its L-bit fields fill
   2*L whole 32-bit words, so every channel starts on a word and the decode kernel reads it with
   fixed-shape loads (one exclusive sum of D widths per segment, no per-16-token packs).
   Layout "fixed" (config.layout): no metadata sections; every pack is one channel of the block
   (pack_size 64) with pmin = 0 and L = bits, so the segment is the D channels' 64 `bits`-bit fields
   of q itself, channel c at 32-bit word 2 * bits * c, and every segment has 8 * D * bits bytes.
   With bits 4 and 2 the F = 32 / bits fields of each 32-bit word are in pair order: field j of word w
   (token F*w + j of the channel) sits at bit (j // 2) * bits + (j % 2) * 16, so tokens 2i and 2i + 1
   occupy the same bits of the low and the high half-word (the decode kernel turns both into bf16 with
   one shift and one mask). Other widths are the plain little-endian stream.
   Layout "fixed_v": K segments as "packed" (pack_size 64), V segments as "fixed".

4. Storage of a batch of n blocks (EncodedBlocks): the segments back to back in `data` in the
   order (block, K then V, head), each starting at a 4-byte-aligned offset; `seg_offset` and
   `seg_bytes` [n, 2, H] int64; `token_min` [n, 2, 64, G] in the model dtype and `token_step`
   [n, 2, 64, G] bfloat16 in permuted token order (G = 1 for "token", H for "token_head");
   `perm` [n, 64] uint8. A cache layer keeps its blocks in a BlockStore (kvcomp_hf/block_store.py):
   the same arrays per *slot*, offsets into one byte pool, plus the format (BlockFormat, rel_k/rel_v,
   rotation); store_slots/decode_store read slots of it here, and both Triton kernels take it.

5. The tail (config.tail_bits = 8; None keeps it in the model dtype): the tokens not yet in a block, past
   the sinks, are stored per (token, KV head) as TAIL_BITS-bit codes over head_dim (rotated, as blocks):
       m, M = min, max of the token's D values (model dtype, exact)
       scale = (M - m) / 255                       # float32
       q = clamp(round_half_even((x - m) / scale), 0, 255)     (scale 0: q = 0)
       x̂ = model_dtype(m + q * scale)               # |x - x̂| <= scale / 2, plus the final rounding
   one row of D + 2 * itemsize bytes per token: the D codes, then m and M as the model dtype's bytes
   (encode_tail / decode_tail). The sinks stay in the model dtype. Blocks are compressed from x̂.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import MAX_BITS, MAX_FIXED_BITS, TAIL_BITS, KVCompConfig, bits_for_rel  # noqa: F401 (the codec's names)

if TYPE_CHECKING:  # the codec reads a store; the store module imports the codec
    from .block_store import BlockStore

BLOCK_SIZE = 64
def width_bits(bits: int) -> int:
    """Bits of a pack's width field, which holds 0..bits."""
    return bits.bit_length()


@dataclass(frozen=True)
class BlockFormat:
    """Everything needed to read and size a segment, besides the bytes themselves."""

    num_heads: int
    head_dim: int
    pack_size: int
    bits_k: int
    bits_v: int
    granularity: str
    repack: str
    layout: str = "packed"

    @classmethod
    def from_config(cls, config: KVCompConfig, num_heads: int, head_dim: int) -> BlockFormat:
        if head_dim % 8 != 0:
            raise ValueError(f"head_dim must be a multiple of 8 for kvcomp, got {head_dim}")
        bits_k, bits_v = bits_for_rel(config.rel_k), bits_for_rel(config.rel_v)
        return cls(num_heads=num_heads, head_dim=head_dim, pack_size=config.pack_size, bits_k=bits_k, bits_v=bits_v,
                   granularity=config.granularity, repack=config.repack, layout=config.storage_layout)

    @property
    def groups(self) -> int:
        return 1 if self.granularity == "token" else self.num_heads

    @property
    def n_packs(self) -> int:
        return BLOCK_SIZE // self.pack_size * self.head_dim

    def bits(self, kv: int) -> int:
        return (self.bits_k, self.bits_v)[kv]

    def fixed(self, kv: int) -> bool:
        """Whether segments of K (kv 0) or V (kv 1) are fixed: no metadata, every field `bits` wide."""
        return self.layout == "fixed" or (self.layout == "fixed_v" and kv == 1)

    def meta_bytes(self, kv: int) -> int:
        """Pack mins + widths, padded to a multiple of 4 bytes so that the payload starts on a 32-bit word."""
        if self.fixed(kv):
            return 0
        b = self.bits(kv)
        return _round_up4(self.n_packs * (b + width_bits(b)) // 8)

    def paired(self, kv: int) -> bool:
        """Fixed segments with 4- or 2-bit fields store each 32-bit word's fields in pair order (see the module
        docstring): one shift and one mask then give two adjacent tokens as the two halves of a word."""
        return self.fixed(kv) and self.bits(kv) in (2, 4)

    def field_offsets(self, kv: int, width: torch.Tensor, device) -> torch.Tensor:
        """Bit offset of field j (j = 0 .. pack_size - 1) inside its pack, for packs of `width` bits."""
        j = torch.arange(self.pack_size, device=device)
        if not self.paired(kv):
            return j * width
        per_word = 32 // self.bits(kv)
        return j // per_word * 32 + (j % per_word) // 2 * width + (j % 2) * 16

    def max_segment_bytes(self, kv: int) -> int:
        return _round_up4(self.meta_bytes(kv) + BLOCK_SIZE * self.head_dim * self.bits(kv) // 8)


def _round_up4(n):
    return (n + 3) // 4 * 4


@dataclass
class EncodedBlocks:
    data: torch.Tensor        # uint8 [total bytes]
    seg_offset: torch.Tensor  # int64 [n, 2, H]
    seg_bytes: torch.Tensor   # int64 [n, 2, H]
    token_min: torch.Tensor   # model dtype [n, 2, 64, G]
    token_step: torch.Tensor  # bfloat16 [n, 2, 64, G]
    perm: torch.Tensor        # uint8 [n, 64]

    @property
    def num_blocks(self) -> int:
        return self.perm.shape[0]


# ---------------------------------------------------------------------------------------------
# Quantisation


def encode_tail(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] (model dtype, rotated) -> uint8 rows [..., D + 2 * itemsize]: stage 5's codes, then m and M."""
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    lo32 = lo.float()
    scale = (hi.float() - lo32) / (2**TAIL_BITS - 1)
    safe = scale.masked_fill(scale == 0, 1.0)
    q = torch.clamp(torch.round((x.float() - lo32) / safe), 0, 2**TAIL_BITS - 1).to(torch.uint8)
    return torch.cat([q, torch.cat([lo, hi], -1).view(torch.uint8)], -1)


def decode_tail(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """encode_tail's rows [..., D + 2 * itemsize] -> x̂ [..., D] in `dtype`."""
    size = dtype.itemsize
    d = rows.shape[-1] - 2 * size
    lo_hi = rows[..., d:].contiguous().view(dtype).float()
    lo, hi = lo_hi[..., :1], lo_hi[..., 1:]
    scale = (hi - lo) / (2**TAIL_BITS - 1)
    return (rows[..., :d].float() * scale + lo).to(dtype)


def round_step_to_bf16(step: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 rounding toward zero (step >= 0), so the stored step never exceeds
    rel * (M - m) and the error bound holds with the stored value."""
    bits = step.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


def quantize(x: torch.Tensor, rel: float, bits: int, granularity: str):
    """x: [n, H, T, D] in the model dtype -> (q int32 [n, H, T, D], token_min [n, T, G], token_step bf16 [n, T, G])."""
    n, h, t, d = x.shape
    groups = x.permute(0, 2, 1, 3)  # [n, T, H, D]
    groups = groups.reshape(n, t, 1, h * d) if granularity == "token" else groups
    lo = groups.amin(-1)  # [n, T, G], exact in the model dtype
    hi = groups.amax(-1)
    step = round_step_to_bf16(torch.tensor(rel, dtype=torch.float32) * (hi.float() - lo.float()))
    finite = torch.isfinite(step)  # NaN or ±inf in the group: stored as NaN, q = 0 (see the module docstring)
    lo, step = lo.masked_fill(~finite, math.nan), step.masked_fill(~finite, math.nan)
    step32 = step.float()
    safe = torch.where(step32 > 0, step32, torch.ones_like(step32))
    q = torch.round((groups.float() - lo.float()[..., None]) / safe[..., None])
    q = torch.where(step32[..., None] > 0, q, torch.zeros_like(q)).clamp_(0, (1 << bits) - 1)
    q = q.to(torch.int32).reshape(n, t, h, d).permute(0, 2, 1, 3)
    return q, lo, step


def dequantize(q: torch.Tensor, token_min: torch.Tensor, token_step: torch.Tensor) -> torch.Tensor:
    """q [n, H, T, D], token_min/step [n, T, G] -> float32 [n, H, T, D]."""
    lo = token_min.float().permute(0, 2, 1)[..., None]   # [n, G, T, 1]; G = 1 broadcasts over heads
    step = token_step.float().permute(0, 2, 1)[..., None]
    return lo + step * q.float()


def median_order(v_q: torch.Tensor) -> torch.Tensor:
    """v_q [n, H, 64, D] -> perm [n, 64] int64: tokens by descending lower median of their V ints."""
    n, h, t, d = v_q.shape
    med = v_q.permute(0, 2, 1, 3).reshape(n, t, h * d).median(dim=-1).values.long()
    key = med * t + (t - 1 - torch.arange(t, device=v_q.device))  # unique: ties by ascending index
    return key.argsort(dim=-1, descending=True)


# ---------------------------------------------------------------------------------------------
# Bit streams


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Exact bit length of non-negative ints < 2**MAX_BITS."""
    out = torch.zeros_like(x)
    for k in range(MAX_BITS):
        out += (x >= (1 << k)).to(x.dtype)
    return out


def _write_fields(stream: torch.Tensor, values: torch.Tensor, nbits: torch.Tensor, offsets: torch.Tensor):
    """Write field values (int64, each < 2**nbits <= 2**16) at stream bit offsets. stream: int64, one entry
    per byte plus 3 spare entries (a zero-width field may start at the very end). A field covers at most 3
    bytes and fields never overlap, so adding each field's three byte parts into the stream sets its bits."""
    shifted = values << (offsets & 7)
    byte = offsets >> 3
    for i in range(3):
        stream.index_add_(0, byte + i, (shifted >> (8 * i)) & 0xFF)


def _read_fields(words: torch.Tensor, nbits: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Read fields of nbits (<= 16) bits at stream bit offsets; words = _byte_words(data)."""
    window = words[offsets >> 3]
    return (window >> (offsets & 7).to(torch.int32)) & ((1 << nbits.to(torch.int32)) - 1)


def _byte_words(data: torch.Tensor) -> torch.Tensor:
    """int32 [n + 1]: bytes i, i+1, i+2 of data as one little-endian word (3-byte read windows);
    the extra entry serves zero-width fields that start at the very end."""
    padded = torch.cat([data, data.new_zeros(3)]).to(torch.int32)
    return padded[:-2] | (padded[1:-1] << 8) | (padded[2:] << 16)


def _segment_layout(q: torch.Tensor, fmt: BlockFormat, kv: int):
    """q [n, H, 64, D] (permuted) -> per segment the fields to write, in pack order."""
    n, h, t, d = q.shape
    p = fmt.pack_size
    packs = q.reshape(n, h, t // p, p, d)
    if fmt.fixed(kv):
        pmin = torch.zeros_like(packs[:, :, :, 0])
        width = torch.full_like(pmin, fmt.bits(kv))
    else:
        pmin = packs.amin(3)                           # [n, H, 64/P, D]
        width = bit_length(packs.amax(3) - pmin)       # [n, H, 64/P, D]
    residual = packs - pmin[:, :, :, None, :]          # [n, H, 64/P, P, D]
    payload_bits = p * width.sum(dim=(2, 3))           # [n, H]
    seg_bytes = _round_up4(fmt.meta_bytes(kv) + (payload_bits + 7) // 8)
    return pmin.reshape(n, h, -1), width.reshape(n, h, -1), residual, seg_bytes


def encode_blocks(k: torch.Tensor, v: torch.Tensor, config: KVCompConfig) -> tuple[EncodedBlocks, BlockFormat]:
    """Compress n blocks. k, v: [n, H, 64, D] in the model dtype (one block of one sequence each)."""
    if k.shape != v.shape or k.dim() != 4 or k.shape[2] != BLOCK_SIZE:
        raise ValueError(f"k and v must both be [n, H, {BLOCK_SIZE}, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    fmt = BlockFormat.from_config(config, k.shape[1], k.shape[3])
    return encode_with_format(k, v, fmt, config.rel_k, config.rel_v), fmt


def encode_with_format(k: torch.Tensor, v: torch.Tensor, fmt: BlockFormat, rel_k: float,
                       rel_v: float) -> EncodedBlocks:
    """encode_blocks for a format already built (a BlockStore's): k, v [n, H, 64, D] in the model dtype."""
    n, h, t, d = k.shape
    qk, k_min, k_step = quantize(k, rel_k, fmt.bits_k, fmt.granularity)
    qv, v_min, v_step = quantize(v, rel_v, fmt.bits_v, fmt.granularity)
    if fmt.repack == "median":
        perm = median_order(qv)
    else:
        perm = torch.arange(t, device=k.device).expand(n, t)
    gather_q = perm[:, None, :, None].expand(n, h, t, d)
    qk, qv = qk.gather(2, gather_q), qv.gather(2, gather_q)
    gather_g = perm[:, :, None].expand(n, t, k_min.shape[-1])
    token_min = torch.stack([k_min.gather(1, gather_g), v_min.gather(1, gather_g)], 1)
    token_step = torch.stack([k_step.gather(1, gather_g), v_step.gather(1, gather_g)], 1)

    layouts = [_segment_layout(qk, fmt, 0), _segment_layout(qv, fmt, 1)]
    seg_bytes = torch.stack([lay[3] for lay in layouts], 1)            # [n, 2, H]
    ends = seg_bytes.flatten().cumsum(0)
    seg_offset = (ends - seg_bytes.flatten()).view(n, 2, h)
    total = int(ends[-1]) if ends.numel() else 0
    stream = torch.zeros(total + 3, dtype=torch.int64, device=k.device)  # bytes (see _write_fields)

    for kv, (pmin, width, residual, _) in enumerate(layouts):
        b = fmt.bits(kv)
        wb = width_bits(b)
        base = seg_offset[:, kv, :, None] * 8                          # [n, H, 1] bit offset
        idx = torch.arange(fmt.n_packs, device=k.device)
        if not fmt.fixed(kv):
            _write_fields(stream, pmin.flatten().long(), torch.full((pmin.numel(),), b, device=k.device),
                          (base + idx * b).flatten())
            _write_fields(stream, width.flatten().long(), torch.full((width.numel(),), wb, device=k.device),
                          (base + fmt.n_packs * b + idx * wb).flatten())
        pack_start = base + fmt.meta_bytes(kv) * 8 + fmt.pack_size * (width.cumsum(-1) - width)  # [n,H,np]
        # residual [n, H, 64/P, P, D] -> pack order (p, c) then value j: [n, H, np, P]
        vals = residual.permute(0, 1, 2, 4, 3).reshape(n, h, fmt.n_packs, fmt.pack_size)
        offsets = pack_start[..., None] + fmt.field_offsets(kv, width[..., None], k.device)
        nbits = width[..., None].expand_as(vals)
        _write_fields(stream, vals.flatten().long(), nbits.flatten(), offsets.flatten())

    enc = EncodedBlocks(data=stream[:total].to(torch.uint8), seg_offset=seg_offset, seg_bytes=seg_bytes,
                        token_min=token_min, token_step=token_step, perm=perm.to(torch.uint8))
    return enc


def decode_segments(data: torch.Tensor, seg_offset: torch.Tensor, fmt: BlockFormat, kv: int,
                    words: torch.Tensor | None = None) -> torch.Tensor:
    """Read the integers of segments at byte offsets seg_offset [...] -> int64 [..., 64, D] (permuted order).
    words: _byte_words(data), when the caller reads several times from the same data."""
    shape = seg_offset.shape
    base = seg_offset.reshape(-1, 1) * 8
    b, wb, p, d = fmt.bits(kv), width_bits(fmt.bits(kv)), fmt.pack_size, fmt.head_dim
    idx = torch.arange(fmt.n_packs, device=data.device)
    words = _byte_words(data) if words is None else words
    if fmt.fixed(kv):
        pmin = torch.zeros_like(base + idx)
        width = torch.full_like(pmin, b)
    else:
        pmin = _read_fields(words, torch.full_like(idx, b), base + idx * b)
        width = _read_fields(words, torch.full_like(idx, wb), base + fmt.n_packs * b + idx * wb)
    pack_start = base + fmt.meta_bytes(kv) * 8 + p * (width.cumsum(-1) - width)   # [S, np]
    vals = _read_fields(words, width[..., None].expand(-1, -1, p),
                        pack_start[..., None] + fmt.field_offsets(kv, width[..., None], data.device))
    q = (vals + pmin[..., None])                                   # [S, np, P], np = (64/P) * D in (p, c) order
    q = q.view(-1, BLOCK_SIZE // p, d, p).permute(0, 1, 3, 2).reshape(-1, BLOCK_SIZE, d)
    return q.view(*shape, BLOCK_SIZE, d)


def decode_blocks(enc: EncodedBlocks, fmt: BlockFormat, original_order: bool = True):
    """-> (k_hat, v_hat) float32 [n, H, 64, D]; in arrival order unless original_order=False."""
    out = []
    words = _byte_words(enc.data)
    for kv in (0, 1):
        q = decode_segments(enc.data, enc.seg_offset[:, kv], fmt, kv, words)     # [n, H, 64, D]
        x = dequantize(q, enc.token_min[:, kv], enc.token_step[:, kv])
        if original_order:
            x = unpermute(x, enc.perm)
        out.append(x)
    return out[0], out[1]


def store_slots(store: BlockStore, slots: torch.Tensor) -> EncodedBlocks:
    """The blocks of a BlockStore at slot ids `slots` (any shape, flattened) as EncodedBlocks over the store's
    pool up to its used_bound (not the spare capacity: the reader indexes all of `data`)."""
    flat = slots.reshape(-1).long()
    return EncodedBlocks(data=store.pool[: store.used_bound], seg_offset=store.seg_offset[flat],
                         seg_bytes=store.seg_bytes[flat].long(), token_min=store.token_min[flat],
                         token_step=store.token_step[flat], perm=store.perm_of(store.n_slots)[flat])


def decode_store(store: BlockStore, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantise the blocks of a BlockStore at slot ids `slots` (any shape) -> float32 K, V
    [*slots.shape, H, 64, D] in arrival order (stored coordinates: rotated when store.rotation is set)."""
    k, v = decode_blocks(store_slots(store, slots), store.fmt)
    tail = tuple(k.shape[1:])
    return k.view(*slots.shape, *tail), v.view(*slots.shape, *tail)


def unpermute(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Undo the in-block permutation along dim 2 of [n, H, 64, D]."""
    n, h, t, d = x.shape
    inverse = perm.long().argsort(dim=-1)
    # whole rows of D values (one index_select) rather than a gather of every value
    rows = (inverse[:, None, :] + t * torch.arange(n * h, device=x.device).view(n, h, 1)).reshape(-1)
    return x.reshape(n * h * t, d).index_select(0, rows).view(n, h, t, d)


# ---------------------------------------------------------------------------------------------
# Byte accounting


def metadata_bytes_per_block(fmt: BlockFormat, dtype: torch.dtype) -> dict[str, int]:
    """Fixed bytes the cache stores per block besides the segments, per K and V."""
    per_kv = {
        "token_min": BLOCK_SIZE * fmt.groups * torch.empty((), dtype=dtype).element_size(),
        "token_step": BLOCK_SIZE * fmt.groups * 2,
        "seg_offset": fmt.num_heads * 8,   # int64 byte offset of each segment in the pool
        "seg_bytes": fmt.num_heads * 4,    # int32 size of each segment (for accounting and crop)
    }
    return per_kv


def segment_breakdown(seg_bytes: torch.Tensor, fmt: BlockFormat, kv: int) -> dict[str, int]:
    """Split stored segment bytes [any] of K (kv=0) or V (kv=1) into pack metadata and payload (+padding)."""
    total = int(seg_bytes.sum())
    meta = fmt.meta_bytes(kv) * seg_bytes.numel()
    return {"pack_meta": meta, "payload": total - meta}
