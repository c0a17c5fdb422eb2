"""Triton fused decompress + attention for decode (q_len 1..16), flash-decoding style.

Programs run over (batch, kv-head, split of compressed blocks) plus one extra split per
(batch, kv-head) for the dense tail. Each program walks its blocks; per block and K|V segment it
reads the pack mins and widths (one exclusive sum of the widths gives every pack's bit offset),
then the payload as chunks of CJ fields (CJ * width <= 32 bits, two 32-bit words each), unpacks
the residuals r straight into a [64, D] dot operand (bf16 bit patterns 0x4300 | r = 128 + r), scores
all query rows of the GQA group (q_len x group rows, padded to 16 for the matrix unit), keeps an
online softmax and accumulates V. Scale, token min and pack min fold out of the per-value work:
    q . k_hat_t = step_t * (q . r_t + sum_c q_c pmin_c) + min_t * sum(q)
    sum_t p_t v_hat_t = sum_t (p_t step_t) r_t + pmin * sum_t p_t step_t + sum_t p_t min_t
A combine kernel merges the splits (one softmax over all tokens) and writes out in q's dtype.
Nothing decompressed goes to global memory; accumulation is float32.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvcomp_hf.block_store import BlockStore
from kvcomp_hf.codec import BLOCK_SIZE, BlockFormat, width_bits

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeTuning:
    """Launch settings of the decode kernel, chosen from the shape by `choose_tuning` (or given)."""

    num_warps: int = 4
    split_waves: int = 16          # aim for this many (batch, head, split) programs per SM
    min_blocks_per_split: int = 8  # but give every split at least this many blocks
    prefetch: bool = True          # issue the next block's payload loads before this block's math
    split_v: bool = True           # V weights as two dots (hi + lo), ~float32 precision; False: one
                                   # 16-bit dot (~125 fewer SASS per block, weights rounded to 2**-9; 6-8%
                                   # faster on the H200, but the rounding error of sum_t w_t q_t does not
                                   # shrink with the output where the token minimums cancel it: 1.1e-2 vs
                                   # 3e-3 relative on the small interpreter cases)
    maxnreg: int | None = None     # register cap per thread (None: the compiler's choice; for the
                                   # tokens-in-M kernel TOKENS_IN_M_MAXNREG)
    tokens_in_m: bool = False      # _tokens_in_m_kernel (block tokens as the matrix M dimension)
    prmt_unpack: bool = True       # fixed 4-bit: unpack by inline-PTX byte permutes (CUDA graph timing, H100,
                                   # 2026-12-06: 2-5% faster at 8K-32K x 1-8; ignored by the interpreter)
    tail_launch: bool = False      # tokens-in-M: the tail chunks in a launch of their own (False: the blocks'
                                   # launch runs them too, one launch and its latency fewer per call;
                                   # choose_tuning decides by the number of (batch, head) rows)

    def splits(self, batch: int, kv_heads: int, nb: int, sms: int) -> tuple[int, int]:
        """(num_splits, blocks_per_split)."""
        if nb == 0:
            return 0, 1
        want = max(1, math.ceil(self.split_waves * sms / max(1, batch * kv_heads)))
        ns = max(1, min(want, nb // self.min_blocks_per_split, nb))
        bps = math.ceil(nb / ns)
        return math.ceil(nb / bps), bps


def choose_tuning(head_dim: int, batch: int = 1, kv_heads: int = 1, nb: int = 0) -> DecodeTuning:
    """Defaults from the variants runs (eval/results/h100-2026-12-06/bench_kernels.json, CUDA graph replays): 4 warps
    up to D=128; with few (batch, head) rows, short contexts want short splits (4 blocks) and long ones long splits
    (16)."""
    rows = batch * kv_heads
    min_blocks = 8 if rows > 16 else (4 if nb < 256 else 16)
    # the tokens-in-M kernel wins with many (batch, head) rows or from 32K tokens (H100, graph replays: 0.071 vs
    # 0.078 ms at 32K x 1, 0.240 vs 0.241 at 128K x 1) and loses at 8K x 1 (0.034 vs 0.031 ms)
    # the tail's chunks in the blocks' launch pay off with few rows (8K x 1: 0.0262 vs 0.0308 ms, 32K x 1: 0.0594 vs
    # 0.0603) and cost with many (8K x 8: 0.1143 vs 0.1054, 32K x 8: 0.3658 vs 0.3429; H100, graph replays)
    return DecodeTuning(num_warps=4 if head_dim <= 128 else 8, min_blocks_per_split=min_blocks,
                        tokens_in_m=rows >= 32 or nb >= 256, tail_launch=rows >= 32)


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def chunk_fields(bits: int, pack_size: int) -> int:
    """Fields per payload chunk: CJ * bits <= 32, a power of two, at most a pack and at most 8 (the
    unpacker's join tree)."""
    return min(pack_size, 8, _pow2_floor(32 // bits))


@triton.jit
def _fields(seg, bit, BITS: tl.constexpr):
    """Fields of BITS (<= 16) bits at int32 bit offsets `bit` relative to the int32 pointer `seg`."""
    w = bit >> 5
    s = (bit & 31).to(tl.uint32)
    lo = tl.load(seg + w).to(tl.uint32, bitcast=True)
    hi = tl.load(seg + w + 1, mask=(bit & 31) + BITS > 32, other=0).to(tl.uint32, bitcast=True)
    v = (lo >> s) | ((hi << 1) << (31 - s))
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _seg_meta(seg, R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, WB: tl.constexpr):
    """Pack mins and widths of one segment -> int32 [D, R] each ([c, p]: pack p*D + c, tokens p*P..)."""
    i = tl.arange(0, R)[None, :] * D + tl.arange(0, D)[:, None]
    pmin = _fields(seg, i * BITS, BITS)
    width = _fields(seg, R * D * BITS + i * WB, WB)
    return pmin, width


@triton.jit
def _chunk_words(seg, width, META: tl.constexpr, R: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                 CJ: tl.constexpr, ONE_WORD: tl.constexpr = False):
    """Issue the payload loads of one segment: chunk k (tokens k*CJ .. k*CJ+CJ-1) of channel c is
    CJ fields of L bits (CJ * L <= 32) at a known bit offset, read as two 32-bit words (ONE_WORD: the caller
    knows no chunk straddles a word; hi is then lo and unused).
    width [D, R]. Returns (lo, hi, shift, L), each [D, 64 // CJ]."""
    GP: tl.constexpr = P // CJ
    if R == 1:
        excl = tl.cumsum(width, axis=0) - width       # exclusive sum of widths in pack (= channel) order
    else:
        flat = tl.reshape(tl.trans(width), (R * D,))
        excl = tl.trans(tl.reshape(tl.cumsum(flat, axis=0) - flat, (R, D)))
    gp = tl.arange(0, GP)[None, None, :]
    start = META * 8 + P * excl[:, :, None] + gp * (CJ * width[:, :, None])       # [D, R, GP]
    L = tl.reshape(tl.broadcast_to(width[:, :, None], (D, R, GP)), (D, R * GP))
    start = tl.reshape(start, (D, R * GP))
    wi = start >> 5
    sh = start & 31
    lo = tl.load(seg + wi, mask=L > 0, other=0).to(tl.uint32, bitcast=True)
    if ONE_WORD:
        hi = lo
    else:
        hi = tl.load(seg + wi + 1, mask=sh + CJ * L > 32, other=0).to(tl.uint32, bitcast=True)
    return lo, hi, sh, L


@triton.jit
def _funnel(lo, hi, sh):
    """The 32 bits of hi:lo starting at bit sh (0..31)."""
    s = sh.to(tl.uint32)
    return (lo >> s) | ((hi << 1) << (31 - s))


@triton.jit
def _field(x, mask, off, ADD: tl.constexpr):
    """The low field of x plus off (ADD: off may carry into the field's bits) or ORed with it (one LOP3)."""
    if ADD:
        return (x & mask) + off
    return (x & mask) | off


@triton.jit
def _tile(x, L, pmin, CJ: tl.constexpr, D: tl.constexpr, R: tl.constexpr, ADD_MIN: tl.constexpr,
          FAST: tl.constexpr, INTERP: tl.constexpr):
    """Payload chunks x [D, 64 // CJ] (see _funnel) -> the block's residuals as a dot operand [D, 64] (channel c,
    token k*CJ + j): bf16 bit patterns 0x4300 | r (= 128 + r, exact for r < 128) when FAST, else
    float32 r (pmin + r with ADD_MIN; pmin [D, R]). The CJ fields of a chunk are peeled off one after the other
    (mask, shift right by L: no per-field shift amounts to keep) in the thread that loaded it, and
    joined along new minor dimensions (registers), so each thread holds CJ adjacent tokens of one channel.
    ADD_MIN adds the chunk's pack minimum and the 0x4300 in one integer add per field (pmin + r < 128, so the
    sum is the OR), broadcast to the chunks' layout before the join, which needs no layout conversion."""
    Lu = L.to(tl.uint32)
    mask = (tl.full(L.shape, 1, tl.uint32) << Lu) - 1
    BASE: tl.constexpr = 0x4300 if FAST and not INTERP else 0
    if ADD_MIN:
        off = tl.reshape(tl.broadcast_to(pmin[:, :, None], (D, R, 64 // (CJ * R))), L.shape).to(tl.uint32) + BASE
    else:
        off = tl.full(L.shape, BASE, tl.uint32)
    f0 = _field(x, mask, off, ADD_MIN)
    x = x >> Lu
    f1 = _field(x, mask, off, ADD_MIN)
    if CJ == 2:
        v = tl.join(f0, f1)
    else:
        x = x >> Lu
        f2 = _field(x, mask, off, ADD_MIN)
        x = x >> Lu
        f3 = _field(x, mask, off, ADD_MIN)
        if CJ == 4:
            # element (a, b) of the joined dims is field 2a + b
            v = tl.join(tl.join(f0, f2), tl.join(f1, f3))
        else:
            x = x >> Lu
            f4 = _field(x, mask, off, ADD_MIN)
            x = x >> Lu
            f5 = _field(x, mask, off, ADD_MIN)
            x = x >> Lu
            f6 = _field(x, mask, off, ADD_MIN)
            x = x >> Lu
            f7 = _field(x, mask, off, ADD_MIN)
            # element (a, b, c) of the joined dims is field 4a + 2b + c
            v = tl.join(tl.join(tl.join(f0, f4), tl.join(f2, f6)), tl.join(tl.join(f1, f5), tl.join(f3, f7)))
    v = tl.reshape(v, (D, 64))
    if FAST and not INTERP:
        out = v.to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif FAST:  # the interpreter's bf16 dot is wrong: float32 operands holding the same values
        out = (v + 128).to(tl.float32)
    else:
        out = v.to(tl.float32)
    return out


@triton.jit
def _pair(x, j: tl.constexpr, BITS: tl.constexpr, INTERP: tl.constexpr):
    """Tokens F*w + 2j (low half) and F*w + 2j + 1 (high half) of BITS-bit pair-order words x (F = 32 / BITS
    fields per word), as 128 + q: t = (x >> BITS*j) & (m | m << 16) | 0x43004300 (m = 2**BITS - 1) holds both as
    bf16 bit patterns."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if INTERP:  # float32 operands holding the same values (the interpreter's bf16 dot is wrong)
        lo = (((x >> (BITS * j)) & MASK) + 128).to(tl.float32)
        hi = (((x >> (BITS * j + 16)) & MASK) + 128).to(tl.float32)
    else:
        lo, hi = _halves(((x >> (BITS * j)) & (MASK | (MASK << 16))) | 0x43004300)
    return lo, hi


@triton.jit
def _halves(t):
    """The two bf16 bit patterns in the low and high half of t (uint32)."""
    return (t & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True), (t >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _tile_paired4(x, PRMT: tl.constexpr, INTERP: tl.constexpr):
    """Words of 4-bit fixed segments in pair order (codec: BlockFormat.paired), x [..., 8] -> [..., 8, 2, 2, 2]
    holding 128 + q (bf16; float32 in the interpreter); reshaped by the caller to [..., 64].
    PRMT (on the GPU): one inline-PTX block per word: the even and the odd nibbles are masked once (e, o), then each
    pair j is one byte permute of e or o with the constant 0x43 bytes (bytes 0 and 2 for j = 0, 1; 1 and 3 for
    j = 2, 3): ~1.75 instructions per two tokens, and no mask constant to rematerialise per pair."""
    if INTERP or not PRMT:
        lo0, hi0 = _pair(x, 0, 4, INTERP)
        lo1, hi1 = _pair(x, 1, 4, INTERP)
        lo2, hi2 = _pair(x, 2, 4, INTERP)
        lo3, hi3 = _pair(x, 3, 4, INTERP)
    else:
        t0, t1, t2, t3 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 e, o;
            and.b32 e, $4, 0x0F0F0F0F;
            shr.b32 o, $4, 4;
            and.b32 o, o, 0x0F0F0F0F;
            prmt.b32 $0, e, 0x43434343, 0x4240;
            prmt.b32 $1, o, 0x43434343, 0x4240;
            prmt.b32 $2, e, 0x43434343, 0x4341;
            prmt.b32 $3, o, 0x43434343, 0x4341;
            }""",
            constraints="=r,=r,=r,=r,r", args=[x], dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32),
            is_pure=True, pack=1)
        lo0, hi0 = _halves(t0)
        lo1, hi1 = _halves(t1)
        lo2, hi2 = _halves(t2)
        lo3, hi3 = _halves(t3)
    # element (a, b) of the inner joins is pair j = 2a + b; the outer join adds the token's parity
    lo_t = tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3))
    hi_t = tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3))
    return tl.join(lo_t, hi_t)  # [..., 8 words, 2, 2, 2]: token 8w + 2j + parity in row-major order


@triton.jit
def _tile_paired2(x, INTERP: tl.constexpr):
    """Words of 2-bit fixed segments in pair order, x [..., 4] -> [..., 4, 2, 2, 2, 2] holding 128 + q (bf16;
    float32 in the interpreter), reshaped by the caller to [..., 64]: pair i of word w (tokens 16w + 2i and
    16w + 2i + 1, bits 2i and 16 + 2i) is (x >> 2i) & 0x00030003 | 0x43004300, one shift and one mask."""
    lo0, hi0 = _pair(x, 0, 2, INTERP)
    lo1, hi1 = _pair(x, 1, 2, INTERP)
    lo2, hi2 = _pair(x, 2, 2, INTERP)
    lo3, hi3 = _pair(x, 3, 2, INTERP)
    lo4, hi4 = _pair(x, 4, 2, INTERP)
    lo5, hi5 = _pair(x, 5, 2, INTERP)
    lo6, hi6 = _pair(x, 6, 2, INTERP)
    lo7, hi7 = _pair(x, 7, 2, INTERP)
    # element (a, b, c) of the inner joins is pair 4a + 2b + c; the outer join adds the token's parity
    lo_t = tl.join(tl.join(tl.join(lo0, lo4), tl.join(lo2, lo6)), tl.join(tl.join(lo1, lo5), tl.join(lo3, lo7)))
    hi_t = tl.join(tl.join(tl.join(hi0, hi4), tl.join(hi2, hi6)), tl.join(tl.join(hi1, hi5), tl.join(hi3, hi7)))
    return tl.join(lo_t, hi_t)



@triton.jit
def _softmax_step(s, valid, m_i, l_i):
    """Online softmax over one tile of base-2 scores s [M, N] -> (new row max, rescale factor of the old
    partials, probabilities, new row sums). Fully masked rows keep max -inf and weight 0."""
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _bf16_op(x, INTERP: tl.constexpr):
    """float32 -> bf16 dot operand (float32 holding the bf16 value in the interpreter)."""
    if INTERP:
        out = x.to(tl.bfloat16).to(tl.float32)
    else:
        out = x.to(tl.bfloat16)
    return out


@triton.jit
def _split_tf32(w):
    """w = hi + lo with hi exactly representable in tf32."""
    hi = (w.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, w - hi


# Arguments that change from step to step are not specialised (see kernels/store.py).
@triton.jit(do_not_specialize=["skt_b", "skt_h", "svt_b", "svt_h", "T", "bt_b", "nb", "va_b", "bps", "NS"])
def _decode_kernel(q_ptr, sq_b, sq_h, sq_t, sq_d,
                   kt_ptr, skt_b, skt_h, skt_t, skt_d, vt_ptr, svt_b, svt_h, svt_t, svt_d, T,
                   pool32, so_ptr, so_s, so_kv,
                   tmin_ptr, tm_s, tm_kv, tm_t, tstep_ptr, ts_s, ts_kv, ts_t,
                   perm_ptr, pm_s, bt_ptr, bt_b, nb,
                   valid_ptr, va_b,
                   m_ptr, l_ptr, acc_ptr,
                   scale_log2, bps, NS,
                   GROUP: tl.constexpr, QLEN: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
                   P: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr, WB_K: tl.constexpr,
                   WB_V: tl.constexpr, META_K: tl.constexpr, META_V: tl.constexpr,
                   CJ_K: tl.constexpr, CJ_V: tl.constexpr,
                   TOKEN_GRAN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PERM: tl.constexpr,
                   PREC_K: tl.constexpr, PREC_V: tl.constexpr, SPLIT_V: tl.constexpr,
                   FAST: tl.constexpr, Q_SPLIT: tl.constexpr, PREFETCH: tl.constexpr, TAIL16: tl.constexpr,
                   INTERP: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s_id = tl.program_id(2)
    H = tl.num_programs(1)
    b64 = b.to(tl.int64)
    rows = tl.arange(0, M)
    row_ok = rows < GROUP * QLEN
    g = rows // QLEN
    qi = rows % QLEN
    kv_len = nb * 64 + T
    qpos = kv_len - QLEN + qi
    cols = tl.arange(0, D)
    q = tl.load(q_ptr + b64 * sq_b + (h * GROUP + g).to(tl.int64)[:, None] * sq_h + qi[:, None] * sq_t
                + cols[None, :] * sq_d, mask=row_ok[:, None], other=0.0).to(tl.float32)
    qsum = tl.sum(q, axis=1)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    idx = tl.arange(0, 64)
    if TOKEN_GRAN:
        gsel = 0
    else:
        gsel = h
    if s_id < NS:
        R: tl.constexpr = 64 // P
        if FAST:
            # q as bf16 (hi + lo when q is fp16: exact); the tile holds 128 + r
            q_hi = _bf16_op(q, INTERP)
            q_lo = _bf16_op(q - q_hi.to(tl.float32), INTERP)
            off = 128.0
        else:
            off = 0.0
        accmin = tl.zeros([M], tl.float32)
        blk_lo = s_id * bps
        blk_hi = tl.minimum(blk_lo + bps, nb)
        last = blk_hi - 1
        bt_row = bt_ptr + b64 * bt_b
        # Software pipeline: the dependent chain block table -> segment offsets -> pack metadata ->
        # payload is spread over iterations, so an iteration only waits for loads issued one
        # iteration earlier (PREFETCH: the payload of the next block too).
        slot = tl.load(bt_row + blk_lo).to(tl.int64)
        slot1 = tl.load(bt_row + tl.minimum(blk_lo + 1, last)).to(tl.int64)
        slot2 = tl.load(bt_row + tl.minimum(blk_lo + 2, last)).to(tl.int64)
        segk = pool32 + (tl.load(so_ptr + slot * so_s + h) >> 2)
        segv = pool32 + (tl.load(so_ptr + slot * so_s + so_kv + h) >> 2)
        segk1 = pool32 + (tl.load(so_ptr + slot1 * so_s + h) >> 2)
        segv1 = pool32 + (tl.load(so_ptr + slot1 * so_s + so_kv + h) >> 2)
        kpmin, kw = _seg_meta(segk, R, D, BITS_K, WB_K)
        vpmin, vw = _seg_meta(segv, R, D, BITS_V, WB_V)
        kpmin1, kw1 = _seg_meta(segk1, R, D, BITS_K, WB_K)
        vpmin1, vw1 = _seg_meta(segv1, R, D, BITS_V, WB_V)
        klo, khi, ksh, kL = _chunk_words(segk, kw, META_K, R, D, P, CJ_K)
        vlo, vhi, vsh, vL = _chunk_words(segv, vw, META_V, R, D, P, CJ_V)
        kx = _funnel(klo, khi, ksh)
        vx = _funnel(vlo, vhi, vsh)
        for blk in range(blk_lo, blk_hi):
            slot3 = tl.load(bt_row + tl.minimum(blk + 3, last)).to(tl.int64)
            segk2 = pool32 + (tl.load(so_ptr + slot2 * so_s + h) >> 2)
            segv2 = pool32 + (tl.load(so_ptr + slot2 * so_s + so_kv + h) >> 2)
            kpmin2, kw2 = _seg_meta(segk2, R, D, BITS_K, WB_K)
            vpmin2, vw2 = _seg_meta(segv2, R, D, BITS_V, WB_V)
            if PREFETCH:
                klo1, khi1, ksh1, kL1 = _chunk_words(segk1, kw1, META_K, R, D, P, CJ_K)
                vlo1, vhi1, vsh1, vL1 = _chunk_words(segv1, vw1, META_V, R, D, P, CJ_V)
            kmin = tl.load(tmin_ptr + slot * tm_s + idx * tm_t + gsel).to(tl.float32)
            kstep = tl.load(tstep_ptr + slot * ts_s + idx * ts_t + gsel).to(tl.float32)
            vmin = tl.load(tmin_ptr + slot * tm_s + tm_kv + idx * tm_t + gsel).to(tl.float32)
            vstep = tl.load(tstep_ptr + slot * ts_s + ts_kv + idx * ts_t + gsel).to(tl.float32)
            if HAS_PERM:
                pos = blk * 64 + tl.load(perm_ptr + slot * pm_s + idx).to(tl.int32)
            else:
                pos = blk * 64 + idx
            valid = pos[None, :] <= qpos[:, None]
            if HAS_MASK:
                ok = tl.load(valid_ptr + b64 * va_b + pos).to(tl.int1)
                valid = valid & ok[None, :]
            # scores: q . x_hat = step * (q . r + q . pmin) + min * sum(q)
            kt = _tile(kx, kL, kpmin, CJ_K, D, R, True, FAST, INTERP)
            if FAST:
                s = tl.dot(q_hi, kt)
                if Q_SPLIT:
                    s = tl.dot(q_lo, kt, s)
            else:
                s = tl.dot(q, kt, input_precision=PREC_K)
            s = s - off * qsum[:, None]  # the K tile holds pmin + r (+ off)
            s = (s * kstep[None, :] + qsum[:, None] * kmin[None, :]) * scale_log2
            m_new, alpha, p, l_i = _softmax_step(s, valid, m_i, l_i)
            # values: sum_t p x_hat = sum_t (p step) r + sum_p (sum_t p step) pmin + sum_t p min
            vt = tl.trans(_tile(vx, vL, vpmin, CJ_V, D, R, R > 1, FAST, INTERP))
            w = p * vstep[None, :]
            if FAST:
                w_hi = _bf16_op(w, INTERP)
                pv = tl.dot(w_hi, vt)
                w_used = w_hi.to(tl.float32)
                if SPLIT_V:  # the bf16 rounding remainder of the weights: ~float32 weights
                    w_lo = _bf16_op(w - w_used, INTERP)
                    pv = tl.dot(w_lo, vt, pv)
                    w_used = w_used + w_lo.to(tl.float32)
                w = w_used  # the offset and min corrections must use the weights the dot used (128 + r)
            elif SPLIT_V:
                w_hi, w_lo = _split_tf32(w)
                pv = tl.dot(w_hi, vt, input_precision=PREC_V)
                pv = tl.dot(w_lo, vt, pv, input_precision=PREC_V)
            else:
                pv = tl.dot(w, vt, input_precision=PREC_V)
            if R == 1:  # pack-64 V mins fold out of the tile: 1-D vectors, no [M, D] layout conversion
                pv += tl.sum(w, axis=1)[:, None] * (tl.reshape(vpmin, (D,)).to(tl.float32) - off)[None, :]
            else:
                pv -= off * tl.sum(w, axis=1)[:, None]
            acc = acc * alpha[:, None] + pv
            accmin = accmin * alpha + tl.sum(p * vmin[None, :], axis=1)
            m_i = m_new
            # rotate the pipeline
            if not PREFETCH:
                klo1, khi1, ksh1, kL1 = _chunk_words(segk1, kw1, META_K, R, D, P, CJ_K)
                vlo1, vhi1, vsh1, vL1 = _chunk_words(segv1, vw1, META_V, R, D, P, CJ_V)
            kx, kL = _funnel(klo1, khi1, ksh1), kL1
            vx, vL = _funnel(vlo1, vhi1, vsh1), vL1
            kpmin, vpmin = kpmin1, vpmin1
            kpmin1, kw1, vpmin1, vw1 = kpmin2, kw2, vpmin2, vw2
            segk1, segv1 = segk2, segv2
            slot, slot1, slot2 = slot1, slot2, slot3
        acc = acc + accmin[:, None]
    else:
        if TAIL16:  # q and the tail in one 16-bit dtype: native operands (exact products), half the registers
            q16 = q.to(q_ptr.dtype.element_ty)
        for t0 in range(0, T, 64):
            t = t0 + idx
            tok = t < T
            kx = tl.load(kt_ptr + b64 * skt_b + h.to(tl.int64) * skt_h + t.to(tl.int64)[:, None] * skt_t
                         + cols[None, :] * skt_d, mask=tok[:, None], other=0.0)
            if TAIL16:
                s = tl.dot(q16, tl.trans(kx)) * scale_log2
            else:
                s = tl.dot(q, tl.trans(kx.to(tl.float32)), input_precision=PREC_K) * scale_log2
            pos = nb * 64 + t
            valid = tok[None, :] & (pos[None, :] <= qpos[:, None])
            if HAS_MASK:
                ok = tl.load(valid_ptr + b64 * va_b + pos, mask=tok, other=0).to(tl.int1)
                valid = valid & ok[None, :]
            m_new, alpha, p, l_i = _softmax_step(s, valid, m_i, l_i)
            vx = tl.load(vt_ptr + b64 * svt_b + h.to(tl.int64) * svt_h + t.to(tl.int64)[:, None] * svt_t
                         + cols[None, :] * svt_d, mask=tok[:, None], other=0.0)
            if TAIL16:  # p = hi + lo in the tail dtype (~2**-16 relative)
                p_hi = p.to(vx.dtype)
                p_lo = (p - p_hi.to(tl.float32)).to(vx.dtype)
                pv = tl.dot(p_hi, vx)
                pv = tl.dot(p_lo, vx, pv)
            elif SPLIT_V:
                p_hi, p_lo = _split_tf32(p)
                pv = tl.dot(p_hi, vx.to(tl.float32), input_precision=PREC_V)
                pv = tl.dot(p_lo, vx.to(tl.float32), pv, input_precision=PREC_V)
            else:
                pv = tl.dot(p, vx.to(tl.float32), input_precision=PREC_V)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
    # partials [B, H, NS + 1, M] and [B, H, NS + 1, M, D]
    pbase = ((b64 * H + h) * (NS + 1) + s_id) * M
    tl.store(m_ptr + pbase + rows, m_i, mask=row_ok)
    tl.store(l_ptr + pbase + rows, l_i, mask=row_ok)
    tl.store(acc_ptr + (pbase + rows.to(tl.int64))[:, None] * D + cols[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _softmax_step_t(s, valid, m_i, l_i):
    """_softmax_step over a transposed tile: s [N tokens, M rows], reductions along axis 0."""
    m_new, alpha, p = _p_step(s, valid, m_i)
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=0)


@triton.jit
def _meta(seg, R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, WB: tl.constexpr, FIXED: tl.constexpr):
    """(pack mins, widths) [D, R] of a segment; layout "fixed": 0 and BITS, nothing loaded."""
    if FIXED:
        pmin = tl.zeros([D, R], tl.int32)
        width = tl.full([D, R], BITS, tl.int32)
    else:
        pmin, width = _seg_meta(seg, R, D, BITS, WB)
    return pmin, width


@triton.jit
def _words(seg, width, META: tl.constexpr, R: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
           BITS: tl.constexpr, CJ: tl.constexpr, FIXED: tl.constexpr):
    """Issue the payload loads of a segment: (lo, hi, shift, L) [D, 64 // CJ] as _chunk_words. Fixed segments:
    channel c at word 2 * BITS * c, no metadata; with BITS dividing 32 no chunk straddles a word and the
    word index is affine in (c, k), so the loads vectorise (layout "fixed": 16-byte aligned segments). 4 and 2
    bits (pair order, codec: BlockFormat.paired): the channel's 2 * BITS whole words, [D, 2 * BITS]."""
    c = tl.arange(0, D)[:, None]
    if FIXED and (BITS == 4 or BITS == 2):
        k = tl.arange(0, 2 * BITS)[None, :]
        L = tl.full([D, 2 * BITS], BITS, tl.int32)
        lo = tl.load(seg + c * (2 * BITS) + k).to(tl.uint32, bitcast=True)
        sh = k * 0
        hi = lo
    elif FIXED:
        k = tl.arange(0, 64 // CJ)[None, :]
        L = tl.full([D, 64 // CJ], BITS, tl.int32)
        if (32 % BITS) == 0:
            per: tl.constexpr = 32 // (CJ * BITS)  # chunks per word
            lo = tl.load(seg + c * (2 * BITS) + k // per).to(tl.uint32, bitcast=True)
            sh = (k % per) * (CJ * BITS)
            hi = lo
        else:
            start = c * (64 * BITS) + k * (CJ * BITS)
            wi = start >> 5
            sh = start & 31
            lo = tl.load(seg + wi).to(tl.uint32, bitcast=True)
            hi = tl.load(seg + wi + 1, mask=sh + CJ * BITS > 32, other=0).to(tl.uint32, bitcast=True)
    else:
        lo, hi, sh, L = _chunk_words(seg, width, META, R, D, P, CJ, _one_word(P, BITS))
    return lo, hi, sh, L


@triton.jit
def _one_word(P: tl.constexpr, BITS: tl.constexpr):
    """Whether no packed chunk straddles a 32-bit word: with pack_size 64 every channel starts on a word, and
    widths L <= 2 make chunks of CJ * L bits (8 or 16) that tile a word."""
    return P == 64 and BITS <= 2


@triton.jit
def _chunks(lo, hi, sh, P: tl.constexpr, BITS: tl.constexpr, FIXED: tl.constexpr):
    """The loaded words of _words -> payload chunks (CJ fields from bit 0)."""
    if (FIXED and (32 % BITS) == 0) or (not FIXED and _one_word(P, BITS)):
        x = lo >> sh.to(tl.uint32)
    else:
        x = _funnel(lo, hi, sh)
    return x


@triton.jit
def _token_stats(tmin_ptr, tm_s, tm_kv, tm_t, tstep_ptr, ts_s, ts_kv, ts_t, slot, gsel):
    """Token min and step of K and V of the block in `slot` (group gsel) -> four float32 [64]."""
    t = tl.arange(0, 64)
    kmin = tl.load(tmin_ptr + slot * tm_s + t * tm_t + gsel).to(tl.float32)
    kstep = tl.load(tstep_ptr + slot * ts_s + t * ts_t + gsel).to(tl.float32)
    vmin = tl.load(tmin_ptr + slot * tm_s + tm_kv + t * tm_t + gsel).to(tl.float32)
    vstep = tl.load(tstep_ptr + slot * ts_s + ts_kv + t * ts_t + gsel).to(tl.float32)
    return kmin, kstep, vmin, vstep


@triton.jit
def _seg_ptr(pool32, so_ptr, slot, so_s, kv_off, h, ALIGNED: tl.constexpr):
    """int32 pointer to a segment; ALIGNED (layout "fixed": every segment a multiple of 16 bytes) tells the
    compiler that it is 16-byte aligned, so the fixed loads vectorise."""
    off = tl.load(so_ptr + slot * so_s + kv_off + h) >> 2
    if ALIGNED:
        off = tl.multiple_of(off, 4)
    return pool32 + off


@triton.jit
def _weighted_values(vt, w, SPLIT_V: tl.constexpr, INTERP: tl.constexpr):
    """vt [D, N] (128 + q as bf16) times weights w [N, M] -> (this block's sum [D, M], the weights the dot used).
    SPLIT_V: w = hi + lo as two bf16 dots (~2**-17 relative); else one dot over bf16 weights (2**-9). The offset
    correction -128 sum_t w_t must use exactly the weights the dot used, so that the 128 cancels exactly. The
    block's sum starts from zero: the matrix unit's float32 accumulation truncates, and carried across the blocks
    in the running output its error grows with the 128-offset mass of all blocks (fp16 outputs off by 2.3e-3 at
    4K tokens, H200); the caller adds it with a rounded FMA."""
    w_hi = _bf16_op(w, INTERP)
    pv = tl.dot(vt, w_hi)
    used = w_hi.to(tl.float32)
    if SPLIT_V:
        w_lo = _bf16_op(w - used, INTERP)
        pv = tl.dot(vt, w_lo, pv)
        used = used + w_lo.to(tl.float32)
    return pv, used


@triton.jit
def _p_step(s, valid, m_i):
    """Online softmax without the row sums: s [N tokens, M] -> (new max [M], rescale of old partials, p)."""
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp2(m_i - m_safe), tl.exp2(s - m_safe[None, :])


@triton.jit
def _warp_sums(p, vmin, w):
    """Per-warp column sums of what the output needs besides p.V: sum_t p_t (the softmax denominator) and the
    token-min and offset terms sum_t (p_t min_t - 128 w_t) (w: the weights the V dot used), over groups of 16
    rows of p, w [N, M] -> [N // 16, M, 2]. In the matrix-unit layout a 16-row group is one warp's rows, so these
    sums need no shared memory and no barrier; the sums over the groups wait until the end of the block loop
    (they are linear and rescaled like the output)."""
    x = tl.join(p, p * vmin[:, None] - 128.0 * w)
    return tl.sum(tl.reshape(x, (x.shape[0] // 16, 16, x.shape[1], 2)), axis=1)


@triton.jit(do_not_specialize=["skt_b", "skt_h", "svt_b", "svt_h", "T", "bt_b", "nb", "va_b", "bps", "NS", "NPART"])
def _tokens_in_m_kernel(q_ptr, sq_b, sq_h, sq_t, sq_d,
                        kt_ptr, skt_b, skt_h, skt_t, skt_d, vt_ptr, svt_b, svt_h, svt_t, svt_d, T,
                        pool32, so_ptr, so_s, so_kv,
                        tmin_ptr, tm_s, tm_kv, tm_t, tstep_ptr, ts_s, ts_kv, ts_t,
                        bt_ptr, bt_b, nb,
                        valid_ptr, va_b,
                        m_ptr, l_ptr, acc_ptr,
                        scale_log2, bps, NS, NPART, ctl_ptr, split_ptr, RING,
                        GROUP: tl.constexpr, QLEN: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
                        P: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr, WB_K: tl.constexpr,
                        WB_V: tl.constexpr, META_K: tl.constexpr, META_V: tl.constexpr,
                        CJ_K: tl.constexpr, CJ_V: tl.constexpr, FIXED_K: tl.constexpr, FIXED_V: tl.constexpr,
                        TOKEN_GRAN: tl.constexpr, HAS_MASK: tl.constexpr, Q_SPLIT: tl.constexpr,
                        TAIL: tl.constexpr, INTERP: tl.constexpr, SPLIT_V: tl.constexpr,
                        DEV: tl.constexpr = False, PRMT: tl.constexpr = False, BOTH: tl.constexpr = False):
    """The decode kernel with the 64 tokens of a block as the M dimension of both matrix products:
    scores^T [64, M] = K_tile [64, D] . q^T [D, M] and out^T [D, M] += V_tile^T [D, 64] . w^T [64, M],
    so the unpacked tiles are the A operands and the few query rows (GQA x q_len, padded) are N.
    TAIL: the program reads 64 tokens of the dense tail instead of blocks (chunk j is split NS + j), so the tail
    costs one chunk's latency, not ceil(T / 64) chunks in sequence. BOTH (eager decode): one launch of NS + tail
    chunks programs, programs from NS on reading the tail, which saves the tail's own launch and its latency.
    DEV (the static cache, kernels/static_cache.py): the lengths are read on the device, so one captured launch
    serves every step: ctl_ptr holds [kv_len, nb], split_ptr [nb] -> (NS, bps) as choose_tuning gives them; the
    grids have the most splits (tail chunks) any length needs and the programs past NS (the tail's chunks) store
    nothing; the tail is a ring of RING tokens (a multiple of 64) whose token t sits at row (nb * 64 + t) % RING."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s_id = tl.program_id(2)
    H = tl.num_programs(1)
    b64 = b.to(tl.int64)
    rows = tl.arange(0, M)
    row_ok = rows < GROUP * QLEN
    if DEV:
        kv_len = tl.load(ctl_ptr)
        nb = tl.load(ctl_ptr + 1)
        T = kv_len - nb * 64
        NS = tl.load(split_ptr + 2 * nb)
        bps = tl.load(split_ptr + 2 * nb + 1)
        NPART = NS + tl.maximum((T + 63) // 64, 1)  # as decode_attention's n_part
        if TAIL:
            n_live = NPART - NS
        else:
            n_live = NS
        live = s_id < n_live
        row_ok = row_ok & (rows * 0 + s_id < n_live)
    g = rows // QLEN
    qi = rows % QLEN
    kv_len = nb * 64 + T
    qpos = kv_len - QLEN + qi
    cols = tl.arange(0, D)
    qT = tl.load(q_ptr + b64 * sq_b + (h * GROUP + g).to(tl.int64)[None, :] * sq_h + qi[None, :] * sq_t
                 + cols[:, None] * sq_d, mask=row_ok[None, :], other=0.0)          # [D, M]
    q32 = qT.to(tl.float32)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    accT = tl.zeros([D, M], tl.float32)
    idx = tl.arange(0, 64)
    if BOTH:  # a runtime branch: programs NS.. read tail chunk s_id - NS
        on_blocks = s_id < NS
        chunk = s_id - NS
    else:  # a constexpr: one launch compiles one of the two paths
        on_blocks: tl.constexpr = not TAIL
        chunk = s_id
    if on_blocks:
        ALIGNED: tl.constexpr = FIXED_K and FIXED_V
        qsum = tl.sum(q32, axis=0)
        if TOKEN_GRAN:
            gsel = 0
        else:
            gsel = h
        R: tl.constexpr = 64 // P
        q_hi = _bf16_op(q32, INTERP)
        q_lo = _bf16_op(q32 - q_hi.to(tl.float32), INTERP)
        sums = tl.zeros([4, M, 2], tl.float32)  # _warp_sums of the block tiles, accumulated
        blk_lo = s_id * bps
        blk_hi = tl.minimum(blk_lo + bps, nb)
        if DEV:  # programs past NS read block 0's row (always allocated) and loop over nothing
            blk_lo = tl.where(live, blk_lo, 0)
            blk_hi = tl.where(live, blk_hi, 0)
        last = tl.maximum(blk_hi - 1, 0)
        bt_row = bt_ptr + b64 * bt_b
        # Software pipeline over the dependent loads block table -> segment offset -> pack metadata ->
        # payload: each load uses a value loaded one iteration earlier, so no iteration waits on a load
        # it issued itself. Entering the iteration of block i: slots of i..i+3, segments of i..i+2,
        # metadata of i..i+1, payload words of i.
        slot = tl.load(bt_row + blk_lo).to(tl.int64)
        slot1 = tl.load(bt_row + tl.minimum(blk_lo + 1, last)).to(tl.int64)
        slot2 = tl.load(bt_row + tl.minimum(blk_lo + 2, last)).to(tl.int64)
        slot3 = tl.load(bt_row + tl.minimum(blk_lo + 3, last)).to(tl.int64)
        segk = _seg_ptr(pool32, so_ptr, slot, so_s, 0, h, ALIGNED)
        segv = _seg_ptr(pool32, so_ptr, slot, so_s, so_kv, h, ALIGNED)
        segk1 = _seg_ptr(pool32, so_ptr, slot1, so_s, 0, h, ALIGNED)
        segv1 = _seg_ptr(pool32, so_ptr, slot1, so_s, so_kv, h, ALIGNED)
        segk2 = _seg_ptr(pool32, so_ptr, slot2, so_s, 0, h, ALIGNED)
        segv2 = _seg_ptr(pool32, so_ptr, slot2, so_s, so_kv, h, ALIGNED)
        kpmin, kw = _meta(segk, R, D, BITS_K, WB_K, FIXED_K)
        vpmin, vw = _meta(segv, R, D, BITS_V, WB_V, FIXED_V)
        kpmin1, kw1 = _meta(segk1, R, D, BITS_K, WB_K, FIXED_K)
        vpmin1, vw1 = _meta(segv1, R, D, BITS_V, WB_V, FIXED_V)
        klo, khi, ksh, kL = _words(segk, kw, META_K, R, D, P, BITS_K, CJ_K, FIXED_K)
        vlo, vhi, vsh, vL = _words(segv, vw, META_V, R, D, P, BITS_V, CJ_V, FIXED_V)
        kmin, kstep, vmin, vstep = _token_stats(tmin_ptr, tm_s, tm_kv, tm_t, tstep_ptr, ts_s, ts_kv, ts_t, slot, gsel)
        for blk in range(blk_lo, blk_hi):
            slot4 = tl.load(bt_row + tl.minimum(blk + 4, last)).to(tl.int64)
            segk3 = _seg_ptr(pool32, so_ptr, slot3, so_s, 0, h, ALIGNED)
            segv3 = _seg_ptr(pool32, so_ptr, slot3, so_s, so_kv, h, ALIGNED)
            kpmin2, kw2 = _meta(segk2, R, D, BITS_K, WB_K, FIXED_K)
            vpmin2, vw2 = _meta(segv2, R, D, BITS_V, WB_V, FIXED_V)
            klo1, khi1, ksh1, kL1 = _words(segk1, kw1, META_K, R, D, P, BITS_K, CJ_K, FIXED_K)
            vlo1, vhi1, vsh1, vL1 = _words(segv1, vw1, META_V, R, D, P, BITS_V, CJ_V, FIXED_V)
            kmin1, kstep1, vmin1, vstep1 = _token_stats(tmin_ptr, tm_s, tm_kv, tm_t, tstep_ptr, ts_s, ts_kv, ts_t,
                                                        slot1, gsel)
            kx = _chunks(klo, khi, ksh, P, BITS_K, FIXED_K)
            vx = _chunks(vlo, vhi, vsh, P, BITS_V, FIXED_V)
            pos = blk * 64 + idx
            valid = pos[:, None] <= qpos[None, :]
            if HAS_MASK:
                ok = tl.load(valid_ptr + b64 * va_b + pos).to(tl.int1)
                valid = valid & ok[:, None]
            # scores: q . x_hat = step * (q . (pmin + r)) + min * sum(q); the tile holds 128 + pmin + r
            if FIXED_K:  # constant widths: the unpack's shifts and masks fold into immediates
                kL = tl.full(kx.shape, BITS_K, tl.int32)
            if FIXED_V:
                vL = tl.full(vx.shape, BITS_V, tl.int32)
            if FIXED_K and BITS_K == 4:
                kt = tl.trans(tl.reshape(_tile_paired4(kx, PRMT, INTERP), (D, 64)))
            elif FIXED_K and BITS_K == 2:
                kt = tl.trans(tl.reshape(_tile_paired2(kx, INTERP), (D, 64)))
            else:
                kt = tl.trans(_tile(kx, kL, kpmin, CJ_K, D, R, not FIXED_K, True, INTERP))     # [64, D]
            s = tl.dot(kt, q_hi)
            if Q_SPLIT:
                s = tl.dot(kt, q_lo, s)
            # = step * (s - 128 sum(q)) + min * sum(q), in log2 units: one multiply-add per score
            s = s * (kstep * scale_log2)[:, None] + ((kmin - 128.0 * kstep) * scale_log2)[:, None] * qsum[None, :]
            m_new, alpha, p = _p_step(s, valid, m_i)
            # values: sum_t p x_hat = sum_t w (128 + pmin + r) - 128 sum_t w + sum_t p min, w = p step
            if FIXED_V and BITS_V == 4:
                vt = tl.reshape(_tile_paired4(vx, PRMT, INTERP), (D, 64))
            elif FIXED_V and BITS_V == 2:
                vt = tl.reshape(_tile_paired2(vx, INTERP), (D, 64))
            else:
                vt = _tile(vx, vL, vpmin, CJ_V, D, R, R > 1 and not FIXED_V, True, INTERP)     # [D, 64]
            pv, w = _weighted_values(vt, p * vstep[:, None], SPLIT_V, INTERP)
            accT = accT * alpha[None, :] + pv
            if R == 1 and not FIXED_V:  # this block's pack minimums: corrected now, over all rows
                accT += tl.reshape(vpmin, (D,)).to(tl.float32)[:, None] * tl.sum(w, axis=0)[None, :]
            sums = sums * alpha[None, :, None] + _warp_sums(p, vmin, w)
            m_i = m_new
            # rotate the pipeline
            klo, khi, ksh, kL, vlo, vhi, vsh, vL = klo1, khi1, ksh1, kL1, vlo1, vhi1, vsh1, vL1
            kpmin, vpmin, kpmin1, kw1, vpmin1, vw1 = kpmin1, vpmin1, kpmin2, kw2, vpmin2, vw2
            kmin, kstep, vmin, vstep = kmin1, kstep1, vmin1, vstep1
            segk1, segv1, segk2, segv2 = segk2, segv2, segk3, segv3
            slot1, slot2, slot3 = slot2, slot3, slot4
        l_i, extra = tl.split(tl.sum(sums, axis=0))  # sum p; sum (p min - 128 w)
        accT = accT + extra[None, :]
        part = s_id
    else:  # tail chunk `chunk`: tokens 64 * chunk .. of the dense tail (one program per chunk)
        for t0 in range(64 * chunk, tl.minimum(T, 64 * chunk + 64), 64):
            t = t0 + idx
            tok = t < T
            trow = t
            if DEV:
                trow = (nb * 64 + t0) % RING + idx
            kx = tl.load(kt_ptr + b64 * skt_b + h.to(tl.int64) * skt_h + trow.to(tl.int64)[:, None] * skt_t
                         + cols[None, :] * skt_d, mask=tok[:, None], other=0.0)       # [64, D]
            if INTERP:  # the interpreter's 16-bit dots are wrong: float32 operands, same values
                s = tl.dot(kx.to(tl.float32), q32, input_precision="ieee") * scale_log2
            else:
                s = tl.dot(kx, qT) * scale_log2
            pos = nb * 64 + t
            valid = tok[:, None] & (pos[:, None] <= qpos[None, :])
            if HAS_MASK:
                ok = tl.load(valid_ptr + b64 * va_b + pos, mask=tok, other=0).to(tl.int1)
                valid = valid & ok[:, None]
            m_new, alpha, p, l_i = _softmax_step_t(s, valid, m_i, l_i)
            vx = tl.load(vt_ptr + b64 * svt_b + h.to(tl.int64) * svt_h + trow.to(tl.int64)[None, :] * svt_t
                         + cols[:, None] * svt_d, mask=tok[None, :], other=0.0)       # [D, 64]
            if INTERP:
                pv = tl.dot(vx.to(tl.float32), p, input_precision="ieee")
            else:  # p = hi + lo in the tail dtype (~2**-16 relative)
                p_hi = p.to(vx.dtype)
                p_lo = (p - p_hi.to(tl.float32)).to(vx.dtype)
                pv = tl.dot(vx, p_hi)
                pv = tl.dot(vx, p_lo, pv)
            accT = accT * alpha[None, :] + pv
            m_i = m_new
        part = NS + chunk
    pbase = ((b64 * H + h) * NPART + part) * M
    tl.store(m_ptr + pbase + rows, m_i, mask=row_ok)
    tl.store(l_ptr + pbase + rows, l_i, mask=row_ok)
    tl.store(acc_ptr + (pbase + rows.to(tl.int64))[None, :] * D + cols[:, None], accT, mask=row_ok[None, :])


@triton.jit(do_not_specialize=["NSP1"])
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, so_b, so_h, so_t, so_d, H, NSP1,
                    GROUP: tl.constexpr, QLEN: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
                    SP: tl.constexpr, SC: tl.constexpr, ctl_ptr=None, split_ptr=None, DEV: tl.constexpr = False,
                    signs_ptr=None, h_ptr=None, rot_scale=1.0, UNROTATE: tl.constexpr = False, UC: tl.constexpr = 32):
    """Partials of the splits and tail chunks -> the output of query row (b, hq, qi); with UNROTATE the float32
    output o_rot is rotated back once (o = (o_rot @ H) * s, s: the V signs of its KV head, H = rot_scale *
    h_ptr's ±1 matrix; kvcomp_hf/rotation.py) before its one rounding to the output dtype, UC columns at a time."""
    if DEV:  # the number of partials from the device (see _tokens_in_m_kernel)
        nb = tl.load(ctl_ptr + 1)
        NSP1 = tl.load(split_ptr + 2 * nb) + tl.maximum((tl.load(ctl_ptr) - nb * 64 + 63) // 64, 1)
    b = tl.program_id(0)
    hq = tl.program_id(1)
    qi = tl.program_id(2)
    h = hq // GROUP
    row = (hq % GROUP) * QLEN + qi
    base = (b.to(tl.int64) * H + h) * NSP1
    # global max over splits
    mx = tl.full([SP], float("-inf"), tl.float32)
    for s0 in range(0, NSP1, SP):
        sp = s0 + tl.arange(0, SP)
        mx = tl.maximum(mx, tl.load(m_ptr + (base + sp) * M + row, mask=sp < NSP1, other=float("-inf")))
    m_all = tl.max(mx, axis=0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    cols = tl.arange(0, D)
    acc = tl.zeros([D], tl.float32)
    lsum = tl.zeros([SC], tl.float32)
    for s0 in range(0, NSP1, SC):
        sp = s0 + tl.arange(0, SC)
        ok = sp < NSP1
        ms = tl.load(m_ptr + (base + sp) * M + row, mask=ok, other=float("-inf"))
        ls = tl.load(l_ptr + (base + sp) * M + row, mask=ok, other=0.0)
        w = tl.exp2(ms - m_safe)
        lsum += w * ls
        a = tl.load(acc_ptr + ((base + sp) * M + row)[:, None] * D + cols[None, :], mask=ok[:, None], other=0.0)
        acc += tl.sum(w[:, None] * a, axis=0)
    L = tl.sum(lsum, axis=0)
    out = tl.where(L > 0, acc / tl.where(L > 0, L, 1.0), 0.0)
    out_row = out_ptr + b.to(tl.int64) * so_b + hq * so_h + qi * so_t
    if UNROTATE:  # float32 products with ±1 are exact: float32 sums over D
        for c in tl.static_range(D // UC):
            dc = c * UC + tl.arange(0, UC)
            y = tl.sum(out[:, None] * tl.load(h_ptr + cols[:, None] * D + dc[None, :]), axis=0)
            y = y * rot_scale * tl.load(signs_ptr + h * D + dc)
            tl.store(out_row + dc * so_d, y.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_row + cols * so_d, out.to(out_ptr.dtype.element_ty))


_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


_STATIC: dict = {}
TOKENS_IN_M_MAXNREG = 168
# the constexprs and launch settings of _decode_kernel that _tokens_in_m_kernel takes too
_TOKENS_IN_M_ARGS = ("GROUP", "QLEN", "M", "D", "P", "BITS_K", "BITS_V", "WB_K", "WB_V", "META_K", "META_V", "CJ_K",
                     "CJ_V", "TOKEN_GRAN", "HAS_MASK", "Q_SPLIT", "INTERP", "num_warps", "num_stages", "maxnreg")


def _static_args(fmt: BlockFormat, q_dtype, tail_dtype, group: int, qlen: int, D: int, has_mask: bool,
                 tuning: DecodeTuning):
    """Constexpr arguments and launch settings of one configuration (cached: the hot path is per step)."""
    key = (fmt, q_dtype, tail_dtype, group, qlen, D, has_mask, tuning)
    hit = _STATIC.get(key)
    if hit is not None:
        return hit
    M = max(16, triton.next_power_of_2(group * qlen))
    sixteen = q_dtype in (torch.float16, torch.bfloat16) and tail_dtype in (torch.float16, torch.bfloat16)
    prec_k = "tf32" if sixteen and fmt.bits_k <= 11 else "ieee"
    prec_v = "tf32" if sixteen and fmt.bits_v <= 11 else "ieee"
    fast = sixteen and fmt.bits_k <= 7 and fmt.bits_v <= 7
    consts = dict(
        GROUP=group, QLEN=qlen, M=M, D=D, P=fmt.pack_size, BITS_K=fmt.bits_k, BITS_V=fmt.bits_v,
        WB_K=width_bits(fmt.bits_k), WB_V=width_bits(fmt.bits_v), META_K=fmt.meta_bytes(0),
        META_V=fmt.meta_bytes(1), CJ_K=chunk_fields(fmt.bits_k, fmt.pack_size),
        CJ_V=chunk_fields(fmt.bits_v, fmt.pack_size), TOKEN_GRAN=fmt.granularity == "token",
        HAS_MASK=has_mask, HAS_PERM=fmt.repack != "none",
        PREC_K=prec_k, PREC_V=prec_v, SPLIT_V=tuning.split_v and prec_v == "tf32",
        FAST=fast, Q_SPLIT=q_dtype != torch.bfloat16, PREFETCH=tuning.prefetch,
        TAIL16=sixteen and q_dtype == tail_dtype and os.environ.get("TRITON_INTERPRET", "0") != "1",
        INTERP=os.environ.get("TRITON_INTERPRET", "0") == "1",
        num_warps=tuning.num_warps, num_stages=1)
    if tuning.maxnreg:
        consts["maxnreg"] = tuning.maxnreg
    comb = dict(GROUP=group, QLEN=qlen, M=M, D=D, SP=64, SC=8, UC=min(D, 32), num_warps=4 if D <= 128 else 8)
    tm = {k: v for k, v in consts.items() if k in _TOKENS_IN_M_ARGS}
    # 3 CTAs of 4 warps per SM need <= 170 registers: Triton 3.6 gives the tokens-in-M kernel 196 (2 CTAs) since
    # each block's V sum starts from zero; capped at 168 the fixed layout compiles without spills for sm_90
    # (eval/sass_count.py). fixed_v spills 56 bytes under the cap (1015 instead of 946 SASS per block) and is still
    # 6-14% faster from the third CTA (H100, graph replays, bench_kernels variant r168: 32K x 8 0.3172 vs 0.3410 ms,
    # 128K x 1 0.1796 vs 0.2080, 8K x 8 0.0992 vs 0.1068). The packed layout's unpacker spills more: 0.492 ms
    # capped vs 0.435 uncapped at 32K x 8 (variant r255, H200), so it keeps the compiler's choice.
    if fmt.layout in ("fixed", "fixed_v"):
        tm.setdefault("maxnreg", TOKENS_IN_M_MAXNREG)
    hit = (M, consts, tm, comb)
    _STATIC[key] = hit
    return hit


def decode_attention(q, k_tail, v_tail, store: BlockStore, block_table, kv_valid, scaling, *,
                     tuning: DecodeTuning | None = None, num_splits: int | None = None, rotation=None):
    """Attention of the last q_len positions over compressed blocks (slots of `store`) + dense tail.

    q [B, Hq, q_len, D]; k_tail, v_tail [B, H, T, D]; block_table int32 [B, nb] of store slots; kv_valid bool
    [B, nb*64 + T] or None. Query i has position kv_len - q_len + i and sees positions <= its own.
    Returns out [B, Hq, q_len, D] in q's dtype. tuning: the compiled variant (default choose_tuning);
    num_splits forces the split count. rotation: the layer's LayerRotation when K/V (and q) are rotated: the
    output is rotated back in the combine (combine_rotation)."""
    fmt = store.fmt
    pool, seg_offset, token_min, token_step, perm = (store.pool, store.seg_offset, store.token_min,
                                                     store.token_step, store.perm)
    unrotate = {} if rotation is None else combine_rotation(rotation.signs[1], rotation.h_pm1, rotation.scale)
    B, Hq, QLEN, D = q.shape
    H = fmt.num_heads
    if k_tail.shape[0] != B or k_tail.shape[1] != H or k_tail.shape[3] != D or v_tail.shape != k_tail.shape:
        raise ValueError(f"tail shapes {tuple(k_tail.shape)}, {tuple(v_tail.shape)} do not match q {tuple(q.shape)} "
                         f"and {H} kv heads")
    if Hq % H != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({H})")
    if D != fmt.head_dim or D & (D - 1) or D < 16:
        raise ValueError(f"head_dim {D} must equal the format's ({fmt.head_dim}) and be a power of two >= 16")
    if not 1 <= QLEN <= 16:
        raise ValueError(f"q_len must be in 1..16, got {QLEN}")
    if block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table must be [B, nb], got {tuple(block_table.shape)}")
    if seg_offset.stride(2) != 1 or (fmt.groups > 1 and (token_min.stride(3) != 1 or token_step.stride(3) != 1)) \
            or perm.stride(1) != 1 or block_table.stride(1) != 1:
        raise ValueError("seg_offset/token_min/token_step/perm/block_table need a contiguous last dim")
    nb = block_table.shape[1]
    T = k_tail.shape[2]
    kv_len = nb * BLOCK_SIZE + T
    group = Hq // H
    dev = q.device
    tuning = tuning or choose_tuning(D, B, H, nb)
    M, consts, tm, comb = _static_args(fmt, q.dtype, k_tail.dtype, group, QLEN, D, kv_valid is not None, tuning)
    if kv_valid is not None:
        if kv_valid.shape != (B, kv_len):
            raise ValueError(f"kv_valid must be [B, {kv_len}], got {tuple(kv_valid.shape)}")
        if kv_valid.stride(1) != 1:
            kv_valid = kv_valid.contiguous()
        valid_arg = kv_valid.view(torch.uint8) if kv_valid.dtype == torch.bool else kv_valid
        va_b = kv_valid.stride(0)
    else:
        valid_arg, va_b = block_table, 0
    if num_splits is None:
        ns, bps = tuning.splits(B, H, nb, _num_sms(dev))
    else:
        ns = min(nb, max(1, num_splits)) if nb else 0
        bps = math.ceil(nb / ns) if ns else 1
        ns = math.ceil(nb / bps) if ns else 0
    out = torch.empty_like(q)
    if B == 0 or Hq == 0:
        return out
    tail_chunks = max(1, math.ceil(T / BLOCK_SIZE))
    tm_kernel = consts["FAST"] and q.dtype == k_tail.dtype and not consts["HAS_PERM"] and \
        (tuning.tokens_in_m or fmt.layout != "packed")
    n_part = ns + (tail_chunks if tm_kernel else 1)
    part = torch.empty(B * H * n_part * M * (D + 2), dtype=torch.float32, device=dev)
    n_ml = B * H * n_part * M
    m_part, l_part, acc_part = part[:n_ml], part[n_ml:2 * n_ml], part[2 * n_ml:]
    pool32 = pool[: pool.numel() // 4 * 4].view(torch.int32)
    if tm_kernel:
        args = (q, *q.stride(), k_tail, *k_tail.stride(), v_tail, *v_tail.stride(), T,
                pool32, seg_offset, seg_offset.stride(0), seg_offset.stride(1),
                token_min, token_min.stride(0), token_min.stride(1), token_min.stride(2),
                token_step, token_step.stride(0), token_step.stride(1), token_step.stride(2),
                block_table, block_table.stride(0), nb, valid_arg, va_b, m_part, l_part, acc_part,
                float(scaling) * LOG2E, bps, ns, n_part, block_table, block_table, 0)
        tm = dict(tm, FIXED_K=fmt.fixed(0), FIXED_V=fmt.fixed(1))
        blocks = dict(SPLIT_V=tuning.split_v, PRMT=tuning.prmt_unpack)
        if ns and not tuning.tail_launch:  # blocks and tail chunks in one launch
            _tokens_in_m_kernel[(B, H, ns + tail_chunks)](*args, TAIL=False, BOTH=True, **blocks, **tm)
        else:
            if ns:
                _tokens_in_m_kernel[(B, H, ns)](*args, TAIL=False, **blocks, **tm)
            _tokens_in_m_kernel[(B, H, tail_chunks)](*args, TAIL=True, SPLIT_V=False, **tm)
        _combine_kernel[(B, Hq, QLEN)](m_part, l_part, acc_part, out, *out.stride(), H, n_part, **comb,
                                       **unrotate)
        return out
    if fmt.layout != "packed":
        raise ValueError(f"layout={fmt.layout!r} is read by the fused kernel only for fp16/bf16 q and tail of one "
                         f"dtype and at most 7 bits per value")
    _decode_kernel[(B, H, ns + 1)](
        q, *q.stride(), k_tail, *k_tail.stride(), v_tail, *v_tail.stride(), T,
        pool32, seg_offset, seg_offset.stride(0), seg_offset.stride(1),
        token_min, token_min.stride(0), token_min.stride(1), token_min.stride(2),
        token_step, token_step.stride(0), token_step.stride(1), token_step.stride(2),
        perm, perm.stride(0), block_table, block_table.stride(0), nb,
        valid_arg, va_b, m_part, l_part, acc_part,
        float(scaling) * LOG2E, bps, ns, **consts)
    _combine_kernel[(B, Hq, QLEN)](m_part, l_part, acc_part, out, *out.stride(), H, ns + 1, **comb,
                                   **unrotate)
    return out


def combine_rotation(signs_v, h_pm1, scale: float) -> dict:
    """The combine kernel's arguments that rotate the output back with V's signs ([H, D]) and the ±1 matrix times
    scale ({} for signs_v None: no rotation)."""
    if signs_v is None:
        return {}
    return dict(signs_ptr=signs_v, h_ptr=h_pm1, rot_scale=scale, UNROTATE=True)
