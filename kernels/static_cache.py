"""The static cache's decode step as two custom ops that a CUDA graph can capture (kvcomp_hf.cache.KVCompStaticLayer).

Storage of one layer is preallocated for max_cache_len tokens x batch, layout "fixed" only (every segment has
8 * D * bits bytes, so every slot lives at a fixed pool offset):
  slot of block i of row b  = b * NB + i            (NB = max blocks per row; block table row b = b*NB .. b*NB+NB-1)
  segment (slot, kv, head)  = slot * H * (SK + SV) + kv * H * SK + head * (SK, SV)[kv]   bytes
which is where store_blocks puts slots slot_start.. when pool_used starts at slot_start * H * (SK + SV)
(BlockStore.preallocate_fixed lays the store out so).
The uncompressed tail is a ring of RING tokens (a multiple of 64, >= residual_length + 64): token p at row p % RING,
so every block's 64 tokens are contiguous rows. ctl (int64 [4], on the device) = [kv_len, nb, done counter, 0].
The ops take every layer's ring, ctl, pool and token statistics stacked on dim 0, and the layer's index.

kvcomp::static_append (one launch, grid (B,)): writes the step's token (rotated first for a rotated layer, with the
products and sums of kernels/rotate.py) into the ring at kv_len % RING; when the
tail then holds residual_length + 64 tokens it compresses its oldest block into slot b * NB + nb (decided on the
device, so the launch is the same every step); the last program to finish advances ctl.
kvcomp::static_decode: the tokens-in-M decode kernel with DEV=True (lengths and split counts read on the device,
fixed grid from the largest split count) and the combine kernel, which also rotates the output back. Neither
syncs with the host or allocates storage that outlives the call; the results equal KVCompLayer's for the same
tokens (same splits, same tail chunks), so greedy tokens match the eager cache.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvcomp_hf.block_store import device_context
from kvcomp_hf.codec import BlockFormat

from .decode_attention import (LOG2E, _combine_kernel, _static_args, _tokens_in_m_kernel, choose_tuning,
                               chunk_fields, combine_rotation)
from .rotate import hadamard_cols
from .store import _load_tile, _row_stats, _token_stats_over_heads, _write_pack64


@triton.jit
def _compress_ring_block(ring, s_b, s_h, s_t, b, rows, slot, seg0, kv, pool32, tmin_ptr, tstep_ptr,
                         tm_s, tm_kv, tm_t, ts_s, ts_kv, ts_t, H, rel,
                         D: tl.constexpr, BITS: tl.constexpr, CW: tl.constexpr, CJ: tl.constexpr,
                         TOKEN_GRAN: tl.constexpr):
    """K (kv=0) or V (kv=1) of one block (ring rows `rows` of row b) -> token_min/step of `slot` and H segments of
    8 * D * BITS bytes from byte seg0, as store_blocks writes them for layout "fixed"."""
    idx = tl.arange(0, 64)
    if TOKEN_GRAN:
        lo, step = _token_stats_over_heads(ring, b, s_b, s_h, rows, s_t, 1, H, rel, D, False)
        tl.store(tmin_ptr + slot * tm_s + kv * tm_kv + idx * tm_t, lo.to(tmin_ptr.dtype.element_ty))
        tl.store(tstep_ptr + slot * ts_s + kv * ts_kv + idx * ts_t, step.to(tl.bfloat16))
    for h in range(H):
        x = _load_tile(ring, b, s_b, h, s_h, rows, s_t, 1, D, False)
        if not TOKEN_GRAN:
            lo, step = _row_stats(x, rel)
            tl.store(tmin_ptr + slot * tm_s + kv * tm_kv + idx * tm_t + h, lo.to(tmin_ptr.dtype.element_ty))
            tl.store(tstep_ptr + slot * ts_s + kv * ts_kv + idx * ts_t + h, step.to(tl.bfloat16))
        _write_pack64(pool32, x, lo, step, seg0 + h * (8 * D * BITS), D, BITS, 1, 0, 1, CW, CJ, True)


@triton.jit
def _put_token(x_ptr, sx_b, sx_h, sx_d, ring, sr_b, sr_h, sr_t, b, r, H, signs_ptr, h_ptr, rot_scale,
               D: tl.constexpr, ROTATE: tl.constexpr, HR: tl.constexpr, RC: tl.constexpr):
    """Row b's new token (x [B, H, 1, D]) -> ring row r of every head, rotated first with ROTATE (signs_ptr:
    this K or V's [H, D] signs; HR >= 16 heads at a time, the tile kernels/rotate.py uses for a decode step)."""
    cols = tl.arange(0, D)
    for h0 in range(0, H, HR):
        hr = h0 + tl.arange(0, HR)
        ok = hr[:, None] < H
        x = tl.load(x_ptr + b * sx_b + hr[:, None] * sx_h + cols[None, :] * sx_d, mask=ok, other=0.0)
        dst = ring + b * sr_b + hr[:, None] * sr_h + r * sr_t
        if ROTATE:
            x = x.to(tl.float32) * tl.load(signs_ptr + hr[:, None] * D + cols[None, :], mask=ok, other=0.0)
            for c in tl.static_range(D // RC):
                dc = c * RC + tl.arange(0, RC)
                y = hadamard_cols(x, h_ptr, c, rot_scale, D, RC)
                tl.store(dst + dc[None, :], y.to(ring.dtype.element_ty), mask=ok)
        else:
            tl.store(dst + cols[None, :], x.to(ring.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["NB", "B"])
def _append_kernel(kn_ptr, skn_b, skn_h, skn_d, vn_ptr, svn_b, svn_h, svn_d,
                   rk_ptr, rv_ptr, sr_b, sr_h, sr_t, ctl_ptr, pool32,
                   tmin_ptr, tstep_ptr, tm_s, tm_kv, tm_t, ts_s, ts_kv, ts_t,
                   NB, B, H, RING, RESIDUAL, rel_k, rel_v, signs_ptr, h_ptr, rot_scale,
                   D: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr, CW_K: tl.constexpr,
                   CW_V: tl.constexpr, CJ_K: tl.constexpr, CJ_V: tl.constexpr, TOKEN_GRAN: tl.constexpr,
                   ROTATE: tl.constexpr, HR: tl.constexpr, RC: tl.constexpr):
    b = tl.program_id(0)
    kv_len = tl.load(ctl_ptr)
    nb = tl.load(ctl_ptr + 1)
    r = kv_len % RING
    _put_token(kn_ptr, skn_b, skn_h, skn_d, rk_ptr, sr_b, sr_h, sr_t, b, r, H, signs_ptr, h_ptr, rot_scale,
               D, ROTATE, HR, RC)
    _put_token(vn_ptr, svn_b, svn_h, svn_d, rv_ptr, sr_b, sr_h, sr_t, b, r, H, signs_ptr + H * D, h_ptr, rot_scale,
               D, ROTATE, HR, RC)
    # The tail now holds kv_len + 1 - 64 nb tokens; the block to compress never holds the new token
    # (RESIDUAL >= 128), so no barrier is needed between the writes above and the reads below.
    full = kv_len + 1 - nb * 64 >= RESIDUAL + 64
    if full:
        rows = (nb * 64) % RING + tl.arange(0, 64)
        slot = b.to(tl.int64) * NB + nb
        seg0 = slot * H * (8 * D * (BITS_K + BITS_V))
        _compress_ring_block(rk_ptr, sr_b, sr_h, sr_t, b, rows, slot, seg0, 0, pool32, tmin_ptr, tstep_ptr,
                             tm_s, tm_kv, tm_t, ts_s, ts_kv, ts_t, H, rel_k, D, BITS_K, CW_K, CJ_K, TOKEN_GRAN)
        _compress_ring_block(rv_ptr, sr_b, sr_h, sr_t, b, rows, slot, seg0 + H * (8 * D * BITS_K), 1, pool32,
                             tmin_ptr, tstep_ptr, tm_s, tm_kv, tm_t, ts_s, ts_kv, ts_t, H, rel_v, D, BITS_V,
                             CW_V, CJ_V, TOKEN_GRAN)
    # Every program read ctl before its increment; the last one to increment advances ctl for the next launch.
    done = tl.atomic_add(ctl_ptr + 2, 1, sem="acq_rel")
    if done == B - 1:
        tl.store(ctl_ptr, kv_len + 1)
        tl.store(ctl_ptr + 1, nb + full.to(tl.int64))
        tl.store(ctl_ptr + 2, 0)


def _fmt(num_heads: int, head_dim: int, bits_k: int, bits_v: int, token_gran: bool) -> BlockFormat:
    return BlockFormat(num_heads=num_heads, head_dim=head_dim, pack_size=64, bits_k=bits_k, bits_v=bits_v,
                       granularity="token" if token_gran else "token_head", repack="none", layout="fixed")


def _layer_slices(layer: int, *stacked: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Layer `layer`'s slice of each of the ops' stacked [layers, ...] tensors."""
    return tuple(t[layer] for t in stacked)


@torch.library.custom_op("kvcomp::static_append", mutates_args=("ring_k", "ring_v", "ctl", "pool", "token_min",
                                                               "token_step"))
def static_append(k_new: torch.Tensor, v_new: torch.Tensor, layer: int, ring_k: torch.Tensor, ring_v: torch.Tensor,
                  ctl: torch.Tensor, pool: torch.Tensor, token_min: torch.Tensor, token_step: torch.Tensor,
                  residual: int, rel_k: float, rel_v: float, bits_k: int, bits_v: int, token_gran: bool,
                  signs: Optional[torch.Tensor], h_pm1: Optional[torch.Tensor], rot_scale: float) -> None:
    """Append one token per row (k_new, v_new [B, H, 1, D]) to layer `layer`'s ring and compress a full block (see
    module). ring_k, ring_v, ctl, pool, token_min, token_step: every layer's, stacked on dim 0 (a compiled step then
    sees one tensor of each, not one per layer). signs (float32 [layers, 2, H, D], K's and V's) and h_pm1 (the ±1
    matrix [D, D]): rotate k_new and v_new first (kvcomp_hf/rotation.py; the same products and sums as
    kernels/rotate.py); None: they are stored as given."""
    ring_k, ring_v, ctl, pool, token_min, token_step = _layer_slices(layer, ring_k, ring_v, ctl, pool, token_min,
                                                                     token_step)
    B, H, ring, D = ring_k.shape
    rotate = signs is not None
    if rotate:
        signs = signs[layer]
    with device_context(k_new.device):
        _append_kernel[(B,)](
            k_new, k_new.stride(0), k_new.stride(1), k_new.stride(3),
            v_new, v_new.stride(0), v_new.stride(1), v_new.stride(3),
            ring_k, ring_v, ring_k.stride(0), ring_k.stride(1), ring_k.stride(2), ctl, pool.view(torch.int32),
            token_min, token_step, token_min.stride(0), token_min.stride(1), token_min.stride(2),
            token_step.stride(0), token_step.stride(1), token_step.stride(2),
            token_min.shape[0] // B, B, H, ring, residual, rel_k, rel_v,
            signs if rotate else ctl, h_pm1 if rotate else ctl, rot_scale,
            ROTATE=rotate, HR=max(16, triton.next_power_of_2(H)) if rotate else triton.next_power_of_2(H),
            RC=min(D, 64), D=D, BITS_K=bits_k, BITS_V=bits_v, CW_K=2 * triton.next_power_of_2(bits_k),
            CW_V=2 * triton.next_power_of_2(bits_v), CJ_K=chunk_fields(bits_k, 64), CJ_V=chunk_fields(bits_v, 64),
            TOKEN_GRAN=token_gran, num_warps=4 if D <= 64 else 8, num_stages=1)


@static_append.register_fake
def _(k_new, v_new, layer, ring_k, ring_v, ctl, pool, token_min, token_step, residual, rel_k, rel_v, bits_k, bits_v,
      token_gran, signs, h_pm1, rot_scale):
    return None


@torch.library.custom_op("kvcomp::static_decode", mutates_args=("scratch",))
def static_decode(q: torch.Tensor, layer: int, ring_k: torch.Tensor, ring_v: torch.Tensor, ctl: torch.Tensor,
                  splits: torch.Tensor, pool: torch.Tensor, seg_offset: torch.Tensor, token_min: torch.Tensor,
                  token_step: torch.Tensor, block_table: torch.Tensor, kv_valid: Optional[torch.Tensor],
                  scratch: torch.Tensor, scaling: float, bits_k: int, bits_v: int, token_gran: bool,
                  max_splits: int, signs: Optional[torch.Tensor], h_pm1: Optional[torch.Tensor],
                  rot_scale: float) -> torch.Tensor:
    """Attention of q [B, Hq, 1, D] (rotated like the stored keys) over layer `layer`'s blocks + ring ->
    [B, Hq, 1, D]. ring_k, ring_v, ctl, pool, token_min, token_step and signs: stacked as static_append takes them.
    scratch: scratch_values(...) float32 values (the partials of the splits and tail chunks). signs (float32
    [layers, 2, H, D]) and h_pm1: the output is rotated back with the V rotation in the combine; None: returned as
    computed."""
    ring_k, ring_v, ctl, pool, token_min, token_step = _layer_slices(layer, ring_k, ring_v, ctl, pool, token_min,
                                                                     token_step)
    signs_v = None if signs is None else signs[layer, 1]
    B, Hq, qlen, D = q.shape
    H, ring = ring_k.shape[1], ring_k.shape[2]
    fmt = _fmt(H, D, bits_k, bits_v, token_gran)
    tuning = choose_tuning(D, B, H, 0)  # (what varies with the block count, the splits, comes from `splits`)
    M, _consts, tm, comb = _static_args(fmt, q.dtype, ring_k.dtype, Hq // H, qlen, D, kv_valid is not None, tuning)
    n_ml = B * H * (max_splits + ring // 64) * M
    m_part, l_part, acc_part = scratch[:n_ml], scratch[n_ml:2 * n_ml], scratch[2 * n_ml:n_ml * (D + 2)]
    if kv_valid is not None:
        valid_arg = kv_valid.view(torch.uint8) if kv_valid.dtype == torch.bool else kv_valid
        va_b = kv_valid.stride(0)
    else:
        valid_arg, va_b = block_table, 0
    out = torch.empty_like(q)
    args = (q, *q.stride(), ring_k, *ring_k.stride(), ring_v, *ring_v.stride(), 0,
            pool.view(torch.int32), seg_offset, seg_offset.stride(0), seg_offset.stride(1),
            token_min, token_min.stride(0), token_min.stride(1), token_min.stride(2),
            token_step, token_step.stride(0), token_step.stride(1), token_step.stride(2),
            block_table, block_table.stride(0), 0, valid_arg, va_b, m_part, l_part, acc_part,
            float(scaling) * LOG2E, 1, 0, 1, ctl, splits, ring)
    with device_context(q.device):
        if max_splits:
            _tokens_in_m_kernel[(B, H, max_splits)](*args, FIXED_K=True, FIXED_V=True, TAIL=False, DEV=True,
                                                    SPLIT_V=tuning.split_v, PRMT=tuning.prmt_unpack, **tm)
        _tokens_in_m_kernel[(B, H, ring // 64)](*args, FIXED_K=True, FIXED_V=True, TAIL=True, DEV=True, SPLIT_V=False,
                                                **tm)
        _combine_kernel[(B, Hq, qlen)](m_part, l_part, acc_part, out, *out.stride(), H, 1, ctl_ptr=ctl,
                                       split_ptr=splits, DEV=True, **comb,
                                       **combine_rotation(signs_v, h_pm1, rot_scale))
    return out


@static_decode.register_fake
def _(q, layer, ring_k, ring_v, ctl, splits, pool, seg_offset, token_min, token_step, block_table, kv_valid, scratch,
      scaling, bits_k, bits_v, token_gran, max_splits, signs, h_pm1, rot_scale):
    return torch.empty_like(q)


def scratch_values(batch: int, kv_heads: int, group: int, head_dim: int, max_splits: int, ring: int) -> int:
    """float32 values static_decode's scratch needs: (max_splits + ring / 64) partials per (batch, kv head)."""
    m = max(16, triton.next_power_of_2(group))
    return batch * kv_heads * (max_splits + ring // 64) * m * (head_dim + 2)
