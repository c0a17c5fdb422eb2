"""Kernel tests: store vs the reference codec (bit-exact), fused decode attention vs SDPA on the
dequantised cache. CPU tests run the kernels in the Triton interpreter with tiny shapes; tests
marked `cuda` use real shapes and skip without a GPU."""

import math
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

pytest.importorskip("triton")

from kvcomp_hf import codec  # noqa: E402
from kvcomp_hf.block_store import BlockStore  # noqa: E402
from kvcomp_hf.config import KVCompConfig  # noqa: E402
from kvcomp_hf.kernels import DecodeTuning, decode_attention, encode_blocks_triton, store_blocks  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def skip_fp32_on_gpu(dtype):
    """float32 K/V take the PyTorch path on CUDA (see cache._use_triton): Triton 3.6 fails to compile
    some float32 variants there. The interpreter still checks the float32 code paths on CPU."""
    if HAS_CUDA and dtype == torch.float32:
        pytest.skip("float32 kernels run only under the interpreter; CUDA routes float32 models to PyTorch")
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-3}


def _kv(n, h, t, d, dtype, gen, outliers=False, device=DEV):
    k = torch.randn(n, h, t, d, generator=gen)
    v = torch.randn(n, h, t, d, generator=gen)
    if outliers:  # a few channels x20, as K has after RoPE in real models
        ch = torch.randperm(d, generator=gen)[:3]
        k[..., ch] *= 20
        v[..., ch[:1]] *= 20
    return k.to(dtype).to(device), v.to(dtype).to(device)


def _assert_same_encoding(e1, e0):
    assert torch.equal(e1.seg_offset.cpu(), e0.seg_offset.cpu())
    assert torch.equal(e1.seg_bytes.cpu(), e0.seg_bytes.cpu())
    assert torch.equal(e1.perm.cpu(), e0.perm.cpu())
    assert torch.equal(e1.token_step.cpu(), e0.token_step.cpu())
    assert torch.equal(e1.token_min.cpu(), e0.token_min.cpu())
    assert e1.data.numel() == e0.data.numel()
    assert torch.equal(e1.data.cpu(), e0.data.cpu())


STORE_CASES = [
    # (pack, repack, granularity, rel_k, rel_v, dtype, outliers)
    (16, "median", "token", 0.1, 0.2, torch.bfloat16, False),
    (16, "median", "token", 0.1, 0.2, torch.bfloat16, True),
    (8, "none", "token", 0.05, 0.3, torch.float16, True),
    (4, "median", "token_head", 0.3, 0.05, torch.float32, False),
    (4, "none", "token_head", 0.2, 0.1, torch.bfloat16, True),
    (8, "median", "token_head", 0.05, 0.2, torch.float16, False),
    (16, "median", "token", 0.01, 0.3, torch.float32, True),
    # pack 64 (the default): plain-store writer; widths that do not divide 32, > 8 bits, D=16 metadata padding
    (64, "none", "token", 0.1, 0.2, torch.bfloat16, True),
    (64, "median", "token_head", 0.05, 0.3, torch.float16, False),
    (64, "none", "token", 0.003, 0.03, torch.bfloat16, True),
    (64, "none", "token_head", 0.02, 0.7, torch.float32, True),
]
FIXED_STORE_CASES = [
    # layout "fixed": 4-bit K in pair order, 3-bit V straddling words; 2- and 7-bit fields; per-head groups
    ("fixed", "token", 1 / 15, 1 / 7, torch.bfloat16, True),
    ("fixed", "token_head", 1 / 3, 1 / 100, torch.float16, False),
    ("fixed", "token", 0.1, 0.15, torch.float32, True),
    ("fixed", "token_head", 1 / 15, 1 / 15, torch.float16, True),  # 4/4 bits: kvcomp:compiled and the fast preset
    # layout "fixed_v": packed K beside fixed 2-bit, 4-bit (pair order) and 3-bit V
    ("fixed_v", "token", 0.08, 1 / 3, torch.bfloat16, True),
    ("fixed_v", "token_head", 0.05, 1 / 15, torch.float16, False),
    ("fixed_v", "token", 0.1, 1 / 7, torch.float32, True),
]


@pytest.mark.parametrize("pack,repack,gran,rel_k,rel_v,dtype,outliers", STORE_CASES)
def test_store_matches_codec(pack, repack, gran, rel_k, rel_v, dtype, outliers):
    skip_fp32_on_gpu(dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((pack, repack, gran, rel_k, rel_v, dtype, outliers)).encode()))
    cfg = KVCompConfig(rel_k=rel_k, rel_v=rel_v, pack_size=pack, repack=repack, granularity=gran)
    k, v = _kv(3, 2, 64, 32, dtype, gen, outliers)
    e1, f1 = encode_blocks_triton(k, v, cfg)
    e0, f0 = codec.encode_blocks(k, v, cfg)
    assert f1 == f0
    _assert_same_encoding(e1, e0)


@pytest.mark.parametrize("layout,gran,rel_k,rel_v,dtype,outliers", FIXED_STORE_CASES)
def test_store_matches_codec_fixed_layout(layout, gran, rel_k, rel_v, dtype, outliers):
    skip_fp32_on_gpu(dtype)
    gen = torch.Generator().manual_seed(7)
    cfg = KVCompConfig(layout=layout, granularity=gran, rel_k=rel_k, rel_v=rel_v)
    k, v = _kv(3, 2, 64, 32, dtype, gen, outliers)
    e1, fmt = encode_blocks_triton(k, v, cfg)
    e0, _ = codec.encode_blocks(k, v, cfg)
    _assert_same_encoding(e1, e0)
    assert (e0.seg_bytes[:, 1] == 8 * 32 * fmt.bits_v).all()  # V fixed in both layouts
    fixed_k = e0.seg_bytes[:, 0] == 8 * 32 * fmt.bits_k
    assert fixed_k.all() if layout == "fixed" else not fixed_k.all()  # packed K: metadata + variable widths


@pytest.mark.parametrize("gran,layout", [("token", "packed"), ("token_head", "packed"), ("token", "fixed"),
                                         ("token", "fixed_v")])
def test_store_whole_blocks_three_heads_nonfinite_and_offset(gran, layout):
    """The whole-block path with a head count that is not a power of two (the per-head statistics are
    combined over a padded tile), NaN and inf tokens, slot_start > 0 and pool_used > 0."""
    gen = torch.Generator().manual_seed(11)
    cfg = KVCompConfig(granularity=gran, layout=layout)
    k, v = _kv(4, 3, 64, 32, torch.bfloat16, gen, outliers=True)
    k[0] = k[0].abs() + 0.5  # positive: a padded head read as 0 would lower the token minimum
    k[1, 2, 7, 5] = float("nan")
    v[2, 0, 40, 1] = float("inf")
    k[3, 1, 63, 0] = float("-inf")
    store = BlockStore.from_config(cfg, 3, 32, torch.bfloat16, torch.device(DEV), use_triton=True)
    store.reserve(9, 40 + store.max_bytes(4))
    store.pool_used.fill_(40)
    store_blocks(k, v, store, 5)  # [B=4, H, 64, D]: one block per row
    e0, _ = codec.encode_blocks(k, v, cfg)
    total = int(e0.seg_bytes.sum())
    assert int(store.pool_used) == 40 + total
    assert torch.equal(store.seg_offset[5:9].cpu(), e0.seg_offset.cpu() + 40)
    assert torch.equal(store.seg_bytes[5:9].cpu().long(), e0.seg_bytes.cpu())
    assert torch.equal(store.pool[40:40 + total].cpu(), e0.data.cpu())
    for name in ("token_min", "token_step"):  # NaN where a token's group holds a NaN or inf
        got, want = getattr(store, name)[5:9].cpu().float(), getattr(e0, name).cpu().float()
        assert torch.allclose(got, want, rtol=0, atol=0, equal_nan=True)
    assert int(store.token_step[5:9].isnan().sum()) == 3  # one group per bad value


def test_store_vector_load_hint_only_for_aligned_rows():
    """The statistics kernels are told rows start 16-byte aligned (vector loads) only when every row does."""
    from kvcomp_hf.kernels.store import _rows_aligned

    x = torch.zeros(2, 3, 70, 40, dtype=torch.bfloat16)
    assert _rows_aligned(x[:, :, :64, :32].contiguous()) and _rows_aligned(x[:, :, 3:67, :])  # strides 40*k, 40
    assert not _rows_aligned(x[:, :, :64, 1:33])  # rows start 2 bytes past an aligned address
    assert not _rows_aligned(x[:, :, :64, :32].transpose(2, 3).contiguous().transpose(2, 3))  # channel stride 64
    assert not _rows_aligned(torch.zeros(2, 3, 64, 36, dtype=torch.bfloat16)[..., :32])  # row stride 36


def test_store_constant_tokens_and_strided_input():
    """Constant tokens (step 0), a strided view of a longer tail, two sequences, slot_start > 0,
    a non-zero pool_used and old bytes in the pool past it."""
    gen = torch.Generator().manual_seed(7)
    cfg = KVCompConfig()
    B, H, nb, D = 2, 2, 2, 16
    tail = torch.randn(B, H, nb * 64 + 9, D, generator=gen).to(torch.bfloat16).to(DEV)
    tail[0, :, 5] = 1.5  # constant token across heads
    tail_v = torch.randn(B, H, nb * 64 + 9, D, generator=gen).to(torch.bfloat16).to(DEV)
    tail_v[1, :, 70] = -2.0
    k, v = tail[:, :, : nb * 64], tail_v[:, :, : nb * 64]
    store = BlockStore.from_config(cfg, H, D, torch.bfloat16, torch.device(DEV), use_triton=True)
    store.reserve(8, 64 + store.max_bytes(B * nb))
    store.pool.fill_(0xA5)
    store.pool_used.fill_(12)
    store_blocks(k, v, store, 3)
    blocks_k = k.reshape(B, H, nb, 64, D).transpose(1, 2).reshape(B * nb, H, 64, D)
    blocks_v = v.reshape(B, H, nb, 64, D).transpose(1, 2).reshape(B * nb, H, 64, D)
    e0, _ = codec.encode_blocks(blocks_k, blocks_v, cfg)
    n = B * nb
    total = int(e0.seg_bytes.sum())
    assert int(store.pool_used) == 12 + total
    assert torch.equal(store.seg_offset[3:3 + n].cpu(), e0.seg_offset.cpu() + 12)
    assert torch.equal(store.seg_bytes[3:3 + n].cpu().long(), e0.seg_bytes.cpu())
    assert torch.equal(store.pool[12:12 + total].cpu(), e0.data.cpu())
    assert torch.equal(store.perm_of(8)[3:3 + n].cpu(), e0.perm.cpu())
    assert torch.equal(store.token_min[3:3 + n].cpu(), e0.token_min.cpu())
    assert torch.equal(store.token_step[3:3 + n].cpu(), e0.token_step.cpu())
    assert (store.pool[:12].cpu() == 0xA5).all()
    assert (store.token_step[3:3 + n, :, :].float() == 0).any()  # the constant tokens


# ---------------------------------------------------------------------------------------------
# Decode attention


def _build_cache(B, H, nb, T, D, dtype, cfg, gen, shuffle_slots=False, device=DEV):
    """A store holding B rows of nb blocks (BlockStore.add: the Triton store), the dense K/V [B, H, nb*64 + T, D]
    whose last T tokens are the tail, and the block table."""
    k, v = _kv(B, H, nb * 64 + T, D, dtype, gen, outliers=True, device=device)
    store = BlockStore.from_config(cfg, H, D, dtype, torch.device(device), use_triton=True)
    block_table = store.add(k[:, :, : nb * 64], v[:, :, : nb * 64])
    if shuffle_slots and B > 1:  # beam-search style: rows swapped, one row sharing the other's slots
        block_table = block_table.flip(0).contiguous()
        block_table[-1] = block_table[0]
        k[-1, :, : nb * 64] = k[0, :, : nb * 64]  # the dense copy only feeds the tail below
        v[-1, :, : nb * 64] = v[0, :, : nb * 64]
    return store, k, v, block_table


def _reference(q, store, k, v, block_table, kv_valid, scaling, ref_dtype=torch.float64):
    B, H, _, D = k.shape
    nb = block_table.shape[1]
    k_tail, v_tail = k[:, :, nb * 64:], v[:, :, nb * 64:]
    if nb:
        kh, vh = codec.decode_store(store, block_table)  # [B, nb, H, 64, D]
        kh = kh.transpose(1, 2).reshape(B, H, nb * 64, D)
        vh = vh.transpose(1, 2).reshape(B, H, nb * 64, D)
        kk = torch.cat([kh.to(ref_dtype), k_tail.to(ref_dtype)], 2)
        vv = torch.cat([vh.to(ref_dtype), v_tail.to(ref_dtype)], 2)
    else:
        kk, vv = k_tail.to(ref_dtype), v_tail.to(ref_dtype)
    Hq, QL = q.shape[1], q.shape[2]
    L = kk.shape[2]
    qpos = L - QL + torch.arange(QL, device=q.device)
    mask = (torch.arange(L, device=q.device)[None, :] <= qpos[:, None])[None, None]
    if kv_valid is not None:
        mask = mask & kv_valid[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(
        q.to(ref_dtype), kk, vv, attn_mask=mask, scale=scaling, enable_gqa=Hq != H)


def _check_decode(B, H, group, nb, T, D, QL, dtype, cfg, seed, padding=True, shuffle=False, num_splits=None,
                  device=DEV, ref_dtype=torch.float64, tuning=None):
    gen = torch.Generator().manual_seed(seed)
    store, k, v, bt = _build_cache(B, H, nb, T, D, dtype, cfg, gen, shuffle, device)
    q = torch.randn(B, H * group, QL, D, generator=gen).to(dtype).to(device)
    L = nb * 64 + T
    kv_valid = None
    if padding:
        kv_valid = torch.ones(B, L, dtype=torch.bool, device=device)
        kv_valid[0, : min(L - 1, 37)] = False  # left padding of row 0
        if B > 1:
            kv_valid[-1, 1::5] = False
    scaling = 1.0 / math.sqrt(D)
    out = decode_attention(q, k[:, :, nb * 64:], v[:, :, nb * 64:], store, bt, kv_valid, scaling, tuning=tuning,
                           num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    # a split whose keys are all masked (left padding) must not turn the merge into 0/0
    assert torch.isfinite(out).all(), "non-finite output"
    ref = _reference(q, store, k, v, bt, kv_valid, scaling, ref_dtype)
    err = ((out.to(ref.dtype) - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    return err


DECODE_CASES = [
    # (B, H, group, nb, T, D, q_len, dtype, cfg kwargs, splits)
    (2, 2, 2, 3, 5, 32, 1, torch.bfloat16, {}, 2),
    (2, 2, 2, 3, 5, 32, 4, torch.bfloat16, {}, None),
    (2, 1, 3, 2, 0, 16, 4, torch.float16, {"granularity": "token_head", "pack_size": 8}, 1),
    (1, 2, 1, 0, 70, 16, 1, torch.float32, {"layout": "packed"}, None),  # float32: only the packed kernel
    (2, 2, 1, 0, 9, 16, 4, torch.bfloat16, {}, None),
    (2, 2, 2, 1, 0, 16, 8, torch.float32, {"pack_size": 4, "rel_k": 0.02, "repack": "none"}, None),
    (1, 2, 4, 4, 130, 32, 1, torch.float16, {"rel_k": 0.05, "rel_v": 0.1}, 3),
    (2, 2, 4, 3, 1, 32, 1, torch.bfloat16, {"rel_k": 0.003, "rel_v": 0.3}, None),  # 9-bit K: float32 operands
    (1, 1, 8, 2, 3, 64, 2, torch.bfloat16, {"pack_size": 16, "repack": "median"}, 2),
    # layout "fixed" (the tokens-in-M kernel): 4-bit pair order, 3-bit straddling, 2/7-bit, per-head groups,
    # a tail of several 64-token chunks, no blocks
    (2, 2, 4, 3, 70, 32, 2, torch.bfloat16, {"layout": "fixed", "rel_k": 1 / 15, "rel_v": 1 / 7}, 2),
    (1, 2, 4, 4, 130, 32, 1, torch.float16, {"layout": "fixed", "rel_k": 1 / 3, "rel_v": 1 / 100}, 3),
    (2, 2, 2, 3, 1, 32, 4, torch.bfloat16, {"layout": "fixed", "granularity": "token_head"}, None),
    (2, 2, 1, 0, 9, 16, 4, torch.bfloat16, {"layout": "fixed"}, None),
    # layout "fixed_v": packed K (per-channel widths) beside fixed 2-bit and 4-bit (pair order) V
    (2, 2, 4, 3, 70, 32, 2, torch.bfloat16, {"layout": "fixed_v", "rel_v": 1 / 3}, 2),
    (1, 2, 2, 4, 130, 32, 1, torch.float16, {"layout": "fixed_v", "rel_k": 0.05, "rel_v": 1 / 15,
                                             "granularity": "token_head"}, 3),
    # the "fast" preset's 4-bit K and V: two blocks per iteration, odd block counts per split
    (2, 2, 4, 7, 10, 32, 1, torch.bfloat16, {"preset": "fast"}, 3),
    (1, 2, 2, 5, 64, 16, 4, torch.float16, {"preset": "fast", "granularity": "token_head"}, 2),
]


@pytest.mark.parametrize("B,H,group,nb,T,D,QL,dtype,kw,splits", DECODE_CASES)
def test_decode_attention(B, H, group, nb, T, D, QL, dtype, kw, splits):
    skip_fp32_on_gpu(dtype)
    _check_decode(B, H, group, nb, T, D, QL, dtype, KVCompConfig.from_dict(kw), seed=nb * 100 + T + QL,
                  num_splits=splits)


@pytest.mark.parametrize("tuning", [DecodeTuning(prefetch=False, split_v=False, min_blocks_per_split=1),
                                    DecodeTuning(num_warps=8, split_waves=1), DecodeTuning(tokens_in_m=True),
                                    DecodeTuning(tokens_in_m=True, split_v=False),
                                    DecodeTuning(tokens_in_m=True, tail_launch=True)])
def test_decode_attention_tunings(tuning):
    """Other compiled variants of the tuning object compute the same attention."""
    _check_decode(2, 2, 4, 5, 3, 32, 1, torch.bfloat16, KVCompConfig(), seed=3, tuning=tuning)


def test_decode_attention_shared_slots_no_padding():
    _check_decode(2, 2, 2, 2, 3, 16, 1, torch.bfloat16, KVCompConfig(), seed=5, padding=False, shuffle=True)


# ---------------------------------------------------------------------------------------------
# CUDA (real shapes)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [KVCompConfig(), KVCompConfig(pack_size=4, repack="none", granularity="token_head",
                                                              rel_k=0.05, rel_v=0.3)])
def test_store_matches_codec_cuda(dtype, cfg):
    gen = torch.Generator().manual_seed(11)
    for D in (64, 128):
        k, v = _kv(40, 8, 64, D, dtype, gen, outliers=True, device="cuda")
        e1, _ = encode_blocks_triton(k, v, cfg)
        e0, _ = codec.encode_blocks(k, v, cfg)
        _assert_same_encoding(e1, e0)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("ctx", [4096, 32768])
def test_decode_attention_cuda(ctx, B, D, dtype):
    T = 128 + 17
    nb = (ctx - T) // 64
    T = ctx - nb * 64
    _check_decode(B, 4, 4, nb, T, D, 1, dtype, KVCompConfig(), seed=ctx + B + D, device="cuda",
                  ref_dtype=torch.float32)


CUDA_DECODE_CASES = [
    # (B, H, group, nb, T, D, q_len, dtype, cfg kwargs, splits): the compiled variants beyond the default shape
    (2, 2, 4, 60, 140, 128, 4, torch.bfloat16, {}, None),
    (2, 2, 1, 40, 150, 64, 9, torch.bfloat16, {}, None),                         # q_len 9, no GQA
    (1, 2, 8, 30, 131, 256, 1, torch.float16, {}, 3),                            # head_dim 256 (8 warps), GQA 8
    (2, 2, 1, 20, 129, 128, 16, torch.float16, {}, 2),                           # q_len 16
    (2, 2, 4, 33, 129, 128, 1, torch.bfloat16, {"rel_k": 0.003}, None),          # 9-bit K: float32 operands
    (2, 1, 4, 20, 130, 128, 1, torch.float16, {"pack_size": 16, "repack": "median"}, 4),  # the compact layout
    (1, 2, 4, 10, 128, 64, 2, torch.bfloat16, {"pack_size": 4, "granularity": "token_head"}, None),
    (2, 2, 4, 60, 140, 128, 1, torch.bfloat16, {"layout": "fixed", "rel_k": 1 / 15, "rel_v": 1 / 7}, None),
    (2, 2, 4, 60, 190, 128, 4, torch.float16, {"layout": "fixed", "rel_k": 1 / 15, "rel_v": 1 / 15}, 5),
    (1, 2, 8, 30, 131, 256, 1, torch.bfloat16, {"layout": "fixed", "rel_k": 1 / 7, "rel_v": 1 / 3}, 3),
    (2, 2, 1, 20, 129, 64, 16, torch.bfloat16, {"layout": "fixed", "granularity": "token_head"}, 2),
    (2, 2, 4, 61, 150, 128, 1, torch.bfloat16, {"preset": "fast"}, None),
    (1, 2, 8, 33, 131, 256, 2, torch.float16, {"preset": "fast"}, 3),
    (2, 2, 4, 60, 140, 128, 1, torch.bfloat16, {"layout": "fixed_v", "rel_v": 1 / 3}, None),
    (1, 2, 8, 30, 131, 256, 4, torch.float16, {"layout": "fixed_v", "rel_v": 1 / 15}, 3),
]


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("B,H,group,nb,T,D,QL,dtype,kw,splits", CUDA_DECODE_CASES)
def test_decode_attention_cuda_variants(B, H, group, nb, T, D, QL, dtype, kw, splits):
    _check_decode(B, H, group, nb, T, D, QL, dtype, KVCompConfig.from_dict(kw), seed=nb + QL + D, num_splits=splits,
                  device="cuda", ref_dtype=torch.float32)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prmt", [True, False])
def test_decode_attention_cuda_prmt_unpack(dtype, prmt):
    """The fast layout's two 4-bit unpackers (inline-PTX byte permutes, the default, and shifts and masks) read
    the same values."""
    _check_decode(2, 2, 4, 61, 150, 128, 1, dtype, KVCompConfig.from_dict({"preset": "fast"}), seed=17,
                  device="cuda", ref_dtype=torch.float32, tuning=DecodeTuning(prmt_unpack=prmt))


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("tail_launch", [False, True])
def test_decode_attention_cuda_tail_launch(tail_launch):
    """The tail's chunks run in the blocks' launch (the default) or a launch of their own: the same attention."""
    _check_decode(2, 2, 4, 40, 150, 128, 1, torch.bfloat16, KVCompConfig(), seed=19, device="cuda",
                  ref_dtype=torch.float32, tuning=DecodeTuning(tokens_in_m=True, tail_launch=tail_launch))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device, D, T", [("cpu", 16, 37), pytest.param("cuda", 128, 451, marks=pytest.mark.cuda)])
def test_tail_rows_kernels_are_the_codec_bit_for_bit(dtype, device, D, T):
    """config.tail_bits' rows in one launch each: encode_rows gives codec.encode_tail's bytes, decode_rows
    codec.decode_tail's values after the exact sinks, on strided inputs (K as a projection leaves it), with constant
    rows and channels 100x apart; a row with NaN or inf decodes to NaN as in the codec."""
    from kvcomp_hf.kernels.tail_rows import decode_rows, encode_rows

    gen = torch.Generator().manual_seed(31)
    B, H, S = 2, 3, 4
    k = torch.randn(B, T, H, D, generator=gen) * torch.logspace(-1, 1, D)  # [B, T, H, D] then transposed
    v = torch.randn(B, H, T + 5, D, generator=gen)
    k[0, 3, 1] = 1.5  # a constant row
    v[1, 2, 12] = float("nan")
    v[1, 0, 14, 2] = float("inf")
    # a slice: rows start past the tensor's start
    k, v = k.to(dtype).to(device).transpose(1, 2), v.to(dtype).to(device)[:, :, 5:]
    assert not k.is_contiguous() and not v.is_contiguous()
    rows_k, rows_v = encode_rows(k, v)
    assert rows_k.shape == (B, H, T, D + 2 * dtype.itemsize) and rows_k.dtype == torch.uint8
    want_k, want_v = codec.encode_tail(k), codec.encode_tail(v)
    assert torch.equal(rows_k, want_k)
    finite = v.isfinite().all(-1)
    assert torch.equal(rows_v[finite], want_v[finite])  # a non-finite row's codes are unspecified
    sink_k, sink_v = k[:, :, :S].contiguous(), v[:, :, :S].clone()
    got_k, got_v = decode_rows(rows_k[:, :, S:], rows_v[:, :, S:], dtype, sink_k, sink_v)
    assert torch.equal(got_k, torch.cat([sink_k, codec.decode_tail(want_k[:, :, S:], dtype)], 2))
    got_v_rows = got_v[:, :, S:]
    assert torch.allclose(got_v_rows, codec.decode_tail(want_v[:, :, S:], dtype), rtol=0, atol=0, equal_nan=True)
    assert got_v_rows[~finite[:, :, S:]].isnan().all() and not got_v_rows[finite[:, :, S:]].isnan().any()
    assert torch.equal(got_v[:, :, :S], sink_v)
    no_sinks = decode_rows(rows_k, rows_v, dtype)[0]
    assert torch.equal(no_sinks, codec.decode_tail(want_k, dtype))
    empty_k, empty_v = encode_rows(k[:, :, :0], v[:, :, :0])  # a layer's first, empty tail
    assert empty_k.shape == (B, H, 0, D + 2 * dtype.itemsize)
    assert decode_rows(empty_k, empty_v, dtype, sink_k, sink_v)[0].shape == (B, H, S, D)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tail_rows_kernels_divide_by_255_as_cuda_pytorch_does(dtype):
    """On CUDA, PyTorch computes codec's `(hi - lo) / 255` as (hi - lo) times the float32 reciprocal of 255 (ATen's
    div_true_kernel_cuda, a Python number as divisor), which differs from the division in the last bit of some rows;
    the kernels do the same there (checked bit for bit on a GPU by the test above). Here, in the interpreter: that
    branch against the codec's formulas with that product, which changes some codes."""
    from kvcomp_hf.kernels.tail_rows import LEVELS, decode_rows, encode_rows

    inv = (torch.tensor(1.0) / LEVELS).item()  # float32 division on the host, as ATen's inv_b
    x = torch.randn(3, 2, 300, 32, generator=torch.Generator().manual_seed(32)).mul(7).to(dtype)

    def scale_of(lo, hi):
        return (hi.float() - lo.float()) * inv

    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    scale = scale_of(lo, hi)
    q = torch.clamp(torch.round((x.float() - lo.float()) / scale.masked_fill(scale == 0, 1.0)), 0, LEVELS)
    want = torch.cat([q.to(torch.uint8), torch.cat([lo, hi], -1).view(torch.uint8)], -1)
    rows = encode_rows(x, x, reciprocal=True)[0]
    assert torch.equal(rows, want) and not torch.equal(rows, codec.encode_tail(x))
    got = decode_rows(rows, rows, dtype, reciprocal=True)[0]
    assert torch.equal(got, (q * scale_of(lo, hi) + lo.float()).to(dtype))


def test_tail_rows_kernels_name_the_bad_argument():
    from kvcomp_hf.kernels.tail_rows import decode_rows, encode_rows

    x = torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="16-bit float dtype"):
        encode_rows(x.float(), x.float())
    with pytest.raises(ValueError, match=r"k must be \[B, H, T, D\]"):
        encode_rows(x[0], x[0])
    y = torch.randn(1, 2, 16, 3).to(torch.bfloat16).transpose(2, 3)  # D not the unit stride: copied, same rows
    assert torch.equal(encode_rows(y, y)[0], codec.encode_tail(y))
    rows = encode_rows(x, x)[0]
    with pytest.raises(ValueError, match="dtype must be"):
        decode_rows(rows, rows, torch.float32)
    with pytest.raises(ValueError, match="sink_k and sink_v"):
        decode_rows(rows, rows, torch.bfloat16, x[:, :, :2, :8], x[:, :, :2, :8])
