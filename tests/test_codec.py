"""Properties of the reference codec: error bound, determinism, exact byte accounting, format."""

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcomp_hf import codec
from kvcomp_hf.config import KVCompConfig

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_kv(seed, n, h, d, dtype, outliers):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, h, 64, d, generator=g) * torch.rand(1, h, 1, d, generator=g) * 3
    v = torch.randn(n, h, 64, d, generator=g)
    if outliers:  # a few channels much larger than the rest, as real K has
        idx = torch.randint(0, d, (3,), generator=g)
        k[..., idx] *= 20
        v[:, :, torch.randint(0, 64, (2,), generator=g)] *= 15  # a few outlier tokens
    return k.to(dtype), v.to(dtype)


def group_view(x, granularity):
    """[n, H, 64, D] -> [n, 64, G, values per group]"""
    g = x.permute(0, 2, 1, 3)
    return g.reshape(g.shape[0], g.shape[1], 1, -1) if granularity == "token" else g


configs = st.builds(
    KVCompConfig,
    rel_k=st.sampled_from([0.01, 0.05, 0.1, 1 / 7, 0.2, 0.33]),
    rel_v=st.sampled_from([0.02, 0.1, 0.2, 0.3, 0.5]),
    pack_size=st.sampled_from([4, 8, 16]),
    repack=st.sampled_from(["none", "median"]),
    granularity=st.sampled_from(["token", "token_head"]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3), h=st.sampled_from([1, 2, 3]),
       d=st.sampled_from([8, 16, 64]), dtype=st.sampled_from(DTYPES), outliers=st.booleans())
def test_error_bound_determinism_and_sizes(cfg, seed, n, h, d, dtype, outliers):
    k, v = make_kv(seed, n, h, d, dtype, outliers)
    enc, fmt = codec.encode_blocks(k, v, cfg)
    k_hat, v_hat = codec.decode_blocks(enc, fmt)

    for x, x_hat, rel in ((k, k_hat, cfg.rel_k), (v, v_hat, cfg.rel_v)):
        groups = group_view(x.float(), cfg.granularity)
        bound = rel * (groups.amax(-1) - groups.amin(-1)) / 2           # [n, 64, G]
        err = group_view((x.float() - x_hat).abs(), cfg.granularity).amax(-1)
        assert torch.all(err <= bound * (1 + 1e-6) + 1e-30), float((err - bound).max())

    # decode(encode(x)) is deterministic, and encoding is too
    again, _ = codec.encode_blocks(k, v, cfg)
    assert torch.equal(again.data, enc.data) and torch.equal(again.perm, enc.perm)
    k2, v2 = codec.decode_blocks(enc, fmt)
    assert torch.equal(k2, k_hat) and torch.equal(v2, v_hat)

    # sizes are what the accounting says, from the integers themselves
    expected_total = 0
    for kv, x in ((0, k), (1, v)):
        bits = fmt.bits(kv)
        q, _, _ = codec.quantize(x, (cfg.rel_k, cfg.rel_v)[kv], bits, cfg.granularity)
        assert int(q.max()) < 2**bits
        q = q.gather(2, enc.perm.long()[:, None, :, None].expand_as(q))
        packs = q.reshape(n, h, 64 // cfg.pack_size, cfg.pack_size, d)
        rng = packs.amax(3) - packs.amin(3)
        widths = torch.where(rng > 0, torch.floor(torch.log2(rng.double().clamp(min=1))) + 1, torch.zeros_like(rng.double()))
        payload_bits = cfg.pack_size * widths.sum(dim=(2, 3))          # [n, H]
        meta = fmt.n_packs * (bits + bits.bit_length()) / 8
        seg = ((meta + torch.ceil(payload_bits / 8)) / 4).ceil() * 4
        assert torch.equal(enc.seg_bytes[:, kv], seg.long())
        expected_total += int(seg.sum())
    assert enc.data.numel() == expected_total
    assert int(enc.seg_offset.flatten()[0]) == 0
    assert torch.all(enc.seg_offset % 4 == 0)
    ends = enc.seg_offset.flatten() + enc.seg_bytes.flatten()
    assert torch.equal(ends[:-1], enc.seg_offset.flatten()[1:])


def test_perm_is_a_permutation_and_median_sorted():
    k, v = make_kv(1, 4, 2, 16, torch.float32, True)
    cfg = KVCompConfig(repack="median")
    enc, fmt = codec.encode_blocks(k, v, cfg)
    assert torch.equal(enc.perm.long().sort(-1).values, torch.arange(64).expand(4, 64))
    q, _, _ = codec.quantize(v, cfg.rel_v, fmt.bits_v, cfg.granularity)
    med = q.permute(0, 2, 1, 3).reshape(4, 64, -1).median(-1).values
    med_in_order = med.gather(1, enc.perm.long())
    assert torch.all(med_in_order[:, :-1] >= med_in_order[:, 1:])
    identity, _ = codec.encode_blocks(k, v, KVCompConfig(repack="none"))
    assert torch.equal(identity.perm.long(), torch.arange(64).expand(4, 64))


def test_constant_tokens_are_exact():
    k = torch.full((1, 2, 64, 16), 0.75)
    v = torch.full((1, 2, 64, 16), -3.5)
    for layout in ("packed", "fixed_v"):
        enc, fmt = codec.encode_blocks(k, v, KVCompConfig(layout=layout))
        k_hat, v_hat = codec.decode_blocks(enc, fmt)
        assert torch.equal(k_hat, k) and torch.equal(v_hat, v)
    # packed: all packs have width 0, only metadata; fixed_v's V keeps its 2-bit fields (64 x 16 x 2 bits)
    assert torch.all(enc.seg_bytes[:, 0] == (fmt.meta_bytes(0) + 3) // 4 * 4) and torch.all(enc.seg_bytes[:, 1] == 256)
    enc, fmt = codec.encode_blocks(k, v, KVCompConfig(layout="packed"))
    assert torch.all(enc.seg_bytes == ((fmt.meta_bytes(0) + 3) // 4 * 4) * torch.tensor([1, 0])[None, :, None]
                     + ((fmt.meta_bytes(1) + 3) // 4 * 4) * torch.tensor([0, 1])[None, :, None])


def read_bits_le(data: bytes, bit_offset: int, nbits: int) -> int:
    """Independent, slow reading of the documented bit order."""
    value = 0
    for k in range(nbits):
        n = bit_offset + k
        value |= ((data[n // 8] >> (n % 8)) & 1) << k
    return value


def test_segment_layout_matches_the_documented_format():
    cfg = KVCompConfig(rel_k=0.1, rel_v=0.2, pack_size=8, repack="none", granularity="token_head")
    k, v = make_kv(7, 1, 1, 8, torch.float32, False)
    enc, fmt = codec.encode_blocks(k, v, cfg)
    data = bytes(enc.data.tolist())
    for kv, x, rel in ((0, k, cfg.rel_k), (1, v, cfg.rel_v)):
        q, _, _ = codec.quantize(x, rel, fmt.bits(kv), cfg.granularity)
        q = q[0, 0]                                     # [64, D]
        base = int(enc.seg_offset[0, kv, 0]) * 8
        bits, wbits, p, d = fmt.bits(kv), fmt.bits(kv).bit_length(), cfg.pack_size, 8
        n_packs = 64 // p * d
        payload = base + n_packs * (bits + wbits)
        for i in range(n_packs):
            pp, c = divmod(i, d)
            values = [int(q[pp * p + j, c]) for j in range(p)]
            pmin = read_bits_le(data, base + i * bits, bits)
            width = read_bits_le(data, base + n_packs * bits + i * wbits, wbits)
            assert pmin == min(values)
            assert width == (max(values) - min(values)).bit_length()
            for j in range(p):
                assert read_bits_le(data, payload + j * width, width) == values[j] - pmin
            payload += p * width


def test_fixed_v_segments_match_the_documented_format():
    """layout "fixed_v": the K segment is a packed one (pack mins, widths, then each channel's L-bit fields from
    the first 32-bit word after the metadata), the V segment the channels' fixed `bits`-bit fields and nothing
    else (channel c from 32-bit word 2 * bits * c; at 2 bits in pair order: token 16w + j of the channel at bit
    (j // 2) * 2 + (j % 2) * 16 of word w, so tokens 2i and 2i + 1 share the bits of the two half-words)."""
    cfg = KVCompConfig(rel_k=0.1, rel_v=1 / 3, layout="fixed_v")
    k, v = make_kv(9, 1, 1, 16, torch.float32, True)
    enc, fmt = codec.encode_blocks(k, v, cfg)
    data = bytes(enc.data.tolist())
    d = 16
    qk, _, _ = codec.quantize(k, cfg.rel_k, fmt.bits_k, cfg.granularity)
    qv, _, _ = codec.quantize(v, cfg.rel_v, fmt.bits_v, cfg.granularity)
    base = int(enc.seg_offset[0, 0, 0]) * 8
    bits, wbits = fmt.bits_k, fmt.bits_k.bit_length()
    payload = base + fmt.meta_bytes(0) * 8
    for c in range(d):
        values = [int(qk[0, 0, t, c]) for t in range(64)]
        pmin = read_bits_le(data, base + c * bits, bits)
        width = read_bits_le(data, base + d * bits + c * wbits, wbits)
        assert (pmin, width) == (min(values), (max(values) - min(values)).bit_length())
        assert [read_bits_le(data, payload + t * width, width) for t in range(64)] == [x - pmin for x in values]
        payload += 64 * width
    assert fmt.bits_v == 2 and fmt.meta_bytes(1) == 0 and int(enc.seg_bytes[0, 1, 0]) == 8 * d * 2
    vbase = int(enc.seg_offset[0, 1, 0]) * 8
    for c in range(d):
        got = [read_bits_le(data, vbase + 32 * (2 * 2 * c + t // 16) + (t % 16) // 2 * 2 + t % 2 * 16, 2)
               for t in range(64)]
        assert got == [int(qv[0, 0, t, c]) for t in range(64)]
    k_hat, v_hat = codec.decode_blocks(enc, fmt)
    packed, pfmt = codec.encode_blocks(k, v, dataclasses.replace(cfg, layout="packed"))
    for a, b in zip((k_hat, v_hat), codec.decode_blocks(packed, pfmt)):
        assert torch.equal(a, b)  # the layout changes the bytes, never the values


def test_bits_for_rel():
    assert codec.bits_for_rel(0.1) == 4
    assert codec.bits_for_rel(0.2) == 3
    assert codec.bits_for_rel(1 / 15) == 4
    assert codec.bits_for_rel(1e-3) == 10
    with pytest.raises(ValueError):
        codec.BlockFormat.from_config(KVCompConfig(), 2, 12)


def test_compresses_correlated_data_below_quantisation_width():
    # smooth tokens (neighbouring tokens alike): packs need far fewer bits than the quantiser's range
    t = torch.linspace(0, 1, 64)[None, None, :, None]
    base = torch.randn(1, 2, 1, 64)
    k = base + 0.02 * torch.sin(6 * t + base)
    v = base * 0.5 + 0.01 * t
    enc, fmt = codec.encode_blocks(k, v, KVCompConfig())
    bits_per_value = 8 * enc.data.numel() / (2 * k.numel())
    assert bits_per_value < (fmt.bits_k + fmt.bits_v) / 2
    assert math.isfinite(bits_per_value)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tail_rows_are_8_bit_min_max_quantisation_per_row(dtype):
    """Stage 5: each row [D] -> D codes, then its min and max in the model dtype; decoding gives bit for bit the
    8-bit asymmetric min-max quantisation (eval.baselines.fake_quantize at 8 bits), constant rows exactly."""
    from eval.baselines import fake_quantize

    k, _ = make_kv(5, 2, 3, 64, dtype, outliers=True)
    k[0, 0, 7] = 1.5  # a constant row
    rows = codec.encode_tail(k)
    assert rows.dtype == torch.uint8 and rows.shape == (*k.shape[:-1], 64 + 2 * dtype.itemsize)
    assert torch.equal(rows[..., 64:64 + dtype.itemsize].contiguous().view(dtype), k.amin(-1, keepdim=True))
    got = codec.decode_tail(rows, dtype)
    assert torch.equal(got, fake_quantize(k, 8, -1)) and torch.equal(got[0, 0, 7], k[0, 0, 7])
