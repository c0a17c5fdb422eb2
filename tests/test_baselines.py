"""eval/baselines.py: KIVI-style fake quantisation error bounds, residual handling, bits/value accounting."""

import pytest
import torch

from kvcomp_hf import cache_kwargs

from eval import baselines, common
from eval.baselines import KIVICache, KIVILayer, fake_quantize, kivi_bits_per_value


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3 + torch.rand(*shape, generator=g)


@pytest.mark.parametrize("nbits", [2, 4])
def test_fake_quantize_error_bound(nbits):
    x = _rand(4, 64, 32)
    xq = fake_quantize(x, nbits, dim=-1)
    scale = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2 ** nbits - 1)
    err = (x - xq).abs()
    assert (err <= scale / 2 + 1e-5).all()
    assert err.max() > 0  # it does quantise
    assert len(torch.unique(xq[0, 0])) <= 2 ** nbits
    assert torch.equal(fake_quantize(torch.full((2, 8), 1.5), 2, dim=-1), torch.full((2, 8), 1.5))


def test_key_per_channel_value_per_token_grouping():
    k = _rand(1, 2, 64, 16, seed=1)
    kq = baselines.quantize_keys_per_channel(k, 2, 32)
    # each channel of each 32-token group takes at most 4 distinct values
    for g in range(2):
        for c in range(16):
            assert len(torch.unique(kq[0, 0, g * 32:(g + 1) * 32, c])) <= 4
    v = _rand(1, 2, 5, 64, seed=2)
    vq = baselines.quantize_values_per_token(v, 2, 32)
    for t in range(5):
        assert len(torch.unique(vq[0, 1, t, :32])) <= 4
    with pytest.raises(ValueError):
        baselines.quantize_keys_per_channel(_rand(1, 1, 30, 8), 2, 32)


def test_kivi_layer_residual_windows():
    layer = KIVILayer(nbits=2, group_size=32, residual_length=128)
    k, v = _rand(1, 2, 300, 64, seed=3), _rand(1, 2, 300, 64, seed=4)
    rk, rv = layer.update(k, v)
    assert torch.equal(rk, k) and torch.equal(rv, v)  # prefill attends to its own tokens exactly
    assert layer.n_quant_k == 256 and layer.n_quant_v == 172
    assert torch.equal(layer.keys[..., 256:, :], k[..., 256:, :])        # 44 fp keys
    assert torch.equal(layer.values[..., 172:, :], v[..., 172:, :])      # 128 fp values
    assert not torch.equal(layer.keys[..., :256, :], k[..., :256, :])
    assert not torch.equal(layer.values[..., :172, :], v[..., :172, :])
    # decode: the new token is seen exactly, the stored past is what was stored
    k1, v1 = _rand(1, 2, 1, 64, seed=5), _rand(1, 2, 1, 64, seed=6)
    before_k = layer.keys.clone()
    rk, rv = layer.update(k1, v1)
    assert torch.equal(rk[..., :300, :], before_k) and torch.equal(rk[..., 300:, :], k1)
    assert layer.n_quant_v == 173 and layer.n_quant_k == 256
    # grow to 384 keys: the next 128-token key block gets quantised
    layer.update(_rand(1, 2, 83, 64, seed=7), _rand(1, 2, 83, 64, seed=8))
    assert layer.get_seq_length() == 384 and layer.n_quant_k == 384


def test_kivi_bits_accounting_matches_formula():
    cache = KIVICache(num_layers=3, nbits=4)
    k, v = _rand(1, 2, 1000, 64, seed=9), _rand(1, 2, 1000, 64, seed=10)
    for i in range(3):
        cache.update(k.half(), v.half(), i)
    rep = cache.memory_report()
    expect = kivi_bits_per_value(4, 1000, head_dim=64)
    assert rep["bits_per_value"] == pytest.approx(expect)
    # by hand: keys 896 quantised at 4 + 2*16/32 = 5 bits, 104 fp16; values 872 quantised at 5 bits, 128 fp16
    by_hand = (896 * 5 + 104 * 16 + 872 * 5 + 128 * 16) / 2000
    assert rep["bits_per_value"] == pytest.approx(by_hand)
    assert rep["tokens"] == 1000
    assert rep["compression_ratio"] == pytest.approx(16 / by_hand)
    assert rep["dense_bytes"] == 3 * 2 * 1000 * 2 * 64 * 2
    assert kivi_bits_per_value(2, 10 ** 7, head_dim=128) == pytest.approx(3.0, abs=1e-3)


def test_kivi_cache_in_a_model_and_fp32_accounting(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (1, 200))
    cache = KIVICache(tiny_llama.config, nbits=2)
    with torch.no_grad():
        out = tiny_llama(input_ids=ids, **cache_kwargs(cache), use_cache=True)
        full = tiny_llama(input_ids=ids, use_cache=True)
    torch.testing.assert_close(out.logits, full.logits)  # prefill reads its own K/V exactly
    assert cache.get_seq_length() == 200
    rep = cache.memory_report()
    assert rep["fp_bits"] == 32  # fp32 model: residual, scales and zeros counted at 32 bits
    with torch.no_grad():
        nxt = tiny_llama(input_ids=ids[:, :1], **cache_kwargs(cache), use_cache=True)
    assert nxt.logits.shape[1] == 1 and cache.get_seq_length() == 201


def test_kivi_crop():
    layer = KIVILayer(nbits=2)
    layer.update(_rand(1, 1, 300, 32), _rand(1, 1, 300, 32))
    layer.crop(-100)
    assert layer.get_seq_length() == 200 and layer.n_quant_k == 128 and layer.n_quant_v == 172


def test_hf_quantized_cache_if_backend_available(tiny_llama):
    pytest.importorskip("optimum.quanto")
    cache = common.make_cache("hf-int4", tiny_llama)
    ids = torch.randint(3, 200, (1, 300))
    with torch.no_grad():
        tiny_llama(input_ids=ids, **cache_kwargs(cache), use_cache=True)
        tiny_llama(input_ids=ids[:, :1], **cache_kwargs(cache), use_cache=True)
    bpv = common.cache_bits_per_value(cache)
    assert 4 < bpv < 32


@pytest.mark.parametrize("bits", [2, 4])
def test_pytorch_unpack_equals_quantos(bits):
    """The unpack that replaces quanto's CUDA extension on a GPU (eval/common/specs.py) gives quanto's result."""
    pytest.importorskip("optimum.quanto")
    from eval.common.specs import _unpack_bits

    packed = torch.randint(0, 256, (6, 5), dtype=torch.uint8)
    assert torch.equal(_unpack_bits(packed, bits), torch.ops.quanto.unpack(packed, bits))
