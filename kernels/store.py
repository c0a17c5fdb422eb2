"""Triton store kernels: compress whole 64-token blocks of K and V into the byte pool.

The byte format is the one of kvcomp_hf/codec.py (the executable specification); these kernels
produce bit-identical segments, token_min/token_step and perm.

Whole-block packs in arrival order (pack_size 64, repack "none": the default and layout "fixed"), no host
synchronisation:
  1. `_head_stats_kernel`, one program per (block, head) (granularity "token" only): per-token min, max and
     nonfinite flag of K and V over the head's channels, into a float32 scratch.
  2. `_pack64_kernel`, one program per (block, head): the token statistics (combined over the heads from 1, or
     the head's own for "token_head"; written to the slot arrays), quantise, pack mins and widths, payload
     words. Layout "fixed": every segment has its largest size, so the kernel places it after pool_used
     itself (seg_offset, seg_bytes) and writes it straight into the pool; pool_used += total. Layout
     "packed": segments go to a scratch at worst-case places, their sizes to seg_bytes, then
  3. `_offsets_kernel`, one program: exclusive scan of the segment sizes in (block, K|V, head) order starting
     at pool_used, written to seg_offset; pool_used += total; and
  4. `_move_kernel` copies each segment from the scratch to its offset in the pool.
  The input is read twice (1., 2.) and quantised once. (The earlier design did the statistics and the
  segment sizes in one program per block, heads in sequence, and quantised twice: 90 GB/s at 32K x 8;
  this one 225 GB/s, H200, kernels/NOTES.md.)

Other packs (pack_size < 64 or repack "median", whose permutation needs every head's quantised V):
  1. `_stats_kernel`, one program per block: per-token min/step of K and V (granularity "token":
     over all heads), the median repack permutation (lower median from one pass of per-bin counts
     when bits_v == 3, else a binary search with `bits_v` passes over V), token_min/token_step/perm written to the slot arrays, and
     the byte size of each of the block's 2*H segments (quantise in permuted order, pack min and
     width) into a scratch vector.
  2. `_offsets_kernel` as above.
  3. `_pack_kernel`, one program per (block, head), K and V: quantise again (from the stored
     min/step, so the integers are identical), zero the segment's words, then OR the fields in
     through 32-bit atomics on the int32 view of the pool. Fields are first combined into 64-bit
     chunks in registers (8 metadata fields, or one pack's P payload values, per chunk group), so
     each chunk costs at most three atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcomp_hf import codec
from kvcomp_hf.block_store import BlockStore
from kvcomp_hf.codec import BLOCK_SIZE, BlockFormat, EncodedBlocks, width_bits

from .decode_attention import chunk_fields

# ---------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _rne(y):
    """Round half to even of y >= 0 (float32), exactly as torch.round; y is capped at 2**16."""
    y = tl.minimum(y, 65536.0)
    r = tl.floor(y)
    f = y - r  # exact for y < 2**23
    odd = (r.to(tl.int32) & 1) == 1
    up = (f > 0.5) | ((f == 0.5) & odd)
    return r.to(tl.int32) + up.to(tl.int32)


@triton.jit
def _step_of(lo, hi, rel):
    """bf16_round_toward_zero(rel * (hi - lo)) as float32 (lo, hi float32)."""
    step = rel * (hi - lo)
    bits = step.to(tl.int32, bitcast=True) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _stored_stats(lo, hi, nonfinite, rel):
    """(min, step) as stored. nonfinite = sum(x - x) over the group: 0, or NaN when the group holds a NaN or
    ±inf (tl.min/tl.max may skip NaN). Such a group, or one whose range overflows, is stored as NaN, NaN
    (codec.quantize)."""
    step = _step_of(lo, hi, rel)
    bad = (nonfinite != 0) | (step == float("inf"))
    return tl.where(bad, float("nan"), lo), tl.where(bad, float("nan"), step)


@triton.jit
def _row_stats(x, rel):
    """Stored (min, step) of each row of x [64, D] (granularity "token_head")."""
    return _stored_stats(tl.min(x, axis=1), tl.max(x, axis=1), tl.sum(x - x, axis=1), rel)


@triton.jit
def _group_stats(x, lo, step, rel, TOKEN_GRAN: tl.constexpr):
    """The (min, step) that quantise tile x [64, D]: the tokens' (granularity "token") or x's own rows'."""
    if TOKEN_GRAN:
        glo, gstep = lo, step
    else:
        glo, gstep = _row_stats(x, rel)
    return glo, gstep


@triton.jit
def _store_head_stats(tmin_ptr, tstep_ptr, min_off, step_off, lo, step):
    """Store one KV head's per-token (min, step) (granularity "token_head") at the given element offsets."""
    tl.store(tmin_ptr + min_off, lo.to(tmin_ptr.dtype.element_ty))
    tl.store(tstep_ptr + step_off, step.to(tl.bfloat16))


@triton.jit
def _quant(x, lo, step, MAXV: tl.constexpr):
    """x [64, D] float32, lo/step [64] float32 -> int32 [64, D]."""
    pos = step > 0
    safe = tl.where(pos, step, 1.0)
    y = tl.math.div_rn(x - lo[:, None], safe[:, None])
    q = _rne(y)
    q = tl.where(pos[:, None], q, 0)
    return tl.minimum(tl.maximum(q, 0), MAXV)


@triton.jit
def _bitlen(x, BITS: tl.constexpr):
    """Bit length of 0 <= x < 2**BITS."""
    n = tl.zeros_like(x)
    for k in tl.static_range(BITS):
        n += (x >= (1 << k)).to(x.dtype)
    return n


@triton.jit
def _load_tile(ptr, b, sb, h, sh, rows, st, sd, D: tl.constexpr, ALIGNED: tl.constexpr):
    """Rows `rows` of head h of sequence b, [64, D] float32 (strides sb, sh, st, sd). ALIGNED: the host checked
    that every row starts 16-byte aligned at a multiple of 8 elements; the hint lets the rows be read in 16-byte
    vectors (the batch and head strides are not specialised, so the compiler cannot see it). The hint goes on
    the base computed here: Triton drops it on a value passed in as an argument."""
    base = b.to(tl.int64) * sb + h * sh.to(tl.int64)
    if ALIGNED:
        base = tl.multiple_of(base, 8)
    cols = tl.arange(0, D)
    offs = base + rows.to(tl.int64)[:, None] * st + cols[None, :].to(tl.int64) * sd
    return tl.load(ptr + offs).to(tl.float32)


@triton.jit
def _token_stats_over_heads(ptr, b, sb, sh, rows, st, sd, H, rel, D: tl.constexpr, ALIGNED: tl.constexpr):
    """Stored (min, step) of each of 64 tokens (rows `rows` of sequence b) over all H heads (granularity "token")."""
    lo = tl.full([64], float("inf"), tl.float32)
    hi = tl.full([64], float("-inf"), tl.float32)
    nonfinite = tl.zeros([64], tl.float32)
    for h in range(H):
        x = _load_tile(ptr, b, sb, h, sh, rows, st, sd, D, ALIGNED)
        lo = tl.minimum(lo, tl.min(x, axis=1))
        hi = tl.maximum(hi, tl.max(x, axis=1))
        nonfinite += tl.sum(x - x, axis=1)
    return _stored_stats(lo, hi, nonfinite, rel)


@triton.jit
def _or_fields(pool32, start, vals, L, F: tl.constexpr, NC: tl.constexpr):
    """OR fields into the int32 pool. vals [A, F, B] int32 (field f of group (a, b) has L bits at
    group bit f * L), L broadcastable to [A, B] int32, start [A, B] int64 absolute bit offset of
    each group. A group spans at most NC 64-bit chunks; each chunk costs up to 3 atomics."""
    f = tl.arange(0, F)[None, :, None]
    L3 = L[:, None, :]
    pos = f * L3
    v = vals.to(tl.uint64)
    for c in tl.static_range(NC):
        sh = pos - 64 * c
        left = (sh >= 0) & (sh < 64)
        right = (sh < 0) & (sh + L3 > 0)
        shl = tl.where(left, sh, 0).to(tl.uint64)
        shr = tl.where(right, -sh, 0).to(tl.uint64)
        contrib = tl.where(left, v << shl, tl.where(right, v >> shr, tl.zeros_like(v)))
        chunk = tl.sum(contrib, axis=1)  # disjoint bits: sum == or
        o = start + 64 * c
        w = o >> 5
        s = (o & 31).to(tl.uint64)
        lo32 = chunk & 0xFFFFFFFF
        hi32 = chunk >> 32
        a = lo32 << s
        b = (hi32 << s) | (a >> 32)
        w0 = (a & 0xFFFFFFFF).to(tl.uint32).to(tl.int32, bitcast=True)
        w1 = (b & 0xFFFFFFFF).to(tl.uint32).to(tl.int32, bitcast=True)
        w2 = (b >> 32).to(tl.uint32).to(tl.int32, bitcast=True)
        tl.atomic_or(pool32 + w, w0, mask=w0 != 0, sem="relaxed")
        tl.atomic_or(pool32 + w + 1, w1, mask=w1 != 0, sem="relaxed")
        tl.atomic_or(pool32 + w + 2, w2, mask=w2 != 0, sem="relaxed")


@triton.jit
def _pack_geometry(q, P: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    R: tl.constexpr = 64 // P
    q3 = tl.reshape(q, (R, P, D))
    pmin = tl.min(q3, axis=1)
    pmax = tl.max(q3, axis=1)
    width = _bitlen(pmax - pmin, BITS)
    return q3, pmin, width


# ---------------------------------------------------------------------------------------------
# Kernel 1: statistics, permutation, segment sizes


# Integer arguments that change from call to call (tail length, block counts, slot numbers) are not
# specialised, so one compiled kernel serves every step instead of recompiling when one of them happens
# to be 1 or a multiple of 16 (a compile takes seconds, in the middle of generate()).
@triton.jit(do_not_specialize=["ks_b", "ks_h", "vs_b", "vs_h", "nb", "slot_start"])
def _stats_kernel(k_ptr, v_ptr, ks_b, ks_h, ks_t, ks_d, vs_b, vs_h, vs_t, vs_d,
                  nb, H,
                  tmin_ptr, tstep_ptr, tm_s, tm_kv, tm_t, ts_s, ts_kv, ts_t,
                  perm_ptr, pm_s, slot_start, segbytes_ptr,
                  rel_k, rel_v,
                  D: tl.constexpr, P: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr,
                  META_K: tl.constexpr, META_V: tl.constexpr,
                  TOKEN_GRAN: tl.constexpr, MEDIAN: tl.constexpr,
                  ALIGNED: tl.constexpr):
    n = tl.program_id(0)
    b = n // nb
    i = n % nb
    slot = (slot_start + n).to(tl.int64)
    idx = tl.arange(0, 64)
    rows = i * 64 + idx
    MAXK: tl.constexpr = (1 << BITS_K) - 1
    MAXV: tl.constexpr = (1 << BITS_V) - 1

    # token statistics over all heads (granularity "token"), original order; "token_head" uses each tile's own
    if TOKEN_GRAN:
        klo, kstep = _token_stats_over_heads(k_ptr, b, ks_b, ks_h, rows, ks_t, ks_d, H, rel_k, D, ALIGNED)
        vlo, vstep = _token_stats_over_heads(v_ptr, b, vs_b, vs_h, rows, vs_t, vs_d, H, rel_v, D, ALIGNED)
    else:
        klo = tl.zeros([64], tl.float32)  # unused: _group_stats takes each tile's own rows
        kstep = klo
        vlo = klo
        vstep = klo

    # median repack: lower median of the H*D V integers of each token
    if MEDIAN:
        target = (H * D - 1) // 2 + 1  # smallest t with count(q <= t) >= target is the median
        if BITS_V == 3:
            # one pass: per token the counts of q <= b for every bin b, then the median is the
            # number of bins whose count is below the target. (Only bits_v == 3: with 4 bins,
            # Triton 3.6's thread-locality pass fails on this loop; 16 bins were not tried.)
            NBIN: tl.constexpr = 1 << BITS_V
            bins = tl.arange(0, NBIN)
            cnt = tl.zeros([64, NBIN], tl.int32)
            for h in range(H):
                vx = _load_tile(v_ptr, b, vs_b, h, vs_h, rows, vs_t, vs_d, D, ALIGNED)
                hlo, hst = _group_stats(vx, vlo, vstep, rel_v, TOKEN_GRAN)
                qv = _quant(vx, hlo, hst, MAXV)
                for bb in tl.static_range(NBIN - 1):
                    c_b = tl.sum((qv <= bb).to(tl.int32), axis=1)
                    cnt += tl.where(bins[None, :] == bb, c_b[:, None], 0)
            lo_m = tl.sum(((cnt < target) & (bins[None, :] < NBIN - 1)).to(tl.int32), axis=1)
        else:
            lo_m = tl.zeros([64], tl.int32)
            hi_m = tl.full([64], MAXV, tl.int32)
            for _it in tl.static_range(BITS_V):
                mid = (lo_m + hi_m) // 2
                cnt = tl.zeros([64], tl.int32)
                for h in range(H):
                    vx = _load_tile(v_ptr, b, vs_b, h, vs_h, rows, vs_t, vs_d, D, ALIGNED)
                    hlo, hst = _group_stats(vx, vlo, vstep, rel_v, TOKEN_GRAN)
                    qv = _quant(vx, hlo, hst, MAXV)
                    cnt += tl.sum((qv <= mid[:, None]).to(tl.int32), axis=1)
                ok = cnt >= target
                hi_m = tl.where(ok, mid, hi_m)
                lo_m = tl.where(ok, lo_m, mid + 1)
        key = lo_m * 64 + 63 - idx
        rank = tl.sum((key[None, :] > key[:, None]).to(tl.int32), axis=1)  # rank[j]: stored position of token j
        onehot = rank[None, :] == idx[:, None]                             # [r, j]
        src = tl.sum(tl.where(onehot, idx[None, :], 0), axis=1)            # src[r] = perm[r]
        # permute the token statistics (one nonzero term per row: exact)
        klo = tl.sum(tl.where(onehot, klo[None, :], 0.0), axis=1)
        kstep = tl.sum(tl.where(onehot, kstep[None, :], 0.0), axis=1)
        vlo = tl.sum(tl.where(onehot, vlo[None, :], 0.0), axis=1)
        vstep = tl.sum(tl.where(onehot, vstep[None, :], 0.0), axis=1)
    else:
        src = idx
    tl.store(perm_ptr + slot * pm_s + idx, src.to(tl.uint8))
    prow = i * 64 + src

    if TOKEN_GRAN:
        tl.store(tmin_ptr + slot * tm_s + idx * tm_t, klo.to(tmin_ptr.dtype.element_ty))
        tl.store(tmin_ptr + slot * tm_s + tm_kv + idx * tm_t, vlo.to(tmin_ptr.dtype.element_ty))
        tl.store(tstep_ptr + slot * ts_s + idx * ts_t, kstep.to(tl.bfloat16))
        tl.store(tstep_ptr + slot * ts_s + ts_kv + idx * ts_t, vstep.to(tl.bfloat16))

    # segment sizes, in permuted order (K then V, one tile live at a time)
    for h in range(H):
        kx = _load_tile(k_ptr, b, ks_b, h, ks_h, prow, ks_t, ks_d, D, ALIGNED)
        hklo, hkst = _group_stats(kx, klo, kstep, rel_k, TOKEN_GRAN)
        qk = _quant(kx, hklo, hkst, MAXK)
        if not TOKEN_GRAN:
            _store_head_stats(tmin_ptr, tstep_ptr, slot * tm_s + idx * tm_t + h, slot * ts_s + idx * ts_t + h,
                              hklo, hkst)
        _q3, _pm, wk = _pack_geometry(qk, P, D, BITS_K)
        bk = (META_K + (P * tl.sum(tl.sum(wk, axis=1), axis=0) + 7) // 8 + 3) // 4 * 4
        tl.store(segbytes_ptr + (n * 2) * H + h, bk)
        vx = _load_tile(v_ptr, b, vs_b, h, vs_h, prow, vs_t, vs_d, D, ALIGNED)
        hvlo, hvst = _group_stats(vx, vlo, vstep, rel_v, TOKEN_GRAN)
        qv = _quant(vx, hvlo, hvst, MAXV)
        if not TOKEN_GRAN:
            _store_head_stats(tmin_ptr, tstep_ptr, slot * tm_s + tm_kv + idx * tm_t + h,
                              slot * ts_s + ts_kv + idx * ts_t + h, hvlo, hvst)
        _q3, _pm, wv = _pack_geometry(qv, P, D, BITS_V)
        bv = (META_V + (P * tl.sum(tl.sum(wv, axis=1), axis=0) + 7) // 8 + 3) // 4 * 4
        tl.store(segbytes_ptr + (n * 2 + 1) * H + h, bv)


# ---------------------------------------------------------------------------------------------
# Kernel 2: offsets


@triton.jit(do_not_specialize=["total", "slot_start"])
def _offsets_kernel(segbytes_ptr, total, pool_used_ptr, so_ptr, so_s, slot_start, H,
                    BLOCK: tl.constexpr):
    base = tl.load(pool_used_ptr)
    for start in range(0, total, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        m = idx < total
        sb = tl.load(segbytes_ptr + idx, mask=m, other=0).to(tl.int64)
        inc = tl.cumsum(sb, axis=0)
        blk = idx // (2 * H)
        inner = idx % (2 * H)  # kv * H + h; seg_offset is [S, 2, H] with contiguous (2, H)
        tl.store(so_ptr + (slot_start + blk).to(tl.int64) * so_s + inner, base + inc - sb, mask=m)
        base += tl.sum(sb, axis=0)
    tl.store(pool_used_ptr, base)


# ---------------------------------------------------------------------------------------------
# Kernel 3: bit packing

# The pack kernels read K/V element-wise: 16-byte vector loads lay a tile out along channels, and the per-channel
# reductions over tokens then cost more than the loads save (sm_90 SASS per thread, 16 warps, 4/2-bit packed:
# 4072 with the hint, 3320 without, int64 packing; the statistics kernels go the other way: 432 against 1824;
# `python -m eval.sass_count store`).
PACK_ALIGNED: tl.constexpr = tl.constexpr(False)


@triton.jit
def _pack_one(pool32, x, lo, step, seg_off, P: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
              WB: tl.constexpr, META: tl.constexpr, ZBLOCK: tl.constexpr):
    R: tl.constexpr = 64 // P
    NP: tl.constexpr = R * D
    MAXV: tl.constexpr = (1 << BITS) - 1
    q = _quant(x, lo, step, MAXV)
    q3, pmin, width = _pack_geometry(q, P, D, BITS)
    res = q3 - pmin[:, None, :]
    rowsum = tl.sum(width, axis=1)
    total = tl.sum(rowsum, axis=0)
    nbytes = (META + (P * total + 7) // 8 + 3) // 4 * 4
    # zero the segment (the pool past pool_used may hold old bytes)
    w0 = seg_off // 4
    for z in range(0, nbytes // 4, ZBLOCK):
        zi = z + tl.arange(0, ZBLOCK)
        tl.store(pool32 + w0 + zi, tl.zeros([ZBLOCK], tl.int32), mask=zi < nbytes // 4)
    tl.debug_barrier()
    base = seg_off * 8
    g8 = tl.arange(0, NP // 8)
    # pack mins: groups of 8 fields of BITS bits
    _or_fields(pool32, (base + g8 * (8 * BITS))[:, None], tl.reshape(pmin, (NP // 8, 8))[:, :, None],
               tl.full([NP // 8, 1], BITS, tl.int32), 8, (8 * BITS + 63) // 64)
    # widths: groups of 8 fields of WB bits
    _or_fields(pool32, (base + NP * BITS + g8 * (8 * WB))[:, None], tl.reshape(width, (NP // 8, 8))[:, :, None],
               tl.full([NP // 8, 1], WB, tl.int32), 8, (8 * WB + 63) // 64)
    # payload: pack (r, c) starts at P * (exclusive prefix of widths in pack order r * D + c)
    rowoff = tl.cumsum(rowsum, axis=0) - rowsum
    excl = rowoff[:, None] + tl.cumsum(width, axis=1) - width
    start = base + META * 8 + P * excl.to(tl.int64)
    _or_fields(pool32, start, res, width, P, (P * BITS + 63) // 64)


@triton.jit
def _in_word(chunk, sh, nbits):
    """The bits of `chunk` (uint32 holding nbits <= 32 bits) that fall in a 32-bit word when the chunk starts at
    bit sh of that word (sh may be negative or >= 32: then part or none of it falls there)."""
    moved = tl.where(sh >= 0, chunk << tl.minimum(tl.maximum(sh, 0), 31).to(tl.uint32),
                     chunk >> tl.minimum(tl.maximum(-sh, 0), 31).to(tl.uint32))
    return tl.where((sh < 32) & (sh + nbits > 0), moved, 0)


@triton.jit
def _chunks(fields, shift, CJ: tl.constexpr):
    """fields [G * CJ, C] (uint32) -> [G, C] chunks: field j of each run of CJ at bit shift[j] of one uint32
    (shift broadcastable to [1, CJ, C]; the fields' bits must not overlap within 32)."""
    f3 = tl.reshape(fields, (fields.shape[0] // CJ, CJ, fields.shape[1]))
    return tl.sum(f3 << shift.to(tl.uint32), axis=1)  # disjoint bits: sum == or


@triton.jit
def _meta_words(pmin, width, D: tl.constexpr, BITS: tl.constexpr, WB: tl.constexpr, NW: tl.constexpr):
    """The first NW (a power of two; the caller masks) 32-bit words of a pack-64 segment's metadata: D mins of
    BITS bits, then D widths of WB bits, then zero padding. pmin, width: int32 [D]. (Chunking the fields first,
    as the payload does, compiles to more instructions for these short vectors: sm_90 SASS.)"""
    w = tl.arange(0, NW)[:, None]
    c = tl.arange(0, D)[None, :]
    out = tl.sum(_in_word(pmin[None, :].to(tl.uint32), c * BITS - 32 * w, BITS), axis=1)
    out += tl.sum(_in_word(width[None, :].to(tl.uint32), D * BITS + c * WB - 32 * w, WB), axis=1)
    return out.to(tl.int32, bitcast=True)


@triton.jit
def _write_pack64(pool32, x, lo, step, seg_off, D: tl.constexpr, BITS: tl.constexpr, WB: tl.constexpr,
                  META: tl.constexpr, MW: tl.constexpr, CW: tl.constexpr, CJ: tl.constexpr, FIXED: tl.constexpr):
    """One segment with pack_size 64, written with plain stores (no atomics, no zeroing): the
    program owns every word of it. Channel c's 64 fields of L_c bits fill 2 * L_c words. Returns its bytes.
    MW, CW: powers of two >= META // 4 and >= 2 * BITS (tile sizes); CJ: fields per 32-bit chunk
    (a power of two, CJ * BITS <= 32)."""
    MAXV: tl.constexpr = (1 << BITS) - 1
    NCH: tl.constexpr = 64 // CJ
    q = _quant(x, lo, step, MAXV)                                   # [64, D]
    if FIXED:
        pmin = tl.zeros([D], tl.int32)
        width = tl.full([D], BITS, tl.int32)
    else:
        pmin = tl.min(q, axis=0)
        width = _bitlen(tl.max(q, axis=0) - pmin, BITS)              # [D]
    r = (q - pmin[None, :]).to(tl.uint32)
    if FIXED and (BITS == 4 or BITS == 2):  # pair order (codec: BlockFormat.paired): a word of PJ fields at once
        PJ: tl.constexpr = 32 // BITS
        jw = tl.arange(0, PJ)[None, :, None]
        words = _chunks(r, (jw // 2) * BITS + (jw % 2) * 16, PJ).to(tl.int32, bitcast=True)  # [2 * BITS, D]
    elif FIXED and CJ * BITS == 32:  # every chunk is a whole word (NCH == CW)
        j = tl.arange(0, CJ)[None, :, None]
        words = _chunks(r, j * width[None, None, :], CJ).to(tl.int32, bitcast=True)
    else:
        # chunks: CJ consecutive fields of one channel -> bits j * L of one uint32 (at most 32 bits); word w of
        # a channel holds bits 32w.. of its stream; chunk g starts at bit g * CJ * L
        j = tl.arange(0, CJ)[None, :, None]
        chunk = _chunks(r, j * width[None, None, :], CJ)                # [NCH, D]
        w = tl.arange(0, CW)[:, None, None]
        g = tl.arange(0, NCH)[None, :, None]
        cl = CJ * width[None, None, :]
        words = tl.sum(_in_word(chunk[None, :, :], g * cl - 32 * w, cl), axis=1).to(tl.int32, bitcast=True)  # [CW, D]
    excl = tl.cumsum(width, axis=0) - width
    w0 = seg_off // 4
    wpos = w0 + META // 4 + 2 * excl[None, :] + tl.arange(0, CW)[:, None]
    tl.store(pool32 + wpos, words, mask=tl.arange(0, CW)[:, None] < 2 * width[None, :])
    if not FIXED:
        mw = tl.arange(0, MW)
        tl.store(pool32 + w0 + mw, _meta_words(pmin, width, D, BITS, WB, MW), mask=mw < META // 4)
    return META + 8 * tl.sum(width, axis=0)  # the segment's bytes (META is a multiple of 4)


@triton.jit(do_not_specialize=["ks_b", "ks_h", "vs_b", "vs_h", "nb", "slot_start"])
def _pack_kernel(k_ptr, v_ptr, ks_b, ks_h, ks_t, ks_d, vs_b, vs_h, vs_t, vs_d, nb,
                 tmin_ptr, tstep_ptr, tm_s, tm_kv, tm_t, ts_s, ts_kv, ts_t,
                 perm_ptr, pm_s, so_ptr, so_s, so_kv, slot_start, pool32,
                 D: tl.constexpr, P: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr,
                 META_K: tl.constexpr, META_V: tl.constexpr, TOKEN_GRAN: tl.constexpr,
                 WB_K: tl.constexpr, WB_V: tl.constexpr, ZBLOCK: tl.constexpr,
                 MW_K: tl.constexpr, MW_V: tl.constexpr, CW_K: tl.constexpr, CW_V: tl.constexpr,
                 CJ_K: tl.constexpr, CJ_V: tl.constexpr, FIXED_K: tl.constexpr, FIXED_V: tl.constexpr):
    # pack_size 64: each program writes its segments with plain stores (_write_pack64); smaller
    # packs start at arbitrary bits and are OR-ed in with atomics (_pack_one).
    n = tl.program_id(0)
    h = tl.program_id(1)
    b = n // nb
    i = n % nb
    slot = (slot_start + n).to(tl.int64)
    idx = tl.arange(0, 64)
    src = tl.load(perm_ptr + slot * pm_s + idx).to(tl.int32)
    prow = i * 64 + src
    if TOKEN_GRAN:
        g = 0
    else:
        g = h
    kx = _load_tile(k_ptr, b, ks_b, h, ks_h, prow, ks_t, ks_d, D, PACK_ALIGNED)
    klo = tl.load(tmin_ptr + slot * tm_s + idx * tm_t + g).to(tl.float32)
    kst = tl.load(tstep_ptr + slot * ts_s + idx * ts_t + g).to(tl.float32)
    k_off = tl.load(so_ptr + slot * so_s + h)
    if P == 64:
        _write_pack64(pool32, kx, klo, kst, k_off, D, BITS_K, WB_K, META_K, MW_K, CW_K, CJ_K, FIXED_K)
    else:
        _pack_one(pool32, kx, klo, kst, k_off, P, D, BITS_K, WB_K, META_K, ZBLOCK)
    vx = _load_tile(v_ptr, b, vs_b, h, vs_h, prow, vs_t, vs_d, D, PACK_ALIGNED)
    vlo = tl.load(tmin_ptr + slot * tm_s + tm_kv + idx * tm_t + g).to(tl.float32)
    vst = tl.load(tstep_ptr + slot * ts_s + ts_kv + idx * ts_t + g).to(tl.float32)
    v_off = tl.load(so_ptr + slot * so_s + so_kv + h)
    if P == 64:
        _write_pack64(pool32, vx, vlo, vst, v_off, D, BITS_V, WB_V, META_V, MW_V, CW_V, CJ_V, FIXED_V)
    else:
        _pack_one(pool32, vx, vlo, vst, v_off, P, D, BITS_V, WB_V, META_V, ZBLOCK)


# ---------------------------------------------------------------------------------------------
# Whole-block packs in arrival order: statistics per (block, head), one quantisation, moved into place


@triton.jit(do_not_specialize=["ks_b", "ks_h", "vs_b", "vs_h", "nb"])
def _head_stats_kernel(k_ptr, v_ptr, ks_b, ks_h, ks_t, ks_d, vs_b, vs_h, vs_t, vs_d, nb, H, part_ptr,
                       D: tl.constexpr, ALIGNED: tl.constexpr):
    """part [n, 2 (K|V), 3 (min, max, nonfinite), H, 64] float32: one head's per-token statistics."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    b = n // nb
    idx = tl.arange(0, 64)
    rows = (n % nb) * 64 + idx
    for kv in tl.static_range(2):
        if kv == 0:
            x = _load_tile(k_ptr, b, ks_b, h, ks_h, rows, ks_t, ks_d, D, ALIGNED)
        else:
            x = _load_tile(v_ptr, b, vs_b, h, vs_h, rows, vs_t, vs_d, D, ALIGNED)
        out = part_ptr + (n.to(tl.int64) * 2 + kv) * 3 * H * 64 + h * 64 + idx
        tl.store(out, tl.min(x, axis=1))
        tl.store(out + H * 64, tl.max(x, axis=1))
        tl.store(out + 2 * H * 64, tl.sum(x - x, axis=1))


@triton.jit
def _token_stats_from_parts(part_ptr, n, kv: tl.constexpr, H, rel, HP: tl.constexpr):
    """Stored (min, step) of each token over all heads (granularity "token") from _head_stats_kernel's part."""
    hh = tl.arange(0, HP)[:, None]
    m = (hh < H) & (tl.arange(0, 64)[None, :] < 64)
    p = part_ptr + (n.to(tl.int64) * 2 + kv) * 3 * H * 64 + hh * 64 + tl.arange(0, 64)[None, :]
    lo = tl.min(tl.load(p, mask=m, other=float("inf")), axis=0)
    hi = tl.max(tl.load(p + H * 64, mask=m, other=float("-inf")), axis=0)
    nonfinite = tl.sum(tl.load(p + 2 * H * 64, mask=m, other=0.0), axis=0)
    return _stored_stats(lo, hi, nonfinite, rel)


@triton.jit(do_not_specialize=["ks_b", "ks_h", "vs_b", "vs_h", "nb", "slot_start"])
def _pack64_kernel(k_ptr, v_ptr, ks_b, ks_h, ks_t, ks_d, vs_b, vs_h, vs_t, vs_d, nb, H, part_ptr,
                   tmin_ptr, tstep_ptr, tm_s, tm_kv, tm_t, ts_s, ts_kv, ts_t,
                   so_ptr, so_s, so_kv, segbytes_ptr, slot_start, pool_used_ptr, dst32, rel_k, rel_v,
                   D: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr, META_K: tl.constexpr,
                   META_V: tl.constexpr, SEG_K: tl.constexpr, SEG_V: tl.constexpr, TOKEN_GRAN: tl.constexpr,
                   HP: tl.constexpr, WB_K: tl.constexpr, WB_V: tl.constexpr, MW_K: tl.constexpr,
                   MW_V: tl.constexpr, CW_K: tl.constexpr, CW_V: tl.constexpr, CJ_K: tl.constexpr,
                   CJ_V: tl.constexpr, FIXED_K: tl.constexpr, FIXED_V: tl.constexpr):
    """One program per (block, head), K then V. SEG_K/SEG_V: the largest segment (fixed segments: the only
    size). Layout "fixed" (FIXED_K and FIXED_V): segments go straight to their place in the pool (dst32) after
    pool_used, and seg_offset/seg_bytes are written here. Otherwise dst32 is a scratch with a worst-case place per
    segment; only seg_bytes is written, and _offsets_kernel and _move_kernel place the segments."""
    IN_PLACE: tl.constexpr = FIXED_K and FIXED_V
    n = tl.program_id(0)
    h = tl.program_id(1)
    b = n // nb
    slot = (slot_start + n).to(tl.int64)
    idx = tl.arange(0, 64)
    rows = (n % nb) * 64 + idx
    for kv in tl.static_range(2):
        if kv == 0:
            x = _load_tile(k_ptr, b, ks_b, h, ks_h, rows, ks_t, ks_d, D, PACK_ALIGNED)
            rel = rel_k
        else:
            x = _load_tile(v_ptr, b, vs_b, h, vs_h, rows, vs_t, vs_d, D, PACK_ALIGNED)
            rel = rel_v
        if TOKEN_GRAN:
            lo, step = _token_stats_from_parts(part_ptr, n, kv, H, rel, HP)
            if h == 0:
                _store_head_stats(tmin_ptr, tstep_ptr, slot * tm_s + kv * tm_kv + idx * tm_t,
                                  slot * ts_s + kv * ts_kv + idx * ts_t, lo, step)
        else:
            lo, step = _row_stats(x, rel)
            _store_head_stats(tmin_ptr, tstep_ptr, slot * tm_s + kv * tm_kv + idx * tm_t + h,
                              slot * ts_s + kv * ts_kv + idx * ts_t + h, lo, step)
        lo = lo.to(tmin_ptr.dtype.element_ty).to(tl.float32)  # quantise from the min as stored
        # (block, K|V, head) order: K segments of a block before its V segments
        place = n.to(tl.int64) * H * (SEG_K + SEG_V) + kv * H * SEG_K
        if kv == 0:
            place += h * SEG_K
        else:
            place += h * SEG_V
        if IN_PLACE:
            place += tl.load(pool_used_ptr)
            tl.store(so_ptr + slot * so_s + kv * so_kv + h, place)
        if kv == 0:
            nbytes = _write_pack64(dst32, x, lo, step, place, D, BITS_K, WB_K, META_K, MW_K, CW_K, CJ_K, FIXED_K)
        else:
            nbytes = _write_pack64(dst32, x, lo, step, place, D, BITS_V, WB_V, META_V, MW_V, CW_V, CJ_V, FIXED_V)
        tl.store(segbytes_ptr + (n * 2 + kv) * H + h, nbytes)


@triton.jit(do_not_specialize=["slot_start"])
def _move_kernel(src32, dst32, segbytes_ptr, so_ptr, so_s, slot_start, H,
                 SEG_K: tl.constexpr, SEG_V: tl.constexpr, BLOCK: tl.constexpr):
    """Copy segment (block n, K|V, head h) from its worst-case place in the scratch to seg_offset."""
    s = tl.program_id(0)
    n = s // (2 * H)
    inner = s % (2 * H)
    kv = inner // H
    h = inner % H
    src = n.to(tl.int64) * H * (SEG_K + SEG_V) + tl.where(kv == 0, h * SEG_K, H * SEG_K + h * SEG_V)
    dst = tl.load(so_ptr + (slot_start + n).to(tl.int64) * so_s + inner)
    words = tl.load(segbytes_ptr + s) // 4
    for start in range(0, words, BLOCK):
        w = start + tl.arange(0, BLOCK)
        m = w < words
        tl.store(dst32 + dst // 4 + w, tl.load(src32 + src // 4 + w, mask=m), mask=m)


# ---------------------------------------------------------------------------------------------
# Host side


def _pool_words(pool: torch.Tensor) -> torch.Tensor:
    if pool.dtype != torch.uint8 or pool.dim() != 1 or not pool.is_contiguous():
        raise ValueError("pool must be a contiguous 1-D uint8 tensor")
    if pool.data_ptr() % 4 != 0:
        raise ValueError("pool must start at a 4-byte aligned address")
    return pool[: pool.numel() // 4 * 4].view(torch.int32)


def _rows_aligned(x: torch.Tensor) -> bool:
    """Every row of x [B, H, T, D] contiguous and starting 16 bytes aligned at a multiple of 8 elements."""
    return x.stride(3) == 1 and all(st % 8 == 0 for st in x.stride()[:3]) and x.data_ptr() % 16 == 0


def _check_inputs(k: torch.Tensor, v: torch.Tensor, fmt: BlockFormat):
    if k.shape != v.shape or k.dim() != 4 or k.shape[2] % BLOCK_SIZE != 0:
        raise ValueError(f"k and v must both be [B, H, nb*64, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] != fmt.num_heads or k.shape[3] != fmt.head_dim:
        raise ValueError(f"k shape {tuple(k.shape)} does not match the format ({fmt.num_heads} heads, D={fmt.head_dim})")
    if fmt.head_dim & (fmt.head_dim - 1) or fmt.head_dim < 16:
        raise ValueError(f"the Triton kernels need a power-of-two head_dim >= 16, got {fmt.head_dim}")
    if k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {k.dtype}")


def store_blocks(k, v, store: BlockStore, slot_start: int, *, num_warps: tuple[int, int] | None = None):
    """Compress k, v [B, H, nb*64, D] into `store` (block n = b*nb + i goes to slot slot_start + n).

    Segments are appended at store.pool_used in (block, K then V, head) order, the slots' seg_offset/
    seg_bytes/token_min/token_step/perm are written, and pool_used (int64 [1], on device) is advanced.
    No host synchronisation, so store.used_bound does not move (BlockStore.add keeps it; other callers
    read store.used_bytes()). The caller guarantees pool capacity (BlockStore.reserve / max_bytes).
    num_warps: (stats kernel, pack kernel) warps; default by head_dim."""
    fmt = store.fmt
    _check_inputs(k, v, fmt)
    B, H, Tk, D = k.shape
    nb = Tk // BLOCK_SIZE
    n = B * nb
    if n == 0:
        return
    if slot_start + n > store.seg_offset.shape[0]:
        raise ValueError(f"the store has {store.seg_offset.shape[0]} slots; slots {slot_start}..{slot_start + n - 1} "
                         "do not fit (BlockStore.reserve first)")
    seg_offset, token_min, token_step = store.seg_offset, store.token_min, store.token_step
    perm = store.perm_of(store.seg_offset.shape[0])
    if seg_offset.stride(2) != 1 or seg_offset.stride(1) != H:
        raise ValueError("seg_offset must be [S, 2, H] with contiguous (2, H) dims")
    pool32 = _pool_words(store.pool)
    segbytes = store.seg_bytes[slot_start:slot_start + n].view(-1)  # [n, 2, H] in (block, K|V, head) order
    token_gran = fmt.granularity == "token"
    if (fmt.groups > 1 and (token_min.stride(3) != 1 or token_step.stride(3) != 1)) or perm.stride(1) != 1:
        raise ValueError("token_min/token_step/perm must have a contiguous last dim")
    slot_args = (token_min, token_step, token_min.stride(0), token_min.stride(1), token_min.stride(2),
                 token_step.stride(0), token_step.stride(1), token_step.stride(2))
    whole_blocks = fmt.pack_size == BLOCK_SIZE and fmt.repack == "none"
    # whole blocks: 8-warp pack programs (239 registers, no spills) beat 16 (127): 225 against 151 GB/s at 32K x 8
    # (H200, bench_kernels --store-warps); the statistics kernel's warps make no difference
    nw_stats, nw = num_warps or ((8, 8) if D <= 64 or (whole_blocks and D <= 128) else (16, 16))
    pack_tiles = dict(WB_K=width_bits(fmt.bits_k), WB_V=width_bits(fmt.bits_v),
                      MW_K=triton.next_power_of_2(fmt.meta_bytes(0) // 4),
                      MW_V=triton.next_power_of_2(fmt.meta_bytes(1) // 4),
                      CW_K=2 * triton.next_power_of_2(fmt.bits_k), CW_V=2 * triton.next_power_of_2(fmt.bits_v),
                      CJ_K=chunk_fields(fmt.bits_k, 64), CJ_V=chunk_fields(fmt.bits_v, 64),
                      D=D, BITS_K=fmt.bits_k, BITS_V=fmt.bits_v, META_K=fmt.meta_bytes(0), META_V=fmt.meta_bytes(1),
                      TOKEN_GRAN=token_gran, FIXED_K=fmt.fixed(0), FIXED_V=fmt.fixed(1))
    aligned = _rows_aligned(k) and _rows_aligned(v)
    if whole_blocks:
        _store_whole_blocks(k, v, store, slot_start, n, nb, segbytes, pool32, slot_args, pack_tiles, aligned,
                            nw_stats, nw)
        return
    _stats_kernel[(n,)](
        k, v, *k.stride(), *v.stride(), nb, H, *slot_args,
        perm, perm.stride(0), slot_start, segbytes, store.rel_k, store.rel_v,
        D=D, P=fmt.pack_size, BITS_K=fmt.bits_k, BITS_V=fmt.bits_v, META_K=fmt.meta_bytes(0),
        META_V=fmt.meta_bytes(1), TOKEN_GRAN=token_gran, MEDIAN=fmt.repack == "median", ALIGNED=aligned,
        num_warps=nw_stats, num_stages=1)
    _offsets_kernel[(1,)](segbytes, n * 2 * H, store.pool_used, seg_offset, seg_offset.stride(0), slot_start, H,
                          BLOCK=1024, num_warps=4)
    _pack_kernel[(n, H)](
        k, v, *k.stride(), *v.stride(), nb, *slot_args,
        perm, perm.stride(0), seg_offset, seg_offset.stride(0), seg_offset.stride(1), slot_start, pool32,
        P=fmt.pack_size, ZBLOCK=256, num_warps=nw, num_stages=1, **pack_tiles)


def _store_whole_blocks(k, v, store: BlockStore, slot_start, n, nb, segbytes, pool32, slot_args, pack_tiles, aligned,
                        nw_stats, nw):
    """store_blocks for whole-block packs in arrival order (see the module docstring)."""
    fmt, seg_offset = store.fmt, store.seg_offset
    H = fmt.num_heads
    seg_k, seg_v = fmt.max_segment_bytes(0), fmt.max_segment_bytes(1)
    part = torch.empty(0, device=k.device, dtype=torch.float32)
    if fmt.granularity == "token":
        part = torch.empty(n * 2 * 3 * H * 64, device=k.device, dtype=torch.float32)
        _head_stats_kernel[(n, H)](k, v, *k.stride(), *v.stride(), nb, H, part, D=fmt.head_dim,
                                   ALIGNED=aligned, num_warps=nw_stats, num_stages=1)
    fixed = fmt.layout == "fixed"  # every segment at its only size: written in place (_pack64_kernel's IN_PLACE)
    dst32 = pool32 if fixed else torch.empty(n * H * (seg_k + seg_v) // 4, device=k.device, dtype=torch.int32)
    _pack64_kernel[(n, H)](
        k, v, *k.stride(), *v.stride(), nb, H, part, *slot_args,
        seg_offset, seg_offset.stride(0), seg_offset.stride(1), segbytes, slot_start, store.pool_used, dst32,
        store.rel_k, store.rel_v, SEG_K=seg_k, SEG_V=seg_v, HP=triton.next_power_of_2(H),
        num_warps=nw, num_stages=1, **pack_tiles)
    if fixed:  # every segment has its largest size: the pack kernel placed them after pool_used
        store.pool_used += n * H * (seg_k + seg_v)
        return
    _offsets_kernel[(1,)](segbytes, n * 2 * H, store.pool_used, seg_offset, seg_offset.stride(0), slot_start, H,
                          BLOCK=1024, num_warps=4)
    _move_kernel[(n * 2 * H,)](dst32, pool32, segbytes, seg_offset, seg_offset.stride(0), slot_start, H,
                               SEG_K=seg_k, SEG_V=seg_v, BLOCK=256, num_warps=2)


def encode_blocks_triton(k: torch.Tensor, v: torch.Tensor, config) -> tuple[EncodedBlocks, BlockFormat]:
    """Same result as codec.encode_blocks for k, v [n, H, 64, D] (through a store of its own)."""
    if k.shape != v.shape or k.dim() != 4 or k.shape[2] != BLOCK_SIZE:
        raise ValueError(f"k and v must both be [n, H, {BLOCK_SIZE}, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    store = BlockStore.from_config(config, k.shape[1], k.shape[3], k.dtype, k.device, use_triton=True)
    slots = store.add(k, v)  # [n, H, 64, D] is the [B=n, H, nb*64, D] layout with nb = 1
    store.used_bytes()
    enc = codec.store_slots(store, slots)
    enc.data = enc.data.clone()  # not a view of the store's spare capacity
    return enc, store.fmt
